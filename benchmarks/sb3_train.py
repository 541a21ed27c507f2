"""The cost of one Stable-Baselines3 ``train()`` call: stock PPO against ISOPOPPO.

    python benchmarks/sb3_train.py                   # CnnPolicy and MlpLstmPolicy, one thread
    python benchmarks/sb3_train.py --cases cnn --rounds 3

Each case collects one rollout with the stock algorithm, then times ``train()`` on copies of that
model and rollout: stock, ISOPO ``reinforce`` and ISOPO ``ntk`` (damping 1), in interleaved
rounds. It also times the policy-gradient step alone on one minibatch (forward of the actor and
backward; best of 3 per round): plain autograd with the advantages in the loss, and ISOPO ``ntk``.
The table reports the median time of each and the median over rounds of the ratio of times
measured in the same round.

* ``cnn``: ``PPO("CnnPolicy")`` (NatureCNN) on 36×36 grey images, 8 envs × 32 steps,
  minibatches of 64, 4 epochs (16 steps).
* ``lstm``: ``RecurrentPPO("MlpLstmPolicy")`` on CartPole-v1, 8 envs × 32 steps, minibatches of
  64 rows, 4 epochs; a minibatch holds sequences of up to 32 steps.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

warnings.filterwarnings("ignore", category=UserWarning)


class Frames(gym.Env):
    """Random 36×36 grey images (NatureCNN's smallest input), two actions, episodes of 8 steps."""

    observation_space = gym.spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(action), False, self.t >= 8, {}


def build(case: str, n_steps: int):
    """``(stock class, ISOPO class, policy, env, kwargs, a stock model with one rollout)``."""
    from torch_isopo.integrations import sb3
    kw = dict(n_steps=n_steps, batch_size=64, n_epochs=4, seed=0, device="cpu")
    if case == "cnn":
        stock_cls, cls, policy, env = PPO, sb3.ISOPOPPO, "CnnPolicy", make_vec_env(Frames, 8, 0)
    else:
        from sb3_contrib import RecurrentPPO
        stock_cls, cls, policy = RecurrentPPO, sb3.ISOPORecurrentPPO, "MlpLstmPolicy"
        env = make_vec_env("CartPole-v1", 8, 0)
    model = stock_cls(policy, env, **kw)
    model.train = lambda: None
    model.learn(n_steps * 8)
    del model.train
    return stock_cls, cls, policy, env, kw, model


def timed(model, seed: int = 0) -> float:
    np.random.seed(seed)
    torch.manual_seed(seed)
    t = time.perf_counter()
    model.train()
    return time.perf_counter() - t


def pg_step(model, mb: dict, isopo: bool) -> float:
    """Seconds of one policy-gradient forward + backward on the minibatch ``mb`` (the
    integration's own forward of the actor): plain autograd with the advantages in the loss, or
    the advantage-free loss inside the ISOPO microbatch."""
    model.policy.zero_grad()
    t = time.perf_counter()
    if isopo:
        with model.isopo.microbatch(mb["sample_advantages"], mb["segments"]):
            (-(mb["weights"] * mb["log_prob"]()).sum()).backward()
    else:
        (-(mb["weights"] * mb["advantages"] * mb["log_prob"]()).sum()).backward()
    return time.perf_counter() - t


def run(case: str, rounds: int, n_steps: int = 32) -> dict:
    stock_cls, cls, policy, env, kw, stock = build(case, n_steps)
    state = copy.deepcopy(stock.policy.state_dict())
    variants = {"stock": stock}
    for mode in ("reinforce", "ntk"):
        m = cls(policy, env, isopo_mode=mode, **kw)
        m.policy.load_state_dict(state)
        variants[mode] = m
    ntk = variants["ntk"]
    np.random.seed(0)
    data = next(iter(stock.rollout_buffer.get(kw["batch_size"])))
    actions = data.actions.long().flatten()
    mb = ntk._minibatch(data, actions)
    n = len(mb["sample_advantages"])
    times = {k: [] for k in [*variants, "pg plain", "pg ntk"]}
    for r in range(rounds + 1):                    # round 0 warms up
        for name, m in variants.items():
            m.policy.load_state_dict(state)
            m.policy.optimizer.state.clear()
            m.rollout_buffer = copy.deepcopy(stock.rollout_buffer)
            m.set_logger(configure(None, []))
            t = timed(m)
            if r:
                times[name].append(t)
        # plain last: SB3's distribution object keeps the last forward's tensors, and ISOPO's
        # graph kept there would hold the policy in a cycle through autograd
        for name, isopo in (("pg ntk", True), ("pg plain", False)):
            t = min(pg_step(ntk, mb, isopo) for _ in range(3))
            if r:
                times[name].append(t)
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times[base]))
             for k, base in (("reinforce", "stock"), ("ntk", "stock"), ("pg ntk", "pg plain"))}
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "ratio": ratio,
            "n": n, "rows": len(actions)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["cnn", "lstm"], choices=["cnn", "lstm"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n-steps", type=int, default=32, help="rollout steps per env (8 envs)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    print("| policy | train() stock s | ISOPO reinforce s | ISOPO ntk s | reinforce / stock "
          "| ntk / stock | policy-gradient step: samples (rows) | plain ms | ISOPO ntk ms "
          "| ntk / plain |\n|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        r = results[case] = run(case, args.rounds, args.n_steps)
        name = {"cnn": "PPO CnnPolicy", "lstm": "RecurrentPPO MlpLstmPolicy"}[case]
        med, ratio = r["median"], r["ratio"]
        print(f"| {name} | {med['stock']:.2f} | {med['reinforce']:.2f} | {med['ntk']:.2f} | "
              f"{ratio['reinforce']:.2f}× | {ratio['ntk']:.2f}× | {r['n']} ({r['rows']}) | "
              f"{1e3 * med['pg plain']:.1f} | {1e3 * med['pg ntk']:.1f} | "
              f"{ratio['pg ntk']:.2f}× |", flush=True)
    return results


if __name__ == "__main__":
    main()
