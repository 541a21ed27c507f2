"""Per-layer rules: how each family of modules runs inside a microbatch.

A rule is a small class registered for the module types (or a predicate, for duck-typed modules)
it handles. Its ``forward`` runs in place of the module's forward inside a microbatch: it takes
the layer's gated parameters (``mb.gate(layer)``) and applies an autograd op whose backward hands
the layer's per-sample material to the gate's record, which turns it into the ISOPO gradient.
The material is either *factors* (``factors.FactorUse``: per-row outer products, for layers that
are linear in their weight) or *explicit* per-sample gradients (``finish.ExplicitUse``).

Adding a family is one file in this package with a ``@register(...)`` class, imported below.
Modules that no rule matches take the generic rule (exact, one pass per sample), with a warning.
"""
from __future__ import annotations

from typing import Callable

from torch import nn


class Rule:
    """How the modules of one family run inside a microbatch.

    ``name`` is what ``opt.layers[i].rule`` reports; ``whole_subtree`` says whether the layer
    takes the parameters of the module's children too (a black box); ``pieces`` what a position
    of the ``fisher`` mode is (docs/math.md): ``"tokens"`` (a row of the module's output, its
    leading dims after the first two belonging to their token), ``"channels"`` (one location of
    a channel-first output ``(N, C, *spatial)``) or ``"samples"`` (the sample, ``g_i = G_i``).
    """

    name = "rule"
    factor = False        # all its uses are FactorUse material (layers may then share weights)
    parametrized = False  # it computes parametrized weights from their originals itself
    whole_subtree = False
    pieces = "tokens"
    patches_forward = True

    def forward(self, mb, layer, entry, orig, args: tuple, kwargs: dict):
        """The module's output inside microbatch ``mb``; ``orig`` is its own forward."""
        raise NotImplementedError

    def supports(self, module) -> bool:
        """Whether the rule takes this module's parametrized tensors (with ``parametrized``)."""
        return True


_REGISTRY: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register(*types: type, when: Callable[[nn.Module], bool] | None = None):
    """Class decorator: use this rule for instances of ``types`` that keep the forward of the
    registered type (a subclass with its own forward may compute anything), and for modules for
    which ``when(module)`` is true. Later registrations take precedence."""
    def matches(module: nn.Module) -> bool:
        cls = type(module)
        if any(isinstance(module, t) and cls.forward is t.forward for t in types):
            return True
        return when is not None and bool(when(module))

    def deco(cls):
        _REGISTRY.insert(0, (matches, cls()))
        return cls
    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or None (the generic rule then applies)."""
    for matches, rule in _REGISTRY:
        if matches(module):
            return rule
    return None


from . import (attention, bilinear, conv, embedding, generic, linear, norm,  # noqa: E402,F401
               parameter, recurrent)

GENERIC = generic.GenericRule()
FREE = parameter.FreeRule()
