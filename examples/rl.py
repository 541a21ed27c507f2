"""The RL loop the examples share: a batch of samples, one ISOPO or REINFORCE update per batch,
a results table and learning-curve plots."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_isopo import ISOPO


@dataclass
class Batch:
    """One batch of samples (completions or episodes) and their action rows."""

    inputs: Tensor            # what the policy reads: token ids (n, L) or states (R, d)
    actions: Tensor           # (R,) the sampled actions (completion tokens), one per row
    sample: Tensor            # (R,) the sample each row belongs to
    old_logp: Tensor          # (R, V) the sampling policy's log-probabilities at each row
    rewards: Tensor           # (n,)
    advantages: Tensor        # (n,)
    segments: Tensor | None   # what ISOPO's microbatch needs (None: dim 0 of the inputs)


def group_advantages(rewards: Tensor, group: int) -> Tensor:
    """GRPO advantages: rewards normalised within each group of consecutive samples."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)


def train(task, method: str, steps: int, lr: float, seed: int = 0, progress=None) -> dict:
    """Train a fresh policy with ``method`` ("reinforce", "ntk" or "fisher"); per-step history."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = task.policy()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if method != "reinforce":
        opt = ISOPO(model, opt, mode=method)
    hist = {"samples": [], "seconds": [], "cpu": [], "reward": []}
    clock = cpu = samples = 0.0
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = task.collect(model, gen)
        if method == "reinforce":                 # plain PyTorch: advantages in the loss
            logp, _ = task.logprobs(model, batch)
            (-(batch.advantages[batch.sample] * logp).mean()).backward()
        else:                                     # ISOPO: advantage-free loss
            with opt.microbatch(batch.advantages, segments=batch.segments):
                logp, _ = task.logprobs(model, batch)
                (-logp.mean()).backward()
        opt.step()
        opt.zero_grad()
        clock += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        samples += len(batch.rewards)
        for key, value in zip(hist, (samples, clock, cpu, batch.rewards.mean().item())):
            hist[key].append(value)
        if progress is not None:
            progress.set_postfix(reward=f"{hist['reward'][-1]:.3f}")
            progress.update()
    return hist


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over ``window`` steps."""
    return [sum(values[max(0, i - window + 1):i + 1]) / min(i + 1, window)
            for i in range(len(values))]


def first_reach(hist: dict, target: float, key: str) -> float:
    """``hist[key]`` at the first step whose smoothed reward reaches ``target`` (NaN: never)."""
    return next((x for x, r in zip(hist[key], smooth(hist["reward"])) if r >= target), math.nan)


def final_reward(hist: dict) -> float:
    """Mean batch reward over the last 10 steps."""
    return sum(hist["reward"][-10:]) / len(hist["reward"][-10:])


def report(task, runs: dict, out: str) -> None:
    """Print a results table and save learning curves (reward vs samples and vs seconds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"\n| method | final reward | {task.unit} to {task.target:g} | wall s to "
          f"{task.target:g} | wall s | CPU s |\n|---|---|---|---|---|---|")
    for name, hist in runs.items():
        samples, seconds = (first_reach(hist, task.target, k) for k in ("samples", "seconds"))
        print(f"| {name} | {final_reward(hist):.3f} | "
              f"{'never' if math.isnan(samples) else f'{samples:.0f}'} | "
              f"{'never' if math.isnan(seconds) else f'{seconds:.1f}'} | "
              f"{hist['seconds'][-1]:.1f} | {hist['cpu'][-1]:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for name, hist in runs.items():
        for ax, key in zip(axes, ("samples", "seconds")):
            ax.plot(hist[key], smooth(hist["reward"]), label=name)
    axes[0].set(xlabel=task.unit, ylabel="reward (5-step mean)", title=task.name)
    axes[1].set(xlabel="wall-clock seconds (sampling + update)")
    for ax in axes:
        ax.axhline(task.target, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nlearning curves: {out}")


def compare(task, methods: list[str], steps: int, lr: float, seed: int, out: str) -> dict:
    """Train one policy per method at the same budget, with a progress bar; table and plot."""
    from tqdm import tqdm

    for method in methods:        # one untimed step each: first-call imports and allocations
        train(task, method, 1, lr, seed)
    runs = {}
    for method in methods:
        name = "REINFORCE" if method == "reinforce" else f"ISOPO {method}"
        with tqdm(total=steps, desc=name) as bar:
            runs[name] = train(task, method, steps, lr, seed, bar)
    report(task, runs, out)
    return runs
