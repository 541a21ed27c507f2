"""Stable-Baselines3 PPO on CartPole-v1: stock ``PPO`` against ``ISOPOPPO`` (one name changed).

    python examples/sb3_ppo.py                       # 2 learning rates, 3 seeds each, one thread
    python examples/sb3_ppo.py --steps 20000 --seeds 1 --lrs 3e-3 --modes ntk reinforce

Both train the same ``MlpPolicy`` with the same hyperparameters and seeds, at each learning rate
of ``--lrs``; ``ISOPOPPO`` applies ISOPO (``--modes``, damping ``--damping``) to the
policy-gradient term of every minibatch step, the value loss keeping its plain gradient. The score
after every rollout is the mean return of the last 20 finished episodes. Prints a results table
and saves the learning curves (``--out``).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from rl import seed_mean
from torch_isopo.integrations.sb3 import ISOPOPPO

TARGET = 475.0          # CartPole-v1 counts as solved at a mean return of 475


class Curve(BaseCallback):
    """After every rollout: env steps, the mean return of the last 20 episodes, seconds."""

    def __init__(self, bar=None):
        super().__init__()
        self.hist = {"steps": [], "return": [], "seconds": [], "cpu": []}
        self.bar = bar

    def _on_training_start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _on_rollout_end(self) -> None:
        episodes = [e["r"] for e in list(self.model.ep_info_buffer)[-20:]]
        if not episodes:
            return
        for key, value in (("steps", self.num_timesteps), ("return", float(np.mean(episodes))),
                           ("seconds", time.perf_counter() - self.t0),
                           ("cpu", time.process_time() - self.c0)):
            self.hist[key].append(value)
        if self.bar is not None:
            self.bar.set_postfix(ret=f"{self.hist['return'][-1]:.0f}")
            self.bar.update(self.num_timesteps - self.bar.n)

    def _on_step(self) -> bool:
        return True


def train(mode: str | None, lr: float, seed: int, args, bar=None) -> dict:
    """One run: stock PPO (``mode`` None) or ISOPOPPO in ``mode``."""
    kw = dict(n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.epochs,
              learning_rate=lr, gamma=0.98, gae_lambda=0.8, ent_coef=0.0, seed=seed,
              device="cpu")
    env = make_vec_env("CartPole-v1", n_envs=args.envs, seed=seed)
    if mode is None:
        model = PPO("MlpPolicy", env, **kw)
    else:
        model = ISOPOPPO("MlpPolicy", env, isopo_mode=mode, isopo_damping=args.damping, **kw)
    curve = Curve(bar)
    model.learn(args.steps, callback=curve)
    return curve.hist


def first_reach(hist: dict, key: str) -> float:
    return next((x for x, r in zip(hist[key], hist["return"]) if r >= TARGET), math.nan)


def report(runs: dict, out: str) -> None:
    """Print a results table (mean over seeds) and save the learning curves (mean and range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"\nMean over {len(next(iter(runs.values())))} seeds (return: last 20 episodes):\n\n"
          f"| method | final return | env steps to {TARGET:g} | wall s to {TARGET:g} | wall s "
          "| CPU s |\n|---|---|---|---|---|---|")
    for name, hists in runs.items():
        finals = [h["return"][-1] for h in hists]
        print(f"| {name} | {seed_mean(finals, 1)} (min {min(finals):.1f}) | "
              f"{seed_mean([first_reach(h, 'steps') for h in hists], 0)} | "
              f"{seed_mean([first_reach(h, 'seconds') for h in hists], 1)} | "
              f"{seed_mean([h['seconds'][-1] for h in hists], 1)} | "
              f"{seed_mean([h['cpu'][-1] for h in hists], 1)} |")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    lrs = list(dict.fromkeys(name.split(", lr ")[1] for name in runs))
    methods = list(dict.fromkeys(name.split(", lr ")[0] for name in runs))
    for name, hists in runs.items():
        method, lr = name.split(", lr ")
        color, ls = f"C{lrs.index(lr)}", ["--", "-", ":", "-."][methods.index(method) % 4]
        n = min(len(h["return"]) for h in hists)
        R = np.array([h["return"][:n] for h in hists])
        for ax, key in zip(axes, ("steps", "seconds")):
            x = np.mean([h[key][:n] for h in hists], 0)
            ax.plot(x, R.mean(0), color=color, ls=ls, label=name)
            ax.fill_between(x, R.min(0), R.max(0), color=color, alpha=0.12)
    axes[0].set(xlabel="env steps", ylabel="return (last 20 episodes)",
                title=f"CartPole-v1, SB3 PPO: mean and range of {len(hists)} seeds")
    axes[1].set(xlabel="wall-clock seconds (rollouts + updates)")
    for ax in axes:
        ax.axhline(TARGET, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nlearning curves: {out}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["ntk"], choices=["ntk", "fisher", "reinforce"],
                   help="ISOPO modes to run beside stock PPO")
    p.add_argument("--damping", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50_000, help="env steps per run")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--n-steps", type=int, default=32, help="rollout steps per env")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="Adam learning rates")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0, 1, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="sb3_ppo.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    runs = {}
    for lr in args.lrs:
        for mode in [None, *args.modes]:
            name = ("PPO" if mode is None else f"ISOPOPPO {mode}") + f", lr {lr:g}"
            runs[name] = []
            for seed in range(args.seeds):
                with tqdm(total=args.steps, desc=f"{name}, seed {seed}") as bar:
                    runs[name].append(train(mode, lr, seed, args, bar))
    report(runs, args.out)
    return runs


if __name__ == "__main__":
    main()
