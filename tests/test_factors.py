"""The factor algebra against dense brute force."""
import pytest
import torch
import torch.nn.functional as F

from torch_isopo import factors


def _dense(X, size):
    return F.one_hot(X, size).double() if X.dim() == 1 else X.double()


@pytest.mark.parametrize("x_index", [False, True])
@pytest.mark.parametrize("y_index", [False, True])
def test_side_dots_with_one_hot_factors(x_index, y_index):
    P = 11
    X = torch.randint(0, P, (6,)) if x_index else torch.randn(6, P, dtype=torch.float64)
    Y = torch.randint(0, P, (9,)) if y_index else torch.randn(9, P, dtype=torch.float64)
    want = _dense(X, P) @ _dense(Y, P).T
    assert torch.allclose(factors.side_dots(X, Y, torch.float64), want)


def test_low_precision_factors_are_upcast_in_pieces(monkeypatch):
    monkeypatch.setattr(factors, "_CAST_ELEMS", 64)
    X = torch.randn(5, 16, dtype=torch.bfloat16)
    Y = torch.randn(37, 16, dtype=torch.bfloat16)
    got = factors.side_dots(X, Y, torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, X.float() @ Y.float().T)


@pytest.mark.parametrize("device_products", ["float32 (GPU)", "float16 (host)"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mm_scaled_spans_float16s_range(side, device_products, monkeypatch):
    """A float32 factor scaled by ``c`` with entries beyond float16's range (1e6) and below its
    smallest number (1e-9), times a float16 factor: the product as in float32, never inf or
    zero. Where the products come back in float32 (a GPU's ``mm(out_dtype=)``, emulated) the
    scaled factor is brought under 2^14 by a power of two; elsewhere the product is float32."""
    from torch_isopo import _compat
    if device_products.startswith("float32"):
        monkeypatch.setattr(_compat, "has_mm_to", lambda X: True)
        monkeypatch.setattr(_compat, "mm_to", lambda X, Y, dtype: torch.mm(X.float(), Y.float()))
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 5, generator=g) * torch.tensor([1e6, 1e-9, 1.0, 3e4, 1e-3])
    low = torch.randn(5, 4, generator=g).half()
    if side == "right":
        wide, low = wide.T.contiguous(), low.T.contiguous()
        got, want = factors.mm_scaled(low, wide), low.double() @ wide.double()
    else:
        got, want = factors.mm_scaled(wide, low), wide.double() @ low.double()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got.double() - want).norm() / want.norm()) < 1e-3
    if side == "left":         # the 1e-9 column's own part survives (it was lost below 2^-24)
        col = factors.mm_scaled(wide[:, 1:2].contiguous(), low[1:2].contiguous()).double()
        ref = wide[:, 1:2].double() @ low[1:2].double()
        assert float((col - ref).norm() / ref.norm()) < 1e-3
