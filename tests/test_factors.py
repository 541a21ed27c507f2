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
