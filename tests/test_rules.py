"""The rule registry: which rule each module gets, the generic fallback's warning, new rules."""
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_matches_reference
from models import MLPPolicy, SeqMixer
from torch_isopo import GenericRuleWarning, ISOPO
from torch_isopo.rules import Rule, register, rule_for
from torch_isopo.rules.linear import LinearRule


def test_each_layer_reports_its_rule():
    model = SeqMixer()
    with pytest.warns(GenericRuleWarning, match=r"'scale'.*no rule is registered for Scale"):
        opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert {l.name: l.rule for l in opt.layers} == {
        "emb": "embedding", "mix": "linear", "scale": "generic", "norm": "norm", "head": "linear"}


def test_dedicated_rules_say_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericRuleWarning)
        model = MLPPolicy()
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_subclass_with_its_own_forward_is_not_assumed_linear():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    assert rule_for(Doubled(2, 2)) is None
    assert isinstance(rule_for(Plain(2, 2)), LinearRule)


class Affine(nn.Module):
    """``y = x ⊙ scale + shift``: a family without a built-in rule."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale + self.shift


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_a_registered_rule_replaces_the_generic_one(mode):
    """Adding a family is a ``Rule`` with ``@register``: here the per-feature norm rule's
    machinery reused for ``Affine``, exact against the brute force."""
    from torch_isopo.rules.norm import NormRule

    @register(Affine)
    class AffineRule(NormRule):
        name = "affine"

    try:
        model = nn.Sequential(nn.Linear(3, 4), Affine(4), nn.Linear(4, 2)).double()
        X = torch.randn(6, 3, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GenericRuleWarning)
            _, opt = assert_matches_reference(
                model, lambda m: torch.log_softmax(m(X), -1)[:, 0], torch.randn(6, dtype=torch.float64), mode)
        assert [l.rule for l in opt.layers] == ["linear", "affine", "linear"]
    finally:
        from torch_isopo import rules
        rules._REGISTRY[:] = [(m, r) for m, r in rules._REGISTRY if not isinstance(r, AffineRule)]
    assert rule_for(Affine(2)) is None
