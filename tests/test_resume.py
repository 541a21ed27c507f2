"""Resume: train k steps, ``torch.save`` model, ISOPO and scheduler state, load them in a fresh
process with ``torch.load(weights_only=True)`` and continue: the parameters (and ISOPO's
statistics) equal those of an uninterrupted run exactly.

Run as a script, this file is the fresh process: ``test_resume.py SETUP CHECKPOINT OUT THREADS``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_isopo
from models import MLPPolicy, SeqMixer, VOCAB, lm_losses

K = 3                 # steps before and after the checkpoint
SETUPS = {            # model, ISOPO options
    "ntk-mlp": (MLPPolicy, dict(mode="ntk", damping=0.5, ema=0.9)),
    "fisher-seq": (SeqMixer, dict(mode="fisher", damping=0.3, ema=0.5, fisher_probes=3)),
}


def _build(setup):
    make, kw = SETUPS[setup]
    torch.manual_seed(0)
    model = make()
    opt = torch_isopo.ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _losses(model, step, k):
    """Microbatch k of step ``step``: the same data in every process."""
    g = torch.Generator().manual_seed(1000 * step + k)
    if isinstance(model, MLPPolicy):
        X, acts = torch.randn(5, 5, generator=g), torch.randint(0, 4, (5,), generator=g)
        return -torch.log_softmax(model(X), -1).gather(1, acts[:, None]).squeeze(1) / 5
    return lm_losses(model, torch.randint(3, VOCAB, (3, 6), generator=g), None)


def _train(model, opt, sched, steps):
    for step in steps:
        for k in range(2):
            n = 5 if isinstance(model, MLPPolicy) else 3
            A = torch.randn(n, generator=torch.Generator().manual_seed(1000 * step + k + 500))
            with opt.microbatch(A):
                _losses(model, step, k).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _checkpoint(model, opt, sched):
    return {"model": model.state_dict(), "isopo": opt.state_dict(), "sched": sched.state_dict()}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_resume_in_a_fresh_process_matches_an_uninterrupted_run(setup, tmp_path):
    model, opt, sched = _build(setup)
    _train(model, opt, sched, range(K))
    torch.save(_checkpoint(model, opt, sched), tmp_path / "ckpt.pt")
    _train(model, opt, sched, range(K, 2 * K))          # the uninterrupted run goes on

    out = tmp_path / "resumed.pt"
    here = str(Path(torch_isopo.__file__).parents[1])  # the fresh process imports this copy
    path = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, __file__, setup, str(tmp_path / "ckpt.pt"), str(out),
                    str(torch.get_num_threads())], check=True, cwd=Path(__file__).parent,
                   env={**os.environ, "PYTHONPATH": path})
    resumed = torch.load(out, weights_only=True)
    for name, p in model.state_dict().items():
        assert torch.equal(p, resumed["model"][name]), name
    assert resumed["isopo"]["isopo"]["m"] == opt.state_dict()["isopo"]["m"]
    assert torch.equal(resumed["isopo"]["isopo"]["generator"], opt.generator.get_state())
    assert resumed["sched"] == sched.state_dict()


def _resume(setup, checkpoint, out, threads):
    torch.set_num_threads(int(threads))
    model, opt, sched = _build(setup)
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["isopo"])
    sched.load_state_dict(state["sched"])
    _train(model, opt, sched, range(K, 2 * K))
    torch.save(_checkpoint(model, opt, sched), out)


if __name__ == "__main__":
    _resume(*sys.argv[1:])
