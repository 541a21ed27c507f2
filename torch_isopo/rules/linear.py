"""``nn.Linear`` and Hugging Face ``Conv1D``: weight and bias form one layer.

Per-sample gradients are sums of outer products, ``G_i = Σ_{t∈i} δ_t [a_t; 1]ᵀ``, so the backward
hands the inputs ``a`` and output gradients ``δ`` to the gate as factors (``factors.FactorUse``)
and never runs autograd's weight-gradient GEMM: the gate's final ``Σ c_i G_i`` replaces it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..factors import FactorUse
from ..gate import own_op
from . import Rule, parametrized, register
from .parametrized import chained_use


@dataclass
class LinearUse:
    record: object
    smap: object
    transposed: bool     # Conv1D: ``y = x W + b``, the weight stored (in, out)
    weight: int | None   # the layer's slot of the weight (None: frozen)
    bias: int | None     # the layer's slot of the bias (None: frozen or absent)
    rows: tuple[int, int] | None = None       # only these rows of the weight are used,
    bias_rows: tuple[int, int] | None = None  # and these of the bias (packed projections)
    chain: object = None                      # a parametrized weight (``parametrized.Chain``)


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype autocast would run an op on ``x`` in (None: none; it leaves float64 alone)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return None


def as_autocast(op, x, weight, bias, *args):
    """``(op(x, weight, bias, *args), x, weight)`` as autocast would run the op: in its lower
    precision, with the inputs cast (both factors of the backward in it); as given without it."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return op(x, weight, bias, *args), x, weight
    x, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype)
                       for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return op(x, weight, bias, *args), x, weight


def _linear(x, weight, bias, transposed: bool):
    """``x Wᵀ + b`` (``x W + b`` transposed) as a tensor of its own: the caller may write to it
    in place (``nn.ReLU(inplace=True)``), which autograd forbids on a view made inside a custom
    ``Function`` (``F.linear`` of a batch of sequences with a bias returns one)."""
    if not transposed and (x.dim() <= 2 or bias is None):
        return F.linear(x, weight, bias)
    w = weight if transposed else weight.T
    out = torch.empty(*x.shape[:-1], w.shape[1], dtype=x.dtype, device=x.device)
    flat, rows = x.reshape(-1, x.shape[-1]), out.view(-1, w.shape[1])
    if bias is None:
        torch.mm(flat, w, out=rows)
    else:
        torch.addmm(bias, flat, w, out=rows)
    return out


@own_op
class LinearFn(Function):
    """``y = x Wᵀ + b`` (or ``x W + b`` transposed); the backward hands ``(a, δ)`` to the gate."""

    @staticmethod
    def forward(ctx, x, weight, bias, use):
        ctx.widths = (weight.shape[0], None if bias is None else bias.shape[0])
        if use.rows is not None:
            weight = weight[use.rows[0]:use.rows[1]]
        if use.bias_rows is not None and bias is not None:
            bias = bias[use.bias_rows[0]:use.bias_rows[1]]
        out, x, weight = as_autocast(_linear, x, weight, bias, use.transposed)
        ctx.save_for_backward(x, weight)
        ctx.use = use
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        use = ctx.use
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight.T if use.transposed else dy @ weight
        a = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        U, V = (a, d) if use.transposed else (_placed(d, use.rows, ctx.widths[0]), a)
        delta = _placed(d, use.bias_rows, ctx.widths[1])
        if use.chain is not None:
            use.record.add(chained_use(use.chain, U, V, use.smap, use.record.wants_pieces,
                                       delta, use.bias))
        elif use.weight is not None or use.bias is not None:
            use.record.add(FactorUse(U, V, delta, use.smap, use.weight, use.bias))
        return dx, None, None, None


def _placed(d, rows, width):
    """The pieces of a block of rows, in the whole parameter's layout."""
    if rows is None or width is None:
        return d
    return d.new_zeros(d.shape[0], width).index_copy_(1, torch.arange(*rows, device=d.device), d)


def only_input(entry, args, kwargs):
    if len(args) + len(kwargs) != 1:
        raise TypeError(f"ISOPO: module '{entry.name}' expects one input")
    return args[0] if args else next(iter(kwargs.values()))


def _is_conv1d(module: nn.Module) -> bool:
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls) and type(module).forward is cls.forward


@register(nn.Linear)
class LinearRule(Rule):
    name = "linear"
    factor = True
    parametrized = True
    transposed = False

    def supports(self, module) -> bool:
        return list(module.parametrizations) == ["weight"]

    def forward(self, mb, layer, entry, orig, args, kwargs):
        x = mb.expand_shared(only_input(entry, args, kwargs), features=True, name=entry.name)
        record, gated = mb.gate(layer)
        w, ws, chain = parametrized.weight(entry, gated)
        bs, b = entry.slot("bias"), entry.tensor("bias", gated)
        smap = mb.sample_map(x.shape[:-1], f"module '{entry.name}' input", x.device, x)
        use = LinearUse(record, smap, self.transposed, ws, bs, chain=chain)
        return LinearFn.apply(x, w, b, use)


@register(when=_is_conv1d)
class Conv1DRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer with the weight stored transposed."""

    name = "conv1d"
    transposed = True
