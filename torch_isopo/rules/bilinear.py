"""``nn.Bilinear``: ``y_o = x1ᵀ W_o x2 + b_o`` is linear in ``W`` seen as an ``(out, in1·in2)``
matrix, whose per-row pieces are ``δ_r ⊗ (x1_r ⊗ x2_r)``: factors, like ``nn.Linear`` on the
outer products of the two inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..factors import FactorUse
from ..gate import own_op
from . import Rule, register


@dataclass
class BilinearUse:
    record: object
    smap: object
    weight: int | None
    bias: int | None


@own_op
class BilinearFn(Function):
    @staticmethod
    def forward(ctx, x1, x2, weight, bias, use):
        ctx.save_for_backward(x1, x2, weight)
        ctx.use = use
        return F.bilinear(x1, x2, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x1, x2, weight = ctx.saved_tensors
        use = ctx.use
        dx1 = torch.einsum("...o,oij,...j->...i", dy, weight, x2) if ctx.needs_input_grad[0] else None
        dx2 = torch.einsum("...o,oij,...i->...j", dy, weight, x1) if ctx.needs_input_grad[1] else None
        d = dy.reshape(-1, dy.shape[-1])
        a1, a2 = x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, x2.shape[-1])
        V = (a1[:, :, None] * a2[:, None, :]).reshape(d.shape[0], -1)
        use.record.add(FactorUse(d, V, d, use.smap, use.weight, use.bias))
        return dx1, dx2, None, None, None


@register(nn.Bilinear)
class BilinearRule(Rule):
    name = "bilinear"
    factor = True

    def forward(self, mb, layer, entry, orig, args, kwargs):
        x1, x2 = [*args, *(kwargs[k] for k in ("input1", "input2") if k in kwargs)][:2]
        x1 = mb.expand_shared(x1, features=True, name=entry.name)
        x2 = mb.expand_shared(x2, features=True, name=entry.name)
        record, gated = mb.gate(layer)
        ws, bs = entry.slot("weight"), entry.slot("bias")
        w, b = entry.tensor("weight", gated), entry.tensor("bias", gated)
        smap = mb.sample_map(x1.shape[:-1], f"module '{entry.name}' input", x1.device, x1)
        return BilinearFn.apply(x1, x2, w, b, BilinearUse(record, smap, ws, bs))
