"""ISOPO in a PPO loop (docs/ppo.md): the value loss outside the microbatch adds its plain gradient,
for a critic with its own optimizer, a critic inside the agent, and a trunk shared by both."""
import copy

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from torch_isopo import ISOPO, surrogate_weights
from torch_isopo.reference import reference_gradients

D = torch.float64
N = 8


class SharedTrunk(nn.Module):
    """Actor and critic heads on one trunk; a state-independent log-std on the agent."""

    def __init__(self, shared=True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.critic_trunk = self.trunk if shared else nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.actor_mean, self.critic = nn.Linear(8, 2), nn.Linear(8, 1)
        self.actor_logstd = nn.Parameter(torch.randn(1, 2) * 0.3)

    def logp(self, x, a):
        mean = self.actor_mean(self.trunk(x))
        return Normal(mean, self.actor_logstd.expand_as(mean).exp()).log_prob(a).sum(1)

    def value(self, x):
        return self.critic(self.critic_trunk(x)).squeeze(1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_value_loss_outside_the_microbatch_adds_its_plain_gradient(mode, shared):
    torch.manual_seed(0)
    agent = SharedTrunk(shared).to(D)
    x, a, ret = torch.randn(N, 3, dtype=D), torch.randn(N, 2, dtype=D), torch.randn(N, dtype=D)
    adv = torch.randn(N, dtype=D)
    with torch.no_grad():
        old = agent.logp(x, a) + 0.3 * torch.randn(N, dtype=D)    # a later epoch: ratios ≠ 1
    v = surrogate_weights(agent.logp(x, a), old, adv)
    assert 0 < int((v == 0).sum()) < N                            # the clip binds for some rows

    def value_loss(m):
        return 0.5 * (m.value(x) - ret).pow(2).mean()

    ref = copy.deepcopy(agent)
    want, _ = reference_gradients(ref, lambda: -(v * ref.logp(x, a)) / N, adv, mode, 1.0)
    plain = torch.autograd.grad(value_loss(ref), list(ref.parameters()), allow_unused=True)

    opt = ISOPO(agent, torch.optim.SGD(agent.parameters(), lr=0.1), mode=mode, ema=None,
                fisher_probes=None)
    with opt.microbatch(adv):
        (-(v * agent.logp(x, a)).sum() / N).backward()
    value_loss(agent).backward()                                   # outside: plain autograd
    for (name, p), q, g in zip(agent.named_parameters(), ref.parameters(), plain):
        expected = want[q] + (0 if g is None else g)
        assert torch.allclose(p.grad, expected, rtol=1e-9, atol=1e-12), name
    if shared:          # the trunk holds both: ISOPO's policy gradient plus the value gradient
        assert not torch.allclose(agent.trunk[0].weight.grad, want[ref.trunk[0].weight])


def test_value_loss_inside_the_microbatch_is_scaled_by_the_coefficients():
    """What docs/ppo.md warns against: inside the block the value loss becomes part of each G_i."""
    torch.manual_seed(0)
    agent = SharedTrunk(shared=True).to(D)
    x, a, ret = torch.randn(N, 3, dtype=D), torch.randn(N, 2, dtype=D), torch.randn(N, dtype=D)
    adv = torch.randn(N, dtype=D)

    def run(inside):
        m = copy.deepcopy(agent)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="reinforce")
        value = 0.5 * (m.value(x) - ret).pow(2).mean() if not inside else None
        with opt.microbatch(adv):
            loss = -m.logp(x, a).sum() / N
            if inside:
                loss = loss + 0.5 * (m.value(x) - ret).pow(2).mean()
            loss.backward()
        if value is not None:
            value.backward()
        return m.critic.weight.grad
    plain = run(inside=False)
    torch.manual_seed(0)
    assert not torch.allclose(run(inside=True), plain)
