"""``log_diagnostics``: per-layer scalars to TensorBoard's ``SummaryWriter`` and a W&B-style run."""
import math

import pytest
import torch
from torch import nn

from torch_isopo import ISOPO, log_diagnostics

KEYS = ("rho", "c_ratio", "cond", "m")


def trained(mode="ntk", steps=3):
    """An MLP policy after ``steps`` ISOPO steps: the optimizer and ``[diagnostics per step]``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = ISOPO(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode)
    history = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        with opt.microbatch(torch.randn(16)):
            (-model(x).log_softmax(-1)[:, 0].sum()).backward()
        opt.step()
        opt.zero_grad()
        history.append({k: dict(v) for k, v in opt.diagnostics.items()})
    return opt, history


class FakeRun:
    """What log_diagnostics needs of a W&B run (or the ``wandb`` module): ``log(dict, step=)``."""

    def __init__(self):
        self.calls = []

    def log(self, data, step=None):
        self.calls.append((dict(data), step))


def test_wandb_style_run():
    opt, history = trained()
    run = FakeRun()
    scalars = log_diagnostics(opt, run, step=7)
    assert run.calls == [(scalars, 7)]
    assert set(scalars) == {f"isopo/{layer}/{k}" for layer in ("0", "2") for k in KEYS}
    for layer in ("0", "2"):
        for k in KEYS:
            assert scalars[f"isopo/{layer}/{k}"] == history[-1][layer][k]
    assert 0 < scalars["isopo/2/c_ratio"] <= 1 and scalars["isopo/2/cond"] >= 1


def test_tensorboard_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = ISOPO(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode="ntk")
    writer = SummaryWriter(str(tmp_path))
    written = []
    for step in range(3):
        with opt.microbatch(torch.randn(16)):
            (-model(torch.randn(16, 4)).log_softmax(-1)[:, 0].sum()).backward()
        opt.step()
        opt.zero_grad()
        written.append(log_diagnostics(opt, writer, step))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(written[0])
    for tag in written[0]:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [0, 1, 2]
        for e, scalars in zip(logged, written):
            assert math.isclose(e.value, scalars[tag], rel_tol=1e-6)   # stored as float32


def test_accelerate_style_wrapper_reinforce_and_errors():
    opt, _ = trained()

    class Wrapper:                         # accelerate's AcceleratedOptimizer keeps .optimizer
        optimizer = opt
    assert log_diagnostics(Wrapper()) == log_diagnostics(opt)
    assert set(log_diagnostics(opt, figures=("cond",))) == {"isopo/0/cond", "isopo/2/cond"}
    run = FakeRun()
    reinforce, _ = trained("reinforce", steps=1)
    assert log_diagnostics(reinforce, run, 0) == {} and run.calls == []
    with pytest.raises(TypeError, match="needs an ISOPO optimizer"):
        log_diagnostics(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), run, 0)
    with pytest.raises(TypeError, match="add_scalar.*log"):
        log_diagnostics(opt, object(), 0)
