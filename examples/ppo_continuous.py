"""A CleanRL-style PPO loop on Pendulum-v1 with ISOPO on the policy: ISOPO (ntk) against PPO-clip.

    python examples/ppo_continuous.py                 # both methods, 3 seeds each (about 2.5 min)
    python examples/ppo_continuous.py --samples 20000 --seeds 1 --tensorboard runs

The loop is CleanRL's ``ppo_continuous_action.py`` reduced to what matters here: a Gaussian
policy whose state-independent ``actor_logstd`` lives on the agent, a separate value network
with its own optimizer, GAE advantages per time step, minibatches of rows. One row (one state and
its action) is one sample. Both methods collect the same environment steps, fit the critic the
same way and take the same optimizer steps (``update_epochs`` epochs of minibatches per batch);
they differ only in the policy loss:

* **PPO-clip**: the clipped ratio objective, advantages in the loss.
* **ISOPO**: the same objective with its advantages taken out, ``-(v * logp).sum() / n`` with
  ``v = surrogate_weights(logp, old_logp, adv)`` (the ratio, zeroed where the clip binds),
  backpropagated inside ``opt.microbatch(adv)``: ISOPO applies the advantages layer by layer.
  The value loss is backpropagated outside it, into the critic's own optimizer.

``--tensorboard DIR`` writes ISOPO's per-layer diagnostics (``torch_isopo.log_diagnostics``) and
the episode returns for TensorBoard (included in the timings).
"""
from __future__ import annotations

import argparse
import math
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

from torch_isopo import ISOPO, log_diagnostics, surrogate_weights


def mlp(inp: int, out: int, hidden: int = 64, gain: float = 1.0) -> nn.Sequential:
    """CleanRL's tanh MLP with orthogonal initialisation."""
    layers = [nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
              nn.Linear(hidden, out)]
    for i, layer in enumerate(layers[::2]):
        nn.init.orthogonal_(layer.weight, gain if i == 2 else math.sqrt(2))
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Agent(nn.Module):
    """CleanRL's actor: a mean network and a state-independent ``actor_logstd`` on the agent."""

    def __init__(self, obs: int, act: int):
        super().__init__()
        self.actor_mean = mlp(obs, act, gain=0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(1, act))

    def dist(self, x: torch.Tensor) -> Normal:
        mean = self.actor_mean(x)
        return Normal(mean, self.actor_logstd.expand_as(mean).exp())


class Envs:
    """``num`` Pendulum-v1 environments stepped together; episode returns as they finish."""

    def __init__(self, num: int, seed: int):
        self.envs = [gym.make("Pendulum-v1") for _ in range(num)]
        self.obs = np.stack([e.reset(seed=seed * 1000 + i)[0] for i, e in enumerate(self.envs)])
        self.ret = np.zeros(num)
        self.low = self.envs[0].action_space.low
        self.high = self.envs[0].action_space.high

    def step(self, actions: np.ndarray):
        """Step every env (actions clipped to the bounds); finished episodes restart at once."""
        rewards, dones, finished = np.zeros(len(self.envs)), np.zeros(len(self.envs)), []
        for i, (env, a) in enumerate(zip(self.envs, np.clip(actions, self.low, self.high))):
            self.obs[i], rewards[i], terminated, truncated, _ = env.step(a)
            self.ret[i] += rewards[i]
            if terminated or truncated:       # as CleanRL: no bootstrap past a time limit
                dones[i] = 1.0
                finished.append(self.ret[i])
                self.ret[i] = 0.0
                self.obs[i] = env.reset()[0]
        return rewards, dones, finished


def train(method: str, args, seed: int, progress=None) -> dict:
    """One run of ``method`` (an ISOPO mode, or "ppo"); the history of returns and clocks."""
    torch.manual_seed(seed)
    envs = Envs(args.envs, seed)
    n_obs, n_act = envs.obs.shape[1], envs.low.shape[0]
    agent, critic = Agent(n_obs, n_act), mlp(n_obs, 1)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)
    if method != "ppo":                                 # ISOPO on the policy's optimizer only
        opt = ISOPO(agent, opt, mode=method, damping=args.damping)
    T, E = args.steps, args.envs
    obs = torch.zeros(T, E, n_obs)
    actions, logps = torch.zeros(T, E, n_act), torch.zeros(T, E)
    rewards, dones, values = torch.zeros(T, E), torch.zeros(T, E), torch.zeros(T, E)
    hist = {"samples": [], "seconds": [], "cpu": [], "return": []}
    writer = None
    if args.tensorboard and method != "ppo":                # ISOPO's figures, per layer
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(f"{args.tensorboard}/{method}-seed{seed}")
    opt_steps = 0
    samples, clock, cpu, updates = 0, 0.0, 0.0, args.samples // (T * E)
    next_done = torch.zeros(E)
    for update in range(updates):
        start, start_cpu = time.perf_counter(), time.process_time()
        finished = []
        with torch.no_grad():                                   # rollout
            for t in range(T):
                x = torch.as_tensor(envs.obs, dtype=torch.float32)
                obs[t], dones[t] = x, next_done
                d = agent.dist(x)
                actions[t] = d.sample()
                logps[t] = d.log_prob(actions[t]).sum(1)
                values[t] = critic(x).squeeze(1)
                r, done, ended = envs.step(actions[t].numpy())
                rewards[t] = torch.as_tensor(r) * args.reward_scale
                next_done = torch.as_tensor(done)
                finished += ended
            next_value = critic(torch.as_tensor(envs.obs, dtype=torch.float32)).squeeze(1)
            adv, last = torch.zeros(T, E), torch.zeros(E)       # GAE
            for t in reversed(range(T)):
                live = 1.0 - (next_done if t == T - 1 else dones[t + 1])
                nv = next_value if t == T - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * nv * live - values[t]
                adv[t] = last = delta + args.gamma * args.gae_lambda * live * last
            returns = adv + values
        b_obs, b_act, b_logp = obs.view(-1, n_obs), actions.view(-1, n_act), logps.view(-1)
        b_adv, b_ret = adv.view(-1), returns.view(-1)
        N, mb = T * E, args.minibatch
        for _ in range(args.critic_epochs):                     # the critic: its own optimizer
            for idx in torch.randperm(N).split(mb):
                loss = 0.5 * (critic(b_obs[idx]).squeeze(1) - b_ret[idx]).pow(2).mean()
                critic_opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_opt.step()
        for _ in range(args.update_epochs):                     # the policy
            for idx in torch.randperm(N).split(mb):
                a = b_adv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8)           # per minibatch, as CleanRL
                if method == "ppo":
                    logp = agent.dist(b_obs[idx]).log_prob(b_act[idx]).sum(1)
                    ratio = (logp - b_logp[idx]).exp()
                    clipped = ratio.clamp(1 - args.clip, 1 + args.clip)
                    torch.max(-a * ratio, -a * clipped).mean().backward()
                else:                                           # advantages out of the loss
                    with opt.microbatch(a):
                        logp = agent.dist(b_obs[idx]).log_prob(b_act[idx]).sum(1)
                        v = surrogate_weights(logp, b_logp[idx], a, eps_low=args.clip)
                        (-(v * logp).sum() / len(idx)).backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                opt.step()
                opt.zero_grad()
                opt_steps += 1
                if writer is not None and opt_steps % args.log_every == 0:
                    log_diagnostics(opt, writer, opt_steps)
        clock += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        samples += N
        mean_return = float(np.mean(finished)) if finished else math.nan
        for key, value in zip(hist, (samples, clock, cpu, mean_return)):
            hist[key].append(value)
        if progress is not None:
            progress.set_postfix(ret=f"{mean_return:.0f}")
            progress.update()
        if writer is not None and finished:
            writer.add_scalar("charts/episodic_return", mean_return, opt_steps)
    if writer is not None:
        writer.close()
    return hist


def smooth(values: list[float], window: int = 3) -> list[float]:
    """Trailing mean over ``window`` updates (NaN entries skipped)."""
    out = []
    for i in range(len(values)):
        w = [v for v in values[max(0, i - window + 1):i + 1] if not math.isnan(v)]
        out.append(sum(w) / len(w) if w else math.nan)
    return out


def first_reach(hist: dict, target: float, key: str) -> float:
    """``hist[key]`` at the first update whose smoothed return reaches ``target`` (NaN: never)."""
    return next((x for x, r in zip(hist[key], smooth(hist["return"])) if r >= target), math.nan)


def final_return(hist: dict) -> float:
    """Mean return of the episodes that finished in the last 10% of the updates."""
    tail = [r for r in hist["return"][-max(1, len(hist["return"]) // 10):] if not math.isnan(r)]
    return sum(tail) / len(tail) if tail else math.nan


def report(runs: dict, target: float, random_return: float, out: str) -> list[dict]:
    """Print the results table (over seeds) and save the learning curves; the table's rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(values, digits=0):
        hit = [v for v in values if not math.isnan(v)]
        text = f"{np.mean(hit):.{digits}f}" if hit else "never"
        return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"

    rows = []
    print(f"\nPendulum-v1, {len(next(iter(runs.values())))} seeds; a random policy returns "
          f"{random_return:.0f}.\n\n| method | final return (mean ± sd) | samples to {target:g} "
          f"| wall s to {target:g} | wall s | CPU s |\n|---|---|---|---|---|---|")
    for name, hists in runs.items():
        finals = [final_return(h) for h in hists]
        row = {"method": name, "final": float(np.mean(finals)), "sd": float(np.std(finals)),
               "to_target": [first_reach(h, target, "samples") for h in hists],
               "wall_to_target": [first_reach(h, target, "seconds") for h in hists],
               "wall": [h["seconds"][-1] for h in hists], "cpu": [h["cpu"][-1] for h in hists]}
        rows.append(row)
        print(f"| {name} | {row['final']:.0f} ± {row['sd']:.0f} | {mean(row['to_target'])} | "
              f"{mean(row['wall_to_target'], 1)} | {mean(row['wall'], 1)} | "
              f"{mean(row['cpu'], 1)} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for i, (name, hists) in enumerate(runs.items()):
        R = np.array([smooth(h["return"]) for h in hists])
        seen = ~np.isnan(R).any(0)                      # from the first finished episodes on
        R = R[:, seen]
        for ax, key in zip(axes, ("samples", "seconds")):
            x = np.mean([h[key] for h in hists], 0)[seen]
            ax.plot(x, R.mean(0), color=f"C{i}", label=name)
            ax.fill_between(x, R.min(0), R.max(0), color=f"C{i}", alpha=0.2)
    axes[0].set(xlabel="environment steps", ylabel="episode return",
                title=f"Pendulum-v1: mean and range of {len(hists)} seeds")
    axes[1].set(xlabel="wall-clock seconds (rollout + update)")
    for ax in axes:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g}")
        ax.axhline(random_return, color="grey", lw=0.8, ls="--", label="random actions")
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nlearning curves: {out}")
    return rows


def random_return(episodes: int = 10) -> float:
    """The mean return of uniformly random actions."""
    env = gym.make("Pendulum-v1")
    env.action_space.seed(0)
    total = 0.0
    for i in range(episodes):
        env.reset(seed=10_000 + i)
        done = False
        while not done:
            _, r, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + r, terminated or truncated
    return total / episodes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ntk", "ppo"],
                   choices=["ntk", "fisher", "reinforce", "ppo"],
                   help="ISOPO modes (reinforce: PPO-clip through ISOPO, step for step), ppo")
    p.add_argument("--samples", type=int, default=32_768, help="environment steps per run")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--steps", type=int, default=128, help="steps per env per rollout")
    p.add_argument("--minibatch", type=int, default=64, help="rows per minibatch")
    p.add_argument("--update-epochs", type=int, default=10, help="PPO epochs per batch")
    p.add_argument("--critic-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="the policy's learning rate")
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--damping", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--reward-scale", type=float, default=0.1)
    p.add_argument("--target", type=float, default=-400.0, help="the return to reach")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0, 1, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="ppo_continuous.png")
    p.add_argument("--tensorboard", metavar="DIR", help="log ISOPO's diagnostics here")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between logs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    updates = args.samples // (args.steps * args.envs)
    runs = {}
    for method in args.methods:
        name = "PPO-clip" if method == "ppo" else f"ISOPO {method}"
        runs[name] = []
        for seed in range(args.seeds):
            with tqdm(total=updates, desc=f"{name}, seed {seed}") as bar:
                runs[name].append(train(method, args, seed, bar))
    rows = report(runs, args.target, random_return(), args.out)
    return {"runs": runs, "table": rows}


if __name__ == "__main__":
    main()
