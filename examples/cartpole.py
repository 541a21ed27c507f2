"""CartPole with an MLP policy: ISOPO against REINFORCE, one advantage per episode.

    python examples/cartpole.py            # ISOPO (ntk) and REINFORCE, 3 seeds each: ~2 min
    python examples/cartpole.py --methods fisher ntk reinforce --steps 80

Each step plays ``episodes`` episodes of CartPole-v1. An episode is one sample: its
advantage is its return, normalised over the batch, and its states are rows of the policy's
``(R, 4)`` input, grouped into samples by ISOPO's ``segments`` (one episode id per row).
"""
from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rl import Batch, compare


class CartPoleTask:
    """A batch of CartPole-v1 episodes; reward = episode return (at most 500)."""

    name, target, unit = "CartPole-v1", 450.0, "episodes"

    def __init__(self, episodes: int = 16, hidden: int = 64):
        self.envs = [gym.make("CartPole-v1") for _ in range(episodes)]
        self.batch_size = episodes
        self.hidden = hidden

    def policy(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(nn.Linear(4, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                             nn.Linear(h, 2))

    @torch.no_grad()
    def collect(self, model: nn.Module, gen: torch.Generator) -> Batch:
        """Play every env to the end of one episode, stepping the live ones together."""
        seeds = torch.randint(2**31, (len(self.envs),), generator=gen).tolist()
        obs = [env.reset(seed=s)[0] for env, s in zip(self.envs, seeds)]
        returns = np.zeros(len(self.envs))
        live = list(range(len(self.envs)))
        states, actions, sample, old = [], [], [], []
        while live:
            x = torch.as_tensor(np.stack([obs[i] for i in live]), dtype=torch.float32)
            logp = model(x).log_softmax(-1)
            a = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
            states.append(x), actions.append(a), old.append(logp)
            sample.append(torch.tensor(live))
            still = []
            for i, ai in zip(live, a.tolist()):
                obs[i], r, terminated, truncated, _ = self.envs[i].step(ai)
                returns[i] += r
                if not (terminated or truncated):
                    still.append(i)
            live = still
        R = torch.tensor(returns, dtype=torch.float32)
        sample = torch.cat(sample)
        return Batch(torch.cat(states), torch.cat(actions), sample, torch.cat(old), R,
                     (R - R.mean()) / (R.std() + 1e-6), sample)

    def logprobs(self, model: nn.Module, batch: Batch, idx: torch.Tensor | None = None):
        """Log-probs ``(R,)`` of the taken actions and ``(R, 2)`` of both actions, for the rows
        of the episodes ``idx`` (all by default) in batch order."""
        rows = slice(None) if idx is None else torch.isin(batch.sample, idx)
        logp = model(batch.inputs[rows]).log_softmax(-1)
        return logp.gather(1, batch.actions[rows, None]).squeeze(1), logp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ntk", "reinforce"],
                   choices=["ntk", "fisher", "reinforce"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--episodes", type=int, default=16, help="episodes per step")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0, 1, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="cartpole.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = CartPoleTask(args.episodes)
    return compare(task, args.methods, args.steps, args.lr, args.seeds, args.out)


if __name__ == "__main__":
    main()
