"""ISOPO's cost on the policy networks of deep RL, per family, against plain REINFORCE.

    python benchmarks/policies.py                    # every family, n = 8, 32, 128, one thread
    python benchmarks/policies.py --families cnn gru --n 32 --rounds 15

One step is forward + backward of the per-sample log-likelihoods of n samples: for REINFORCE
``−Σ A_i log π_i`` with plain autograd on a copy of the model without ISOPO, for ISOPO the
advantage-free loss inside ``opt.microbatch(A)`` (``ntk``, damping 1). The two run in interleaved
rounds; the table reports the median over rounds of ISOPO's time divided by REINFORCE's in the
same round (robust to load drift), and the median milliseconds of each.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn
from torch.distributions import Normal


class Gaussian(nn.Module):
    """CleanRL's continuous-control actor: a tanh MLP for the mean, a state-independent log_std."""

    def __init__(self, obs=17, act=6, h=64):
        super().__init__()
        self.actor_mean = nn.Sequential(nn.Linear(obs, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                                        nn.Linear(h, act))
        self.actor_logstd = nn.Parameter(torch.zeros(1, act))

    def logp(self, x, a):
        mean = self.actor_mean(x)
        return Normal(mean, self.actor_logstd.expand_as(mean).exp()).log_prob(a).sum(1)


class Discrete(nn.Module):
    """A policy head over any body: log-probability of the taken action."""

    def __init__(self, body, out):
        super().__init__()
        self.body, self.head = body, nn.LazyLinear(out)

    def logp(self, x, a):
        return torch.log_softmax(self.head(self.body(x)), -1).gather(1, a[:, None])[:, 0]


class Recurrent(nn.Module):
    """A GRU over a window of observations, acting from the last state."""

    def __init__(self, obs=8, h=64, act=4):
        super().__init__()
        self.gru, self.head = nn.GRU(obs, h, batch_first=True), nn.Linear(h, act)

    def logp(self, x, a):
        out, _ = self.gru(x)
        return torch.log_softmax(self.head(out[:, -1]), -1).gather(1, a[:, None])[:, 0]


class CellLoop(nn.Module):
    """An LSTMCell stepped in a Python loop, an action per step."""

    def __init__(self, obs=8, h=64, act=4):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(obs, h), nn.Linear(h, act)

    def logp(self, x, a):
        hc, out = None, 0
        for t in range(x.shape[1]):
            hc = self.cell(x[:, t], hc)
            out = out + torch.log_softmax(self.head(hc[0]), -1).gather(1, a[:, None])[:, 0]
        return out


class Attention(nn.Module):
    """Two Transformer encoder layers over a set of entities, pooled."""

    def __init__(self, d=64, act=4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(d, act)

    def logp(self, x, a):
        h = self.enc(self.embed(x)).mean(1)
        return torch.log_softmax(self.head(h), -1).gather(1, a[:, None])[:, 0]


def nature_cnn():
    return nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(512),
                         nn.ReLU())


FAMILIES = {   # name: (model, (observation shape), action kind)
    "mlp": (lambda: Discrete(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64),
                                           nn.Tanh()), 4), (8,), "discrete"),
    "gaussian": (Gaussian, (17,), "continuous"),
    "cnn": (lambda: Discrete(nature_cnn(), 6), (4, 84, 84), "discrete"),
    "gru": (Recurrent, (16, 8), "discrete"),
    "lstm-cell": (CellLoop, (16, 8), "discrete"),
    "attention": (Attention, (16, 8), "discrete"),
}


def setup(name: str, n: int):
    from torch_isopo import ISOPO
    build, shape, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(n, *shape)
    a = torch.randn(n, 6) if kind == "continuous" else torch.randint(0, 4, (n,))
    model.logp(x, a)                                   # materialise lazy layers
    plain = copy.deepcopy(model)
    A = torch.randn(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.0), mode="ntk")

    def reinforce():
        (-(A * plain.logp(x, a)).sum()).backward()
        plain.zero_grad()

    def isopo():
        with opt.microbatch(A):
            (-model.logp(x, a).sum()).backward()
        opt.zero_grad()
    return reinforce, isopo


def measure(name: str, n: int, rounds: int) -> tuple[float, float, float]:
    reinforce, isopo = setup(name, n)
    for f in (reinforce, isopo, reinforce, isopo):      # warm-up
        f()
    ratios, base, ours = [], [], []
    for _ in range(rounds):
        times = []
        for f in (reinforce, isopo):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        base.append(times[0])
        ours.append(times[1])
        ratios.append(times[1] / times[0])
    return statistics.median(ratios), statistics.median(base) * 1e3, statistics.median(ours) * 1e3


def settle_allocator() -> None:
    """Free one 30 MB buffer before timing. glibc's malloc then keeps up to 60 MB of freed memory
    for reuse instead of handing it back to the system after every step (its mmap and trim
    thresholds rise the first time it frees a large block), as in any process that has held a
    large buffer (a rollout buffer, a batch of frames). Without it a family's result would
    depend on the families timed before it in the process (the CNN's frames raise the
    thresholds for those after it), and ISOPO's transient per-sample gradients would be
    page-faulted afresh at every step."""
    torch.empty(30 << 20, dtype=torch.uint8)     # allocated and freed at once


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--n", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--woodbury-from", type=int, default=None,
                   help="samples from which a layer of fewer parameters than half the samples is "
                        "solved by Woodbury (default: the library's, finish.LOW_RANK_N)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.woodbury_from is not None:
        import torch_isopo.finish
        torch_isopo.finish.LOW_RANK_N = args.woodbury_from
    settle_allocator()
    print(f"ISOPO ntk forward+backward / plain REINFORCE, median of {args.rounds} interleaved "
          f"rounds, {args.threads} thread(s)")
    head = "".join(f"{'n=' + str(n):>22}" for n in args.n)
    print(f"{'family':<12}{head}")
    for name in args.families:
        cells = []
        for n in args.n:
            r, b, o = measure(name, n, args.rounds)
            cells.append(f"{r:6.2f}× ({b:6.1f}/{o:6.1f} ms)")
        print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
