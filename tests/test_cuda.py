"""The policy families on a CUDA device against the float64 brute force on the CPU.

ISOPO runs on the GPU in float64 against the brute force on the same device (exact: the same
tolerance as on the CPU; across devices the models themselves differ at 1e-7, Hugging Face's
rotary tables being computed in float32), and in float32 with TF32 off against the brute force on
the CPU (rounding only), so a device-dependent path (cuDNN's recurrent and convolution kernels,
the fused attention fast path, the GPU solver) is also checked against code that never touches it. Skipped where no CUDA device is present;
``ISOPO_TEST_DEVICE=cpu`` runs the same checks on the CPU.
"""
import copy
import os

import pytest
import torch
from torch import nn

from families import IDS, SETTINGS
from models import lm_losses, qwen3
from test_families import (AttentionPolicy, CellLoop, CleanRLAgent, RecurrentPolicy, SB3Gaussian,
                           TokensWithTable, _logp)
from torch_isopo import ISOPO
from torch_isopo.reference import reference_gradients

DEVICE = os.environ.get("ISOPO_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
D = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x(*shape, seed=1):
    return torch.randn(*shape, dtype=D, generator=_g(seed))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16, 3))


def _encoder():
    return nn.ModuleDict({"net": nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                            batch_first=True, norm_first=True),
                          "head": nn.Linear(8, 3)})


def _weight_norm():
    wn = torch.nn.utils.parametrizations.weight_norm
    return nn.Sequential(wn(nn.Linear(3, 6)), nn.Tanh(), wn(nn.Linear(6, 4)))


SEG = torch.tensor([0, 1, 2, 0, 1, 2])
MASK = torch.ones(3, 6)
MASK[1, -2:] = 0
CASES = {  # name: (build, inputs, losses(m, *inputs), n, microbatch keywords)
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), (_x(6, 5),),
            lambda m, x: _logp(m(x)), 6, {}),
    "cnn-segments": (_cnn, (_x(6, 2, 9, 9),),
                     lambda m, x: torch.zeros(3, dtype=x.dtype, device=x.device).index_add(
                         0, SEG.to(x.device), _logp(m(x))), 3, dict(segments=SEG)),
    "gru-batch-first": (lambda: RecurrentPolicy(nn.GRU, True, num_layers=2, bidirectional=True),
                        (_x(3, 4, 3),), lambda m, x: m(x), 3, {}),
    "lstm-time-major": (lambda: RecurrentPolicy(nn.LSTM, False, proj_size=2), (_x(4, 3, 3),),
                        lambda m, x: m(x), 3, dict(sample_dim=1)),
    "lstm-cell-loop": (lambda: CellLoop(nn.LSTMCell), (_x(5, 3, 3),), lambda m, x: m(x), 3, {}),
    "attention": (lambda: AttentionPolicy(True, "kv"), (_x(3, 4, 8), _x(3, 5, 8, seed=2)),
                  lambda m, x, y: m(x, y), 3, {}),
    "encoder-layer": (_encoder, (_x(3, 4, 8),),
                      lambda m, x: _logp(m["head"](m["net"](x))).sum(1), 3, {}),
    "cleanrl-gaussian": (CleanRLAgent, (_x(6, 3), _x(6, 2, seed=2)),
                         lambda m, x, a: -m.get_action_and_value(x, a)[1], 6, {}),
    "sb3-gaussian": (SB3Gaussian, (_x(6, 3), _x(6, 2, seed=2)),
                     lambda m, x, a: -m.evaluate_actions(x, a)[0], 6, {}),
    "tokens-table": (TokensWithTable, (_x(6, 3, 2),), lambda m, x: m(x), 6, {}),
    "weight-norm": (_weight_norm, (_x(4, 3),), lambda m, x: _logp(m(x)), 4, {}),
    "qwen3": (qwen3, (torch.randint(3, 32, (3, 6), generator=_g(4)), MASK),
              lambda m, ids, mask: lm_losses(m, ids, mask), 3, {}),
}


def _to(t, device, dtype):
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # exact fp32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_family_on_cuda(name, setting, dtype):
    build, inputs, losses, n, kw = CASES[name]
    mode, damping = setting
    torch.manual_seed(0)
    model = build().to(D)
    A = torch.randn(n, dtype=D, generator=_g(0))
    exact = dtype == torch.float64
    ref = copy.deepcopy(model).to(DEVICE if exact else "cpu")
    where = [_to(t, DEVICE if exact else "cpu", D) for t in inputs]
    seg = kw.get("segments")
    want, _ = reference_gradients(ref, lambda: losses(ref, *where), A.to(where[0].device), mode,
                                  damping, None if seg is None else seg.to(where[0].device),
                                  kw.get("sample_dim", 0))
    want = {q: w.cpu() for q, w in want.items()}
    m = copy.deepcopy(model).to(DEVICE, dtype)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=damping, ema=None,
                fisher_probes=None)
    dev = [_to(t, DEVICE, dtype) for t in inputs]
    with opt.microbatch(A.to(DEVICE, dtype), None if seg is None else seg.to(DEVICE),
                        sample_dim=kw.get("sample_dim", 0)):
        losses(m, *dev).sum().backward()
    tol = 1e-7 if exact else 2e-3
    scale = max(float(w.norm()) for w in want.values())
    for (pname, p), q in zip(m.named_parameters(), ref.parameters()):
        w = want[q]
        if p.grad is None:
            assert float(w.norm()) == 0, f"{pname} got no gradient"
            continue
        assert p.grad.device.type == DEVICE and p.grad.dtype == dtype, pname
        err = float((p.grad.cpu().double() - w).norm()) / max(float(w.norm()), 1e-9 * scale)
        assert err <= tol, f"{name} {mode}/{damping} {dtype}: {pname} relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_bf16_step_on_cuda(mode):
    """A bf16 model on the GPU takes a finite step whose direction matches float64's."""
    torch.manual_seed(0)
    model = qwen3().to(D)
    ids, mask = CASES["qwen3"][1]
    A = torch.randn(3, dtype=D, generator=_g(0))
    ref = copy.deepcopy(model)
    want, _ = reference_gradients(ref, lambda: lm_losses(ref, ids, mask), A, mode, 1.0, None, 0)
    m = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=1.0)
    with opt.microbatch(A.to(DEVICE)):
        lm_losses(m, ids.to(DEVICE), mask.to(DEVICE)).sum().backward()
    g = torch.cat([p.grad.double().cpu().flatten() for p in m.parameters()])
    w = torch.cat([want[q].flatten() for q in ref.parameters()])
    assert torch.isfinite(g).all()
    assert float(g @ w / (g.norm() * w.norm())) > 0.95
