"""Parametrized weights (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, your
own): the trainable parameters are the originals the weight is computed from.

A rule that supports them computes the weight inside the microbatch from the gated originals (the
parametrization runs once per forward, as in a plain forward, spectral norm's power iteration
included) and uses it like a plain weight. Its backward forms the per-sample gradients of the
weight and carries them back to the originals through the parametrization's own graph, vectorised
over samples (``n × weight size`` memory): ``G_i`` of the originals, exact whatever the
parametrization computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import _compat
from ..factors import work_dtype
from ..finish import ExplicitUse


@dataclass
class Chain:
    """How a parametrized weight was computed: from which gated originals, in which slots."""

    weight: Tensor                 # the weight the op used (graph back to ``originals``)
    originals: list[Tensor]
    slots: tuple[int, ...]


def originals(module, name: str) -> list[tuple[object, str]]:
    """``(owner, attr)`` of every parameter ``module.name`` is computed from (empty when it is not
    parametrized): the originals, and the parameters the parametrizations hold themselves (a
    learned scale, a LoRA pair), which the layer trains too."""
    if "parametrizations" not in module._modules or not parametrize.is_parametrized(module, name):
        return []
    return [(owner, attr) for owner in module.parametrizations[name].modules()
            for attr, _ in owner.named_parameters(recurse=False)]


def weight(entry, gated, name: str = "weight"):
    """``(tensor, slot, chain)``: the module's ``name`` as the graph must use it."""
    m = entry.module
    places = originals(m, name)
    if not places:
        s = entry.slot(name)
        return entry.tensor(name, gated, m, s), s, None
    slots = [next((i for o, a, i in entry.slots if o is owner and a == attr), None)
             for owner, attr in places]
    if all(s is None for s in slots):
        return getattr(m, name), None, None
    live = [getattr(owner, attr) if s is None else gated[s] for (owner, attr), s in zip(places, slots)]
    with _compat.swapped_parameters(places, live):
        w = getattr(m, name)
    used = dict((s, t) for t, s in zip(live, slots) if s is not None)   # a tied one once
    return w, None, Chain(w, list(used.values()), tuple(used))


def chained_use(chain: Chain, U: Tensor, V: Tensor, smap, wants_pieces: bool,
                delta: Tensor | None = None, bias: int | None = None) -> ExplicitUse:
    """Per-sample (and, for the Fisher mode, per-token) gradients of the originals from the
    weight's pieces ``U_r ⊗ V_r`` (the weight seen as a matrix, rows × the rest), with the bias
    pieces ``delta`` of the bias in slot ``bias``, if any, beside them."""
    dt = work_dtype(U)
    shape = chain.weight.shape
    slots = chain.slots + ((bias,) if bias is not None else ())
    G_w = torch.bmm(smap.padded(U.to(dt)).transpose(1, 2), smap.padded(V.to(dt)))
    G = _with_bias(_carry(chain, G_w.view(-1, *shape)), delta, bias, smap.reduce, dt)
    if not wants_pieces:
        return ExplicitUse(G, None, None, slots)
    Ut = U.to(dt).view(smap.tokens, smap.inner, -1)
    per_token = torch.bmm(Ut.transpose(1, 2), V.to(dt).view(smap.tokens, smap.inner, -1))
    pieces = _with_bias(_carry(chain, per_token.view(-1, *shape)), delta, bias,
                        lambda x, _: x.view(smap.tokens, smap.inner, -1).sum(1), dt)
    return ExplicitUse(G, pieces, pieces.abs().sum(1) > 0, slots)


def _with_bias(G: Tensor, delta, bias, reduce, dt) -> Tensor:
    return G if bias is None else torch.cat([G, reduce(delta.to(dt), 0)], 1)


def _carry(chain: Chain, G_w: Tensor) -> Tensor:
    """``(k, D)``: each of the ``k`` weight gradients carried back to the originals."""
    got = torch.autograd.grad(chain.weight, chain.originals, G_w.to(chain.weight.dtype),
                              is_grads_batched=True, retain_graph=True, allow_unused=True)
    return torch.cat([G_w.new_zeros(G_w.shape[0], p.numel()) if g is None else
                      g.reshape(G_w.shape[0], -1).to(G_w.dtype)
                      for g, p in zip(got, chain.originals)], 1)
