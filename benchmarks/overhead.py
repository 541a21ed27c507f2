"""Step time and peak memory of ISOPO against plain REINFORCE, on the same model and batch.

    python benchmarks/overhead.py                      # CPU: small Qwen3-shaped model
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
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, vocab_size=151936,
                 intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, B=8, L=1024),
}
METHODS = ["reinforce", "ntk", "fisher", "reference-style"]


def build(size: str, device: str, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = dict(SIZES[size])
    B, L = cfg.pop("B"), cfg.pop("L")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg, tie_word_embeddings=True,
                                         attn_implementation="sdpa")).to(device, dtype)
    ids = torch.randint(0, cfg["vocab_size"], (B, L), device=device)
    mask = torch.ones(B, L, device=device)
    mask[:, : L // 8] = 0                        # prompt tokens carry no loss
    mask[1::2, -L // 4:] = 0                     # right-padded completions
    A = torch.randn(B, device=device)
    return model, ids, mask, A


def token_logp(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def make_step(method: str, model, ids, mask, A):
    m = mask[:, 1:]
    ntok = m.sum()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if method == "reinforce":
        def step():
            (-(A[:, None] * token_logp(model, ids) * m).sum() / ntok).backward()
            inner.step(); inner.zero_grad()
        return step
    if method in ("ntk", "fisher"):
        from torch_isopo import ISOPO
        opt = ISOPO(model, inner, mode=method)

        def step():
            with opt.microbatch(A):
                (-(token_logp(model, ids) * m).sum() / ntok).backward()
            opt.step(); opt.zero_grad()
        return step
    return reference_style_step(model, inner, ids, m, ntok, A)


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


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(args, dtype):
    steps = {}
    for method in args.methods:
        model, ids, mask, A = build(args.size, args.device, dtype)
        steps[method] = make_step(method, model, ids, mask, A)
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
           args.dtype, "--memory-of", method, "--warmup", "1"]
    # a fixed mmap threshold makes freed tensors leave the resident set, so its peak is the
    # peak of live memory rather than of the allocator's retained arenas
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def measure_one(args, dtype):
    model, ids, mask, A = build(args.size, args.device, dtype)
    step = make_step(args.memory_of, model, ids, mask, A)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.memory_of:
        return measure_one(args, dtype)
    times, cpu, rt, rc = time_methods(args, dtype)
    mems = {m: peak_memory(args, m) for m in args.methods}
    base_m = mems["reinforce"]
    print(f"{args.size} model, {args.device}, {args.dtype}, {args.repeats} interleaved rounds; "
          "step s / cpu s: medians of wall and process CPU time; × time / × cpu: median over "
          "rounds of the ratio to REINFORCE in the same round")
    print(f"{'method':<16}{'step s':>8}{'× time':>8}{'cpu s':>8}{'× cpu':>7}{'peak MiB':>10}"
          f"{'× mem':>7}")
    for m in args.methods:
        print(f"{m:<16}{times[m]:>8.3f}{rt[m]:>8.2f}{cpu[m]:>8.3f}{rc[m]:>7.2f}"
              f"{mems[m] / 2**20:>10.1f}{mems[m] / base_m:>7.2f}")
    if "reference-style" in times and "ntk" in times:
        print(f"reference-style / ntk: {rt['reference-style'] / rt['ntk']:.2f}× (time), "
              f"{rc['reference-style'] / rc['ntk']:.2f}× (cpu)")


if __name__ == "__main__":
    main()
