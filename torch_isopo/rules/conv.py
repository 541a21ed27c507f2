"""``nn.Conv1d/2d/3d``: a linear layer on input patches.

A convolution's weight gradient is a sum over output locations of outer products of the output
gradient ``δ_t`` (``C_out``) and the input patch ``a_t`` (``C_in·k``) it read, so the backward hands
``(δ, patches)`` to the gate as factors, exactly like ``nn.Linear`` on the patches, and the gate's
``Σ c_i G_i`` replaces autograd's weight gradient. Padding modes pad the input before the op
(autograd differentiates the padding); stride and dilation select the patches. With ``groups > 1``
each group has its own block of the weight: the per-sample gradients are formed explicitly
(``n × weight size``, small for grouped and depthwise convolutions). A position of the
``fisher`` mode is one output location of one sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from ..factors import FactorUse, work_dtype
from ..finish import ExplicitUse
from ..gate import own_op
from ..samples import entry_ids
from . import Rule, parametrized, register
from .parametrized import chained_use
from .linear import as_autocast, only_input

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}


@dataclass
class ConvUse:
    record: object
    smap: object
    d: int                    # spatial dims
    stride: tuple
    dilation: tuple
    groups: int
    kernel: tuple
    weight: int | None        # the layer's slots (None: frozen or absent)
    bias: int | None
    chain: object = None      # a parametrized weight (``parametrized.Chain``)


def patches(x: Tensor, use: ConvUse) -> Tensor:
    """``(N·L, C·k)``: the (padded) input patch each output location reads, channel-major."""
    N, C = x.shape[:2]
    for i in range(use.d):
        span = use.dilation[i] * (use.kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, use.stride[i])[..., ::use.dilation[i]]
    # (N, C, *L, *k) -> (N, *L, C, *k)
    order = [0, *range(2, 2 + use.d), 1, *range(2 + use.d, 2 + 2 * use.d)]
    return x.permute(order).reshape(-1, C * _prod(use.kernel))


def _prod(t) -> int:
    out = 1
    for v in t:
        out *= v
    return out


@own_op
class ConvFn(Function):
    """A convolution of an already padded input; the backward hands ``(δ, patches)`` to the gate."""

    @staticmethod
    def forward(ctx, x, weight, bias, use):
        out, x, weight = as_autocast(_CONV[use.d], x, weight, bias, use.stride, 0, use.dilation,
                                     use.groups)
        ctx.save_for_backward(x, weight)
        ctx.use = use
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        use = ctx.use
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _CONV_INPUT[use.d](x.shape, weight, dy, use.stride, 0, use.dilation, use.groups)
        d = dy.movedim(1, -1).reshape(-1, dy.shape[1])
        if use.weight is None and use.bias is None and use.chain is None:
            return dx, None, None, None
        # a frozen weight (a bias trained alone) needs no patches: an empty factor keeps the
        # use's shape and dtype
        V = patches(x, use) if use.weight is not None or use.chain is not None \
            else d.new_empty(d.shape[0], 0)
        if use.chain is not None:
            use.record.add(chained_use(use.chain, d, V, use.smap, use.record.wants_pieces, d,
                                       use.bias))
        elif use.groups == 1:
            use.record.add(FactorUse(d, V, d, use.smap, use.weight, use.bias))
        else:
            use.record.add(_grouped(d, V, use))
        return dx, None, None, None


def _grouped(d: Tensor, V: Tensor | None, use: ConvUse) -> ExplicitUse:
    """Per-sample gradients of a grouped convolution: per group, ``δ_gᵀ · patches_g``."""
    dt = work_dtype(d)
    g, rows = use.groups, d.shape[0]
    dg = d.to(dt).view(rows, g, -1)
    parts, slots = [], []
    if use.weight is not None:
        Vg = V.to(dt).view(rows, g, -1)
        parts.append(torch.einsum("rgo,rgi->rgoi", dg, Vg).reshape(rows, -1))
        slots.append(use.weight)
    if use.bias is not None:
        parts.append(d.to(dt))
        slots.append(use.bias)
    pieces = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    G = use.smap.reduce(pieces, 0)
    if not use.record.wants_pieces:
        return ExplicitUse(G, None, None, tuple(slots))
    return ExplicitUse(G, pieces, d.abs().sum(1) > 0, tuple(slots))


def _mixes_samples(spatial, flat_pads: list[int], mode: str, use: ConvUse, N: int) -> bool:
    """Whether some location reads an input position (or a padding's copy of it) of another
    sample than its own, with ids given per output location (``use.smap``) of ``N`` entries:
    none when each entry is one sample; else the input's positions are the ones the ids name,
    unless the input has other positions (padded or shifted by the caller), which counts as
    mixing too."""
    ids = use.smap.ids
    if entry_ids(ids, N, ids.numel() // N) is not None:
        return False
    size = math.prod(spatial)
    if ids.numel() != N * size:
        return True
    where = torch.arange(size, dtype=torch.float32 if size < 1 << 24 else torch.float64,
                         device=ids.device).view(1, 1, *spatial)
    if any(flat_pads):                   # a padding copies positions (reflect, circular) or is -1
        where = F.pad(where, flat_pads, mode=mode, **({"value": -1.0} if mode == "constant"
                                                       else {}))
    read = patches(where, use).long()                 # (L, k): the position each location reads
    if read.shape[0] != size:                         # not one location per input position
        return True
    owner = ids.view(N, size)
    other = owner[:, read.clamp_min(0)] != owner[:, :, None]    # (N, L, k)
    return bool((other & (read >= 0)).any())


def _pads(m: nn.Module, d: int, kernel) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the module pads."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [(0, 0)] * d
        out = []
        for k, dil in zip(kernel, m.dilation):
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in m.padding]


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    name = "conv"
    factor = True
    parametrized = True
    pieces = "channels"

    def supports(self, module) -> bool:
        return module.groups == 1 and list(module.parametrizations) == ["weight"]

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m = entry.module
        d = len(m.kernel_size)
        x = only_input(entry, args, kwargs)
        unbatched = x.dim() == d + 1
        x = mb.unbatched(x, entry.name) if unbatched else mb.expand_shared(
            x, features=True, axis=0, name=entry.name)
        spatial = x.shape[2:]
        pads = _pads(m, d, m.kernel_size)
        flat = [p for pair in reversed(pads) for p in pair]
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        if any(flat):
            x = F.pad(x, flat, mode=mode)
        record, gated = mb.gate(layer)
        w, ws, chain = parametrized.weight(entry, gated)
        bs, b = entry.slot("bias"), entry.tensor("bias", gated)
        L = 1
        for i in range(d):
            span = m.dilation[i] * (m.kernel_size[i] - 1) + 1
            L *= (x.shape[2 + i] - span) // m.stride[i] + 1
        smap = mb.batch_map(x.shape[0], L, f"module '{entry.name}' input", x.device,
                            locations=True)
        use = ConvUse(record, smap, d, tuple(m.stride), tuple(m.dilation), m.groups,
                      tuple(m.kernel_size), ws, bs, chain)
        packed = smap.layout is None and mb.segments.numel() != x.shape[0]   # ids per location
        if packed and x.requires_grad and _mixes_samples(spatial, flat, mode, use, x.shape[0]):
            raise ValueError(
                f"ISOPO: module '{entry.name}' reads input positions of another sample (samples "
                "packed along one row by segments=, under a kernel that spans the boundary "
                "between two, padding that wraps, or an input padded or shifted so that its "
                "positions are not the ones segments= names): the gradient of its input would "
                "mix samples. Give each sample a batch entry of its own (padded, segments= with "
                "one id per entry), or run the convolution on each sample's part of the row on "
                "its own")
        out = ConvFn.apply(x, w, b, use)
        return out[0] if unbatched else out
