"""Shared checks for the per-family tests: every mode and damping against the float64 brute force."""
from __future__ import annotations

import copy

import torch

from torch_isopo import ISOPO
from torch_isopo.reference import reference_gradients

# (mode, damping): reinforce, ntk with two dampings, fisher pure and damped; all probes
SETTINGS = [("reinforce", 1.0), ("ntk", 0.3), ("ntk", 3.0), ("fisher", 0.0), ("fisher", 1.0)]
IDS = [f"{m}-{d}" for m, d in SETTINGS]


def check_family(model, losses, n, mode, damping, *, segments=None, sample_dim=0, rules=None,
                 tol=1e-7, seed=0, gates="auto"):
    """ISOPO's gradient of every trainable parameter equals the brute force's.

    ``losses(m)`` runs the forward of model ``m`` and returns the ``n`` per-sample terms. The error
    is relative to the parameter's gradient, or to the largest gradient of the model when that is
    (numerically) zero, as for a bias in front of a normalisation.
    """
    A = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = copy.deepcopy(model)
    want, _ = reference_gradients(ref, lambda: losses(ref), A, mode, damping, segments, sample_dim)
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=damping,
                ema=None, fisher_probes=None, gates=gates)
    with opt.microbatch(A, segments, sample_dim=sample_dim):
        losses(m).sum().backward()
    scale = max(float(w.norm()) for w in want.values())
    assert scale > 0
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        w = want[q]
        if p.grad is None:                   # not used by the loss (a critic beside the actor)
            assert float(w.norm()) == 0, f"{name} got no gradient"
            continue
        err = float((p.grad - w).norm()) / max(float(w.norm()), 1e-9 * scale)
        assert err <= tol, f"{mode}/{damping}: {name} relative error {err:.2e}"
    if rules is not None:
        assert [layer.rule for layer in opt.layers] == rules
    return m, opt
