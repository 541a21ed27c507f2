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


def seed_mean(values: list[float], digits: int = 1) -> str:
    """The mean over seeds of a figure, skipping seeds where it is NaN (never reached)."""
    hit = [v for v in values if not math.isnan(v)]
    text = f"{sum(hit) / len(hit):.{digits}f}" if hit else "never"
    return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"


def report(task, runs: dict, out: str) -> None:
    """Print a results table (mean over seeds) and save the learning curves (mean and range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    print(f"\nMean over {len(next(iter(runs.values())))} seeds:\n\n"
          f"| method | final reward | {task.unit} to {task.target:g} | wall s to {task.target:g} "
          f"| wall s | CPU s |\n|---|---|---|---|---|---|")
    for name, hists in runs.items():
        finals = [final_reward(h) for h in hists]
        digits = 1 if task.target > 10 else 3
        print(f"| {name} | {seed_mean(finals, digits)} (min {min(finals):.{digits}f}) | "
              f"{seed_mean([first_reach(h, task.target, 'samples') for h in hists], 0)} | "
              f"{seed_mean([first_reach(h, task.target, 'seconds') for h in hists])} | "
              f"{seed_mean([h['seconds'][-1] for h in hists])} | {seed_mean([h['cpu'][-1] for h in hists])} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for i, (name, hists) in enumerate(runs.items()):
        R = np.array([smooth(h["reward"]) for h in hists])
        for ax, key in zip(axes, ("samples", "seconds")):
            x = np.mean([h[key] for h in hists], 0)
            ax.plot(x, R.mean(0), color=f"C{i}", label=name)
            ax.fill_between(x, R.min(0), R.max(0), color=f"C{i}", alpha=0.2)
    axes[0].set(xlabel=task.unit, ylabel="reward (5-step mean)",
                title=f"{task.name}: mean and range of {len(hists)} seeds")
    axes[1].set(xlabel="wall-clock seconds (sampling + update)")
    for ax in axes:
        ax.axhline(task.target, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nlearning curves: {out}")


def compare(task, methods: list[str], steps: int, lr: float, seeds: int, out: str) -> dict:
    """Train each method from the same ``seeds`` at the same budget, with progress bars; print a
    table and save a plot. Returns ``{method name: [history per seed]}``."""
    from tqdm import tqdm

    for method in methods:        # one untimed step each: first-call imports and allocations
        train(task, method, 1, lr)
    runs = {}
    for method in methods:
        name = "REINFORCE" if method == "reinforce" else f"ISOPO {method}"
        runs[name] = []
        for seed in range(seeds):
            with tqdm(total=steps, desc=f"{name}, seed {seed}") as bar:
                runs[name].append(train(task, method, steps, lr, seed, bar))
    report(task, runs, out)
    return runs
