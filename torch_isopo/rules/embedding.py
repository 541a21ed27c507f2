"""``nn.Embedding``: a linear layer on one-hot inputs, ``⟨a_t, a_s⟩ = [id_t = id_s]``.

The factors are the token ids (an index into the weight's rows) and the output gradients; rows
at ``padding_idx`` get no gradient, as in ``nn.Embedding``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..factors import FactorUse
from ..gate import own_op
from . import Rule, register
from .linear import only_input


@dataclass
class EmbeddingUse:
    record: object
    smap: object
    padding_idx: int | None
    weight: int


@own_op
class EmbeddingFn(Function):
    """``y = W[ids]``; the backward hands ``(ids, δ)`` to the gate."""

    @staticmethod
    def forward(ctx, ids, weight, use):
        ctx.save_for_backward(ids)
        ctx.use = use
        return F.embedding(ids, weight, use.padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        use = ctx.use
        ids = ids.reshape(-1)
        d = dy.reshape(-1, dy.shape[-1])
        if use.padding_idx is not None:
            d = d.masked_fill((ids == use.padding_idx)[:, None], 0)
        use.record.add(FactorUse(ids, d, d, use.smap, use.weight, None))
        return None, None, None


def _supported(module: nn.Module) -> bool:
    if type(module).forward is not nn.Embedding.forward:
        return False
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(f"ISOPO does not support nn.Embedding with max_norm, scale_grad_by_freq "
                         f"or sparse=True ({type(module).__name__})")
    return True


@register(when=lambda m: isinstance(m, nn.Embedding) and _supported(m))
class EmbeddingRule(Rule):
    name = "embedding"
    factor = True

    def forward(self, mb, layer, entry, orig, args, kwargs):
        ids = mb.expand_shared(only_input(entry, args, kwargs), features=False)
        record, gated = mb.gate(layer)
        smap = mb.sample_map(ids.shape, f"module '{entry.name}' input", ids.device)
        w = entry.slot("weight")
        return EmbeddingFn.apply(ids, gated[w], EmbeddingUse(record, smap, entry.module.padding_idx, w))
