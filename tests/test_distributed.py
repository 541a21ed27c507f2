"""Data parallelism (SPEC §5): DDP and FSDP2 average the per-rank ISOPO gradients.

Two CPU processes (gloo) train on different microbatches per rank, with gradient accumulation
over two microbatches (the first without gradient sync) and two optimizer steps, so each rank's
own statistic average (``ema``) is exercised. The expected gradients come from plain
single-process ISOPO optimizers, one per rank, that are fed the mean of their gradients before
every step, exactly what data parallelism does. FSDP2 also runs with bf16 parameters, and the
refusals are checked: a weight used outside its module's forward, a tensor-parallel layer.
The ranks meet through a file store in the test's temporary directory (no port to pick).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from accelerate_worker import microbatch as _microbatch
from models import SeqMixer, lm_losses, qwen3
from torch_isopo import ISOPO

WORLD, STEPS, MICROBATCHES = 2, 2, 2
MODES = ("ntk", "fisher")
OPTIONS = dict(damping=0.5, fisher_probes=4)      # few probes: the draws must match per rank

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return SeqMixer().double() if name == "seqmixer" else qwen3().double()


def _optimizer(target: nn.Module, params, mode: str) -> ISOPO:
    return ISOPO(target, torch.optim.SGD(params, lr=0.1), mode=mode, **OPTIONS)


def _backward(opt: ISOPO, model: nn.Module, rank: int, step: int, k: int) -> None:
    ids, mask, A = _microbatch(rank, step, k)
    with opt.microbatch(A):
        lm_losses(model, ids, mask).sum().backward()


def _expected(name: str, mode: str) -> list[dict[str, torch.Tensor]]:
    """Per step, the mean over ranks of single-process ISOPO gradients."""
    models = [_build(name) for _ in range(WORLD)]
    opts = [_optimizer(m, m.parameters(), mode) for m in models]
    history = []
    for step in range(STEPS):
        for rank, (m, opt) in enumerate(zip(models, opts)):
            for k in range(MICROBATCHES):
                _backward(opt, m, rank, step, k)
        mean = {n: torch.stack([dict(m.named_parameters())[n].grad for m in models]).mean(0)
                for n, _ in models[0].named_parameters()}
        for m in models:
            for n, p in m.named_parameters():
                p.grad = mean[n].clone()
        history.append(mean)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return history


def _assert_close(got: dict, want: dict, what: str, tol: float = 1e-10) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        err = float((got[n] - w).norm() / w.norm().clamp_min(1e-30))
        assert err <= tol, f"{what}: {n} relative error {err:.2e}"


def _spawn(worker, out, timeout: float = 240.0) -> None:
    """Run ``worker(rank, store, out)`` on WORLD processes; kill them all on a timeout."""
    ctx = mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))


# -- the workers: one spawn runs every distributed check (startup dominates their cost) --------

def _worker(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    code = 1
    try:
        results = {"ddp": _ddp_runs(rank), "fsdp2": _fsdp_runs(rank),
                   "fsdp2 direct use": _fsdp_direct_use_error(rank),
                   "tensor parallel": _tensor_parallel_error()}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        # leave without destroying the process group: a gloo group's destructor can deadlock on
        # the GIL with its worker threads (pytorch/pytorch#190489)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ddp_runs(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    results = {}
    for attach in ("before", "inner", "wrapper"):   # the model before DDP wraps it, ddp.module, ddp
        for mode in MODES:
            model = _build("seqmixer")
            if attach == "before":
                opt = _optimizer(model, model.parameters(), mode)
            ddp = DDP(model)
            if attach != "before":
                opt = _optimizer(model if attach == "inner" else ddp, ddp.parameters(), mode)
            history = []
            for step in range(STEPS):
                with ddp.no_sync():                     # accumulate locally ...
                    _backward(opt, ddp, rank, step, 0)
                _backward(opt, ddp, rank, step, 1)      # ... and average on the last one
                history.append({n: p.grad.clone() for n, p in model.named_parameters()})
                opt.step()
                opt.zero_grad()
            results[attach, mode] = history
    return results


def _fsdp_runs(rank: int) -> dict:
    results = {}
    for mode in MODES:
        model = _sharded_qwen3()
        results[mode] = _fsdp_train(model, _optimizer(model, model.parameters(), mode), rank, STEPS)
    # bf16 parameters in forward and backward, fp32 master weights and reduction
    from torch.distributed.fsdp import MixedPrecisionPolicy
    model = _sharded_qwen3(torch.float32, MixedPrecisionPolicy(torch.bfloat16, torch.float32))
    results["ntk bf16"] = _fsdp_train(model, _optimizer(model, model.parameters(), "ntk"), rank, 1)
    return results


def _fsdp_train(model: nn.Module, opt: ISOPO, rank: int, steps: int) -> list:
    history = []
    for step in range(steps):
        model.set_requires_gradient_sync(False)         # accumulate locally ...
        _backward(opt, model, rank, step, 0)
        model.set_requires_gradient_sync(True)          # ... reduce-scatter the sum
        _backward(opt, model, rank, step, 1)
        history.append({n: p.grad.full_tensor().double() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return history


def _sharded_qwen3(dtype=torch.float64, mp_policy=None) -> nn.Module:
    """Shard each decoder block and the root (tied embedding and head, final norm); the
    optimizer is built afterwards, on the sharded parameters, as FSDP2 requires."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model = _build("qwen3").to(dtype)
    policy = mp_policy or MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def _fsdp_direct_use_error(rank: int) -> str:
    """Under FSDP2 too, a weight used outside its module's forward (here the tied head, as a
    fused log-prob kernel would) is refused."""
    model = _sharded_qwen3()

    def fused_head_forward(input_ids):
        return model.model(input_ids=input_ids).last_hidden_state @ model.lm_head.weight.T

    model.forward = fused_head_forward            # FSDP2's hooks still gather around it
    opt = _optimizer(model, model.parameters(), "ntk")
    ids, _, A = _microbatch(rank, 0, 0)
    try:
        with opt.microbatch(A):
            model(ids).logsumexp(-1).mean().backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


def _tensor_parallel_error() -> str:
    """The error ISOPO gives for a layer that stays sharded during the forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    model = parallelize_module(nn.Sequential(nn.Linear(4, 4)), init_device_mesh("cpu", (WORLD,)),
                               {"0": ColwiseParallel()})
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        with opt.microbatch(torch.ones(3)):
            model(torch.randn(3, 4))
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What every rank recorded."""
    out = tmp_path_factory.mktemp("distributed")
    _spawn(_worker, out)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def test_ddp_averages_per_rank_isopo_gradients(ranks):
    expected = {mode: _expected("seqmixer", mode) for mode in MODES}
    for rank, results in enumerate(ranks):
        for (attach, mode), history in results["ddp"].items():
            for step, got in enumerate(history):
                _assert_close(got, expected[mode][step],
                              f"DDP rank {rank}, ISOPO attached {attach}, {mode}, step {step}")


def test_fsdp2_averages_per_rank_isopo_gradients(ranks):
    expected = {mode: _expected("qwen3", mode) for mode in MODES}
    for rank, results in enumerate(ranks):
        for mode in MODES:
            for step, got in enumerate(results["fsdp2"][mode]):
                _assert_close(got, expected[mode][step], f"FSDP2 rank {rank}, {mode}, step {step}")
        # bf16 rounding only: K and the solves run in fp32
        _assert_close(results["fsdp2"]["ntk bf16"][0], expected["ntk"][0],
                      f"FSDP2 bf16 rank {rank}", tol=5e-2)


def test_fsdp2_direct_use_of_a_weight_is_refused(ranks):
    for results in ranks:
        message = results["fsdp2 direct use"]
        assert "lm_head.weight' received a gradient that did not come from its module" in message


def test_tensor_parallel_is_refused(ranks):
    for results in ranks:
        assert "parameter '0.weight' is still a sharded DTensor" in results["tensor parallel"]
