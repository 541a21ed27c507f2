"""Scale-out as users run it: ``accelerate launch`` with two CPU processes (gloo) around TRL's
GRPO trainer and around a plain training loop, each under DDP and under FSDP2.

Every process records the microbatches it trained on and the gradients it stepped on
(``accelerate_worker.py``). The test then reruns each rank's share in this one process, with a
single-process ISOPO per rank fed the mean of their gradients before every step (what data
parallelism does), and checks that each step's gradients, the trained weights and each rank's
own statistics agree. Generation is random, so the TRL rerun replays the completions the rank
generated instead of generating again.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")
pytest.importorskip("accelerate")

import accelerate_worker as worker  # noqa: E402

WORLD = 2
# bf16 keeps 8 significant bits (rounding ≤ 2^-9 ≈ 2e-3 relative per operation); parameters,
# activations, gradients and the reduce-scatter are rounded in every layer. Measured: 0.5-1.6%
# per tensor. A real mistake (a microbatch or a rank lost, a wrong 1/GA or 1/world factor)
# is off by tens of percent.
BF16_TOL = 3e-2
ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def _one_thread():
    """The processes run one thread each; so does the rerun. ``fisher`` draws its probes among
    the tokens with a non-zero output gradient, and a token whose gradient is zero in exact
    arithmetic can come out as rounding noise with another thread count, shifting the draws."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, engine: str, *launch_args: str, timeout: float = 240.0) -> list[dict]:
    """``accelerate launch`` the worker on WORLD CPU processes; what every rank saved."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args,
           "--num_processes", str(WORLD), "--num_machines", "1", "--main_process_port",
           str(_free_port()), "--dynamo_backend", "no",
           str(Path(worker.__file__)), str(out), engine]
    log = out / f"{engine}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, out)
            raise AssertionError(f"accelerate launch did not finish within {timeout:.0f}s:\n"
                                 f"{log.read_text()[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n"
                             f"{log.read_text()[-6000:]}")
    return [torch.load(out / f"{engine}_rank{r}.pt") for r in range(WORLD)]


def _stop(proc: subprocess.Popen, out: Path) -> None:
    """SIGTERM lets the launcher stop its workers; those still alive after 20 s (they run in
    sessions of their own and wrote their process ids) are killed."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid_file in out.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _assert_close(got: dict, want: dict, what: str, tol: float) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        err = float((got[n].double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
        assert err <= tol, f"{what}: {n} relative error {err:.2e} > {tol:.0e}"


# -- the two launches ---------------------------------------------------------------------------

ENGINES = {   # accelerate's distributed type, the wrapped model's class
    "ddp": ("DistributedType.MULTI_CPU", "DistributedDataParallel"),
    "fsdp2": ("DistributedType.FSDP", "FSDPQwen3ForCausalLM"),
}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", "--multi_gpu")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """The example FSDP2 config, in fp32/fp64 (the bf16 runs ask for bf16 themselves)."""
    return _launch(tmp_path_factory.mktemp("fsdp2"), "fsdp2", "--config_file",
                   str(ROOT / "examples" / "accelerate_fsdp2.yaml"), "--mixed_precision", "no")


def _runs(request, engine: str, kind: str, name: str) -> list[dict]:
    runs = [r[kind][name] for r in request.getfixturevalue(engine)]
    for run in runs:
        assert (run["distributed_type"], run["model_class"]) == ENGINES[engine]
    return runs


def _bf16(runs: list[dict]) -> list[dict]:
    if "ntk bf16" not in runs[0]:
        pytest.skip("accelerate reports no bf16 support on this machine")
    out = [r["ntk bf16"] for r in runs]
    assert all(r["param_dtype"] == "torch.bfloat16" for r in out)
    return out


# -- TRL: ISOPOGRPOTrainer ------------------------------------------------------------------------

def _replay_trainer(mode: str, rank: int, out: str):
    """A single-process ISOPOGRPOTrainer that trains on given microbatches (no generation)."""
    from torch_isopo.integrations.trl import ISOPOGRPOTrainer

    class Replay(ISOPOGRPOTrainer):
        def _prepare_inputs(self, inputs):
            return inputs

    trainer = Replay(model=worker.trl_model(), reward_funcs=worker.reward,
                     args=worker.trl_config(mode, out), train_dataset=worker.trl_prompts(),
                     processing_class=worker.trl_tokenizer())
    trainer.create_optimizer()
    trainer.isopo.generator.manual_seed(trainer.args.seed + rank)   # the rank's probe stream
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer


def _trl_expected(mode: str, runs: list[dict], out: str, steps: int = worker.STEPS) -> dict:
    """Each rank's microbatches through its own single-process trainer, the gradients averaged
    over ranks before every step."""
    trainers = [_replay_trainer(mode, r, out) for r in range(WORLD)]
    ga = trainers[0].args.gradient_accumulation_steps
    grads = []
    for step in range(steps):
        for run, trainer in zip(runs, trainers):
            for mb in run["microbatches"][step * ga:(step + 1) * ga]:
                # the rank's own loss: dapo divides by the tokens of all processes over their
                # number, and here there is one process
                mb = {**mb, "num_items_in_batch": mb["num_items_in_batch"] / WORLD}
                trainer.training_step(trainer.model, mb)
        mean = {n: torch.stack([t.model.get_parameter(n).grad for t in trainers]).mean(0)
                for n, _ in trainers[0].model.named_parameters()}
        grads.append(mean)
        for trainer in trainers:
            for n, p in trainer.model.named_parameters():
                p.grad = mean[n].clone()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
    return {"grads": grads,
            "weights": {n: p.detach() for n, p in trainers[0].model.named_parameters()},
            "m": [t.isopo.state_dict()["isopo"]["m"] for t in trainers]}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", worker.MODES)
def test_trl_grpo_averages_per_rank_isopo(request, engine, mode, tmp_path):
    runs = _runs(request, engine, "trl", mode)
    # the ranks trained on different completions of different prompts ...
    first = [r["microbatches"][0] for r in runs]
    assert not torch.equal(first[0]["prompt_ids"], first[1]["prompt_ids"])
    # ... and drew their own probe positions
    assert not torch.equal(runs[0]["generator"], runs[1]["generator"])

    want = _trl_expected(mode, runs, str(tmp_path))
    for rank, run in enumerate(runs):
        assert len(run["grads"]) == worker.STEPS
        for step, got in enumerate(run["grads"]):
            _assert_close(got, want["grads"][step], f"{mode} rank {rank} step {step}", 1e-6)
        _assert_close(run["weights"], want["weights"], f"{mode} rank {rank} weights", 1e-6)
        # statistics are per rank: each rank's equal its own single-process run's
        assert run["m"].keys() == want["m"][rank].keys()
        for layer, m in want["m"][rank].items():
            assert run["m"][layer] == pytest.approx(m, rel=1e-6), (mode, rank, layer)
    assert runs[0]["m"] != runs[1]["m"]


def test_trl_grpo_fsdp2_bf16(fsdp2, tmp_path):
    """``--bf16``: accelerate's FSDP2 policy, bf16 parameters, forward, backward and
    reduction. One step's gradients are within bf16 rounding of the float32 rerun."""
    runs = _bf16([r["trl"] for r in fsdp2])
    want = _trl_expected("ntk", runs, str(tmp_path), steps=1)
    for rank, run in enumerate(runs):
        _assert_close(run["grads"][0], want["grads"][0], f"bf16 rank {rank}", BF16_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_trl_grpo_checkpoint_keeps_each_rank_isopo_state(request, engine):
    """The trainer's optimizer checkpoint holds the main process's ISOPO state under DDP and
    none under FSDP2 (sharded); every process must resume with its own."""
    states = [r["resume"] for r in request.getfixturevalue(engine)]
    for state in states:
        assert state["resumed"]["m"] == state["saved"]["m"]
        assert torch.equal(state["resumed"]["generator"], state["saved"]["generator"])
    assert states[0]["saved"]["m"] != states[1]["saved"]["m"]


# -- a plain loop with accumulate -----------------------------------------------------------------

def _plain_expected(mode: str, steps: int) -> dict:
    """Per rank a single-process ISOPO on its microbatches, each loss over the accumulation
    steps (what ``accelerator.backward`` does), gradients averaged over ranks before every
    step; float64."""
    from models import lm_losses
    models = [worker.plain_model() for _ in range(WORLD)]
    opts = [worker.isopo_for(m, mode, rank) for rank, m in enumerate(models)]
    grads = []
    for step in range(steps):
        for rank, (model, opt) in enumerate(zip(models, opts)):
            for k in range(worker.GA):
                ids, mask, A = worker.microbatch(rank, step, k)
                with opt.microbatch(A):
                    (lm_losses(model, ids, mask).sum() / worker.GA).backward()
        mean = {n: torch.stack([m.get_parameter(n).grad for m in models]).mean(0)
                for n, _ in models[0].named_parameters()}
        grads.append(mean)
        for model, opt in zip(models, opts):
            for n, p in model.named_parameters():
                p.grad = mean[n].clone()
            opt.step()
            opt.zero_grad()
    return {"grads": grads, "weights": {n: p.detach() for n, p in models[0].named_parameters()},
            "m": [opt.state_dict()["isopo"]["m"] for opt in opts]}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", worker.MODES)
def test_plain_loop_averages_per_rank_isopo(request, engine, mode):
    runs = _runs(request, engine, "plain", mode)
    if engine == "fsdp2":
        for run in runs:       # the config's wrap policy: one unit per decoder layer
            assert run["fsdp_units"].count("FSDPQwen3DecoderLayer") == 2
    want = _plain_expected(mode, worker.STEPS)
    for rank, run in enumerate(runs):
        assert len(run["grads"]) == worker.STEPS
        for step, got in enumerate(run["grads"]):
            _assert_close(got, want["grads"][step], f"{mode} rank {rank} step {step}", 1e-10)
        _assert_close(run["weights"], want["weights"], f"{mode} rank {rank} weights", 1e-10)
        for layer, m in want["m"][rank].items():
            assert run["m"][layer] == pytest.approx(m, rel=1e-10), (mode, rank, layer)
    assert runs[0]["m"] != runs[1]["m"]


def test_plain_loop_fsdp2_bf16(fsdp2):
    """``mixed_precision="bf16"``: one accumulated step's gradients are within bf16 rounding of
    the float64 ones."""
    runs = _bf16([r["plain"] for r in fsdp2])
    want = _plain_expected("ntk", 1)
    for rank, run in enumerate(runs):
        _assert_close(run["grads"][0], want["grads"][0], f"bf16 rank {rank}", BF16_TOL)
