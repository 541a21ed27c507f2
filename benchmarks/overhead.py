"""Step time and peak memory of ISOPO against plain REINFORCE, on the same model and batch.

    python benchmarks/overhead.py                      # CPU: small Qwen3-shaped model
    python benchmarks/overhead.py --size short         # the same, 64 sequences of 64 tokens
    python benchmarks/overhead.py --size tiny          # 2-layer d=48 transformer, microbatches of 8
    python benchmarks/overhead.py --size mlp --n 8 32 128 512    # MLP policy, a row per sample
    python benchmarks/overhead.py --size 0.6b --device cuda --dtype bf16   # GPU: Qwen3-0.6B shape

One step is forward + backward + inner AdamW step. Methods: plain REINFORCE (advantages in the
loss, plain autograd), ISOPO ``ntk`` and ``fisher``, and a reference-style baseline (per-sequence
gradients built in a Python loop from cloned activations, standard gradients computed and then
overwritten). Times are medians over interleaved repeats; peak memory is measured per method in
a fresh process (CUDA: ``max_memory_allocated``; CPU: peak resident memory above the resident
memory after setup, with glibc's mmap threshold fixed so freed tensors are returned). Ratios are against plain REINFORCE from the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

SIZES = {  # Qwen3-shaped, random init
    "small": dict(hidden_size=256, num_hidden_layers=4, vocab_size=2048, intermediate_size=768,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, B=8, L=256),
    "short": dict(hidden_size=256, num_hidden_layers=4, vocab_size=2048, intermediate_size=768,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, B=64, L=64),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, vocab_size=151936,
                 intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, B=8, L=1024),
}
METHODS = ["reinforce", "ntk", "fisher", "reference-style"]


def build(size: str, device: str, dtype: torch.dtype, n: int = 32):
    if size == "tiny":
        return _tiny(device, dtype)
    if size == "mlp":
        return _mlp(device, dtype, n)
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = dict(SIZES[size])
    B, L = cfg.pop("B"), cfg.pop("L")
    torch.manual_seed(0)
    with torch.device(device):                   # initialised where it runs: fast on a GPU
        model = Qwen3ForCausalLM(Qwen3Config(**cfg, tie_word_embeddings=True,
                                             attn_implementation="sdpa")).to(dtype)
    ids = torch.randint(0, cfg["vocab_size"], (B, L), device=device)
    mask = torch.ones(B, L, device=device)
    mask[:, : L // 8] = 0                        # prompt tokens carry no loss
    mask[1::2, -L // 4:] = 0                     # right-padded completions
    A = torch.randn(B, device=device)
    return model, ids, mask, A


def _tiny(device, dtype):
    """The README example's transformer at d = 48: 128 sequences of 17 tokens, in 16
    microbatches of 8 (one AdamW step per 128)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from tiny_lm import VOCAB, TinyLM
    torch.manual_seed(0)
    model = TinyLM(d=48).to(device, dtype)
    ids = torch.randint(0, VOCAB, (128, 17), device=device)
    mask = torch.ones(128, 17, device=device)
    mask[:, :6] = 0                              # the prompt: 5 digits and the separator
    return model, ids, mask, torch.randn(128, device=device)


class _MLPPolicy(nn.Module):
    """An 8-64-64-4 tanh policy over discrete actions; ``input_ids`` are observations here."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 4))

    def forward(self, input_ids):
        return self.net(input_ids)


def _mlp(device, dtype, n):
    torch.manual_seed(0)
    x = torch.randn(n, 8, device=device, dtype=dtype)
    return _MLPPolicy().to(device, dtype), x, None, torch.randn(n, device=device)


def microbatches(size, ids, mask, A):
    """The microbatches of one update: one for every size but ``tiny`` (16 of 8)."""
    if size != "tiny":
        return [(ids, mask, A)]
    return [(ids[i:i + 8], mask[i:i + 8], A[i:i + 8]) for i in range(0, ids.shape[0], 8)]


def token_logp(model, ids):
    if isinstance(model, _MLPPolicy):             # a row per sample: the first action's log-prob
        return torch.log_softmax(model(ids).float(), -1)[:, :1]
    if not hasattr(model, "config"):              # the tiny transformer takes the ids directly
        logits = model(ids)[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def make_step(method: str, model, ids, mask, A, size: str = "small"):
    """One update: forward and backward of every microbatch, then the AdamW step (for ``mlp``,
    forward and backward only: the cost per backward of a policy)."""
    parts = []
    for i, k, a in microbatches(size, ids, mask, A):
        m = torch.ones(i.shape[0], 1, device=i.device) if k is None else k[:, 1:]
        parts.append((i, m, m.sum(), a))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-6)
    update = size != "mlp"
    if method == "reinforce":
        def step():
            for i, m, ntok, a in parts:
                (-(a[:, None] * token_logp(model, i) * m).sum() / ntok).backward()
            if update:
                inner.step()
            inner.zero_grad()
        return step
    if method in ("ntk", "fisher"):
        from torch_isopo import ISOPO
        opt = ISOPO(model, inner, mode=method)

        def step():
            for i, m, ntok, a in parts:
                with opt.microbatch(a):
                    (-(token_logp(model, i) * m).sum() / ntok).backward()
            if update:
                opt.step()
            opt.zero_grad()
        return step
    i, m, ntok, a = parts[0]
    if method == "floor":
        return floor_step(model, i, a)
    return reference_style_step(model, inner, i, m, ntok, a)


class _Tap(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward keeps ``(x, δ)`` and makes no weight gradient."""

    @staticmethod
    def forward(ctx, x, w, b, taps):
        ctx.save_for_backward(x, w)
        ctx.taps = taps
        return torch.addmm(b, x, w.T)

    @staticmethod
    def backward(ctx, d):
        x, w = ctx.saved_tensors
        ctx.taps.append((x, d))
        return d @ w, None, None, None


def floor_step(model, x, A, damping=1.0):
    """The least eager PyTorch that makes ISOPO's ``ntk`` gradient of the MLP policy (its math
    written out for this model alone, no checks): what ISOPO costs at best on it without native
    code. Each row a sample, so per layer ``K = (ΔΔᵀ) ⊙ (XXᵀ + 1)``; one batched solve; the
    gradient ``(Δ ⊙ c)ᵀ[X, 1]``. Its gradients are checked against ``ntk``'s once (``main``)."""
    linears = [mod for mod in model.net if isinstance(mod, nn.Linear)]
    n, A64 = len(A), A.double()
    ones = torch.ones(n, n, device=x.device, dtype=x.dtype)

    def step(keep=False):
        taps, h = [], x
        for mod in model.net:
            h = _Tap.apply(h, mod.weight, mod.bias, taps) if isinstance(mod, nn.Linear) else mod(h)
        (-torch.log_softmax(h.float(), -1)[:, :1].sum() / n).backward()
        taps.reverse()
        K = torch.stack([torch.addmm(ones, a, a.T).mul_(d @ d.T) for a, d in taps]).double()
        rho = K.diagonal(dim1=-2, dim2=-1).sum(-1) * (damping / n)
        K.diagonal(dim1=-2, dim2=-1).add_(rho[:, None])
        c = (torch.linalg.solve_ex(K, A64.expand(len(taps), -1))[0] * rho[:, None]).to(x.dtype)
        for mod, (a, d), cl in zip(linears, taps, c):
            s = d * cl[:, None]
            mod.weight.grad, mod.bias.grad = s.T @ a, s.sum(0)
        if not keep:
            for p in model.parameters():
                p.grad = None
    return step


def check_floor(dtype, n):
    """The floor makes ISOPO's gradients (else its times would mean nothing)."""
    from torch_isopo import ISOPO
    floor_model, x, _, A = build("mlp", "cpu", dtype, n)
    floor_step(floor_model, x, A)(keep=True)
    model = build("mlp", "cpu", dtype, n)[0]
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.0))
    with opt.microbatch(A):
        (-token_logp(model, x).sum() / n).backward()
    for p, q in zip(floor_model.parameters(), model.parameters()):
        if not torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6 * float(q.grad.abs().max())):
            raise AssertionError("the floor's gradients differ from ISOPO's")


def reference_style_step(model, inner, ids, m, ntok, A, damping=1.0):
    """The public reference code's approach: hooks clone every linear layer's input and output
    gradient, per-sequence gradients are formed in a Python loop, and the standard gradients that
    autograd already computed are overwritten."""
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    saved = {}

    def fwd(mod, inp, out):
        saved[mod] = [inp[0].detach().clone(), None]

    def bwd(mod, gin, gout):
        saved[mod][1] = gout[0].detach().clone()
    hooks = [h for mod in linears for h in (mod.register_forward_hook(fwd),
                                            mod.register_full_backward_hook(bwd))]

    def step():
        (-(token_logp(model, ids) * m).sum() / ntok).backward()
        for mod in linears:
            a, d = saved[mod]
            G = torch.stack([(d[i].T.float() @ a[i].float()).flatten() for i in range(a.shape[0])])
            K = G @ G.T
            rho = damping * K.trace() / len(A)
            c = rho * torch.linalg.solve(K + rho * torch.eye(len(A), device=K.device), A.float())
            mod.weight.grad = (c @ G).view_as(mod.weight).to(mod.weight.dtype)
        saved.clear()
        inner.step(); inner.zero_grad()
    step.hooks = hooks
    return step


def settle_allocator() -> None:
    """Free one 30 MB host buffer before timing: glibc's malloc then keeps freed memory for reuse
    instead of returning it to the system after every step (its thresholds rise the first time it
    frees a large block), as in any process that has held a large buffer. Without it, the small
    sizes' transient tensors are page-faulted afresh at every step, and a size's result depends
    on what ran before it in the process (policies.py does the same)."""
    torch.empty(30 << 20, dtype=torch.uint8)     # allocated and freed at once


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(args, dtype):
    settle_allocator()
    steps = {}
    for method in args.methods:
        model, ids, mask, A = build(args.size, args.device, dtype, args.n)
        steps[method] = make_step(method, model, ids, mask, A, args.size)
        for _ in range(args.warmup):
            steps[method]()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(args.repeats):                  # interleaved
        for method, step in steps.items():
            sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            step()
            sync(args.device)
            wall[method].append(time.perf_counter() - t)
            cpu[method].append(time.process_time() - c)
    def paired(d):  # per round, time / REINFORCE's time in the same round: robust to drift
        return {k: statistics.median(a / b for a, b in zip(v, d["reinforce"])) for k, v in d.items()}
    median = lambda d: {k: statistics.median(v) for k, v in d.items()}
    return median(wall), median(cpu), paired(wall), paired(cpu)


def peak_memory(args, method):
    """Peak memory of one method, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--dtype",
           args.dtype, "--memory-of", method, "--warmup", "1", "--n", str(args.n)]
    # a fixed mmap threshold makes freed tensors leave the resident set, so its peak is the
    # peak of live memory rather than of the allocator's retained arenas
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def measure_one(args, dtype):
    model, ids, mask, A = build(args.size, args.device, dtype, args.n)
    step = make_step(args.memory_of, model, ids, mask, A, args.size)
    if args.device == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss()
        for _ in range(2):
            step()
        peak = _status_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak": peak}))


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    """A field of /proc/self/status (VmHWM: this process image's peak resident memory, which
    unlike ru_maxrss does not inherit the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def count_ops(args, dtype):
    """Dispatched aten ops (kernel launches on a GPU) per ISOPO layer and microbatch, beyond
    plain REINFORCE's: counted with a ``TorchDispatchMode`` over one update; and the Python
    function calls of one update (``cProfile``), the host-side work besides the ops. Both are
    counts, the same on any machine and under any load."""
    import cProfile
    import pstats

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))
    counts, calls = {}, {}
    for method in ("reinforce", "ntk", "fisher"):
        model, ids, mask, A = build(args.size, args.device, dtype, args.n[0])
        step = make_step(method, model, ids, mask, A, args.size)
        step()
        with Count() as c:
            step()
        counts[method] = c.n
        prof = cProfile.Profile()
        prof.runcall(step)
        calls[method] = sum(v[1] for v in pstats.Stats(prof).stats.values())
    from torch_isopo.layers import find_layers
    layers = len(find_layers(build(args.size, args.device, dtype, args.n[0])[0]))
    mbs = len(microbatches(args.size, ids, mask, A))
    print(f"{args.size}: {layers} ISOPO layers, {mbs} microbatch(es) per update; aten ops and "
          "Python calls per update (REINFORCE: plain autograd)")
    for method, n in counts.items():
        extra = (n - counts["reinforce"]) / (layers * mbs)
        print(f"  {method:<10}{n:>8} ops ({extra:+.1f} per layer and microbatch)"
              f"{calls[method]:>8} calls")


def profile(args, dtype):
    """Where one update's time goes, per method: ``torch.profiler`` tables of the ops by device
    time and by host time, and the device's busy time against the wall time."""
    from torch.profiler import ProfilerActivity, profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for method in args.methods:
        model, ids, mask, A = build(args.size, args.device, dtype, args.n[0])
        step = make_step(method, model, ids, mask, A, args.size)
        for _ in range(2):
            step()
        sync(args.device)
        if args.device == "cuda":           # host syncs of one update, with where they happen
            import collections
            import warnings
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            torch.cuda.set_sync_debug_mode(0)
            where = collections.Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in caught)
            print(f"== {args.size} {method}: {len(caught)} host syncs {dict(where.most_common(8))}")
        t = time.perf_counter()
        with prof(activities=acts) as p:
            step()
            sync(args.device)
        wall = (time.perf_counter() - t) * 1e3
        ev = p.key_averages()
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                   for e in ev) / 1e3
        print(f"== {args.size} {method}: wall {wall:.1f} ms (profiled), device busy {busy:.1f} ms")
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(ev.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        if args.device == "cuda":
            print(ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        del model, step
        if args.device == "cuda":
            torch.cuda.empty_cache()


def routes(args, dtype):
    """Time of one ntk backward of a linear layer by each route, for samples of L rows."""
    from torch_isopo import ISOPO
    print("route crossover: one Linear(d, d), n samples of L rows, ntk, ms per forward+backward")
    print(f"{'d':>5}{'n':>5}{'L':>6}{'gram':>9}{'mat':>9}  {'faster':<17}auto picks")
    for d in (64, 256):
        for n in (8, 32):
            for L in (1, 4, 16, 64, 256):
                x = torch.randn(n, L, d, dtype=dtype)
                res = {}
                for route in ("gram", "materialise"):
                    torch.manual_seed(0)
                    lin = nn.Linear(d, d).to(dtype)
                    opt = ISOPO(lin, torch.optim.SGD(lin.parameters(), lr=0.0), route=route,
                                gates="layer")
                    A = torch.randn(n)

                    def f():
                        with opt.microbatch(A):
                            lin(x).square().sum().backward()
                        opt.zero_grad()
                    f()
                    ts = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        f()
                        ts.append(time.perf_counter() - t)
                    res[route] = statistics.median(ts) * 1e3
                N, P = n * L, d
                auto = "gram" if N * N * (P + d) < N * P * d + n * n * P * d else "materialise"
                faster = min(res, key=res.get)
                if L == 1:                    # one row per sample: K from the two Grams either way
                    faster = auto = "same products"
                elif N * N * 8 > opt.memory_budget:   # the token Gram is over the memory budget
                    faster, auto = "gram falls back", "materialise"
                print(f"{d:>5}{n:>5}{L:>6}{res['gram']:>9.2f}{res['materialise']:>9.2f}  "
                      f"{faster:<17}{auto}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=[*SIZES, "tiny", "mlp"], default="small")
    p.add_argument("--n", type=int, nargs="+", default=[32], help="samples of --size mlp")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=[*METHODS, "floor"], default=METHODS,
                   help="floor (--size mlp): ISOPO's ntk math hand-written for the MLP alone")
    p.add_argument("--memory-of", choices=[*METHODS, "floor"], help=argparse.SUPPRESS)
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory runs (time only)")
    p.add_argument("--ops", action="store_true", help="count dispatched ops per layer instead")
    p.add_argument("--routes", action="store_true", help="time the two routes for K instead")
    p.add_argument("--profile", action="store_true", help="profile one update per method instead")
    p.add_argument("--rows", type=int, default=25, help="rows of each --profile table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.size != "mlp" and "reference-style" not in args.methods and len(args.n) > 1:
        p.error("--n takes several values for --size mlp only")
    if "floor" in args.methods and args.size != "mlp":
        p.error("--methods floor is for --size mlp")
    if args.memory_of:
        args.n = args.n[0]
        return measure_one(args, dtype)
    if args.ops:
        return count_ops(args, dtype)
    if args.routes:
        return routes(args, dtype)
    if args.profile:
        return profile(args, dtype)
    if args.size == "mlp" and "reference-style" in args.methods:
        args.methods = [m for m in args.methods if m != "reference-style"]
    for n in args.n:
        report(args, dtype, n)


def report(args, dtype, n):
    args = argparse.Namespace(**{**vars(args), "n": n})
    if "floor" in args.methods:
        check_floor(dtype, n)
    times, cpu, rt, rc = time_methods(args, dtype)
    mems = {m: peak_memory(args, m) if args.memory else math.nan for m in args.methods}
    base_m = mems["reinforce"]
    what = f"{args.size} model" + (f", n = {args.n}" if args.size == "mlp" else "")
    print(f"{what}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds; "
          "step ms / cpu ms: medians of wall and process CPU time; × time / × cpu: median over "
          "rounds of the ratio to REINFORCE in the same round")
    print(f"{'method':<16}{'step ms':>9}{'× time':>8}{'cpu ms':>9}{'× cpu':>7}{'peak MiB':>10}"
          f"{'× mem':>7}")
    for m in args.methods:
        print(f"{m:<16}{times[m] * 1e3:>9.2f}{rt[m]:>8.2f}{cpu[m] * 1e3:>9.2f}{rc[m]:>7.2f}"
              f"{mems[m] / 2**20:>10.1f}{mems[m] / base_m:>7.2f}")
    if "reference-style" in times and "ntk" in times:
        print(f"reference-style / ntk: {rt['reference-style'] / rt['ntk']:.2f}× (time), "
              f"{rc['reference-style'] / rc['ntk']:.2f}× (cpu)")


if __name__ == "__main__":
    main()
