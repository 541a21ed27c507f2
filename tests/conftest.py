import copy

import pytest
import torch

from torch_isopo import ISOPO
from torch_isopo.reference import reference_gradients


def run_isopo(model, losses_fn, A, mode, *, damping=0.5, segments=None, sample_dim=0, **kw):
    """ISOPO gradients of a copy of ``model`` after one microbatch."""
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=damping,
                ema=kw.pop("ema", None), fisher_probes=kw.pop("fisher_probes", None), **kw)
    with opt.microbatch(A, segments, sample_dim=sample_dim):
        losses_fn(m).sum().backward()
    return m, opt


def assert_matches_reference(model, losses_fn, A, mode, *, damping=0.5, segments=None,
                             sample_dim=0, tol=1e-5, **kw):
    """Every trainable parameter's ISOPO gradient equals the brute force (relative error)."""
    ref = copy.deepcopy(model)
    expected, _ = reference_gradients(ref, lambda: losses_fn(ref), A, mode, damping, segments,
                                      sample_dim)
    m, opt = run_isopo(model, losses_fn, A, mode, damping=damping, segments=segments,
                       sample_dim=sample_dim, **kw)
    checked = 0
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        if not p.requires_grad:
            assert p.grad is None
            continue
        want = expected[q]
        assert p.grad is not None, f"{name} got no gradient"
        err = float((p.grad - want).norm() / want.norm().clamp_min(1e-30))
        assert err <= tol, f"{mode}: {name} relative error {err:.2e}"
        checked += 1
    assert checked > 0
    return m, opt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _sb3_logs(tmp_path_factory, monkeypatch):
    """Stable-Baselines3 makes a log folder whenever a model is set up: in pytest's own
    temporary folders, not one more in the system's at every test."""
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path_factory.getbasetemp() / "sb3"))
