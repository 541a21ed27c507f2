"""``nn.Embedding``: a linear layer on one-hot inputs, ``⟨a_t, a_s⟩ = [id_t = id_s]``.

The factors are the token ids (an index into the weight's rows) and the output gradients; rows
at ``padding_idx`` get no gradient, as in ``nn.Embedding``. With ``max_norm`` the looked-up rows
are renormalised in place before the lookup, as ``nn.Embedding`` does outside autograd, so the
gradient is that of a plain lookup of the renormalised rows.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..factors import FactorUse
from ..samples import SampleMap
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
        ids = ids.reshape(-1).long()          # int32 ids index as well as int64 ones
        d = dy.reshape(-1, dy.shape[-1])
        if use.padding_idx is not None:
            d = d.masked_fill((ids == use.padding_idx)[:, None], 0)
        use.record.add(FactorUse(ids, d, d, use.smap, use.weight, None))
        return None, None, None


def _supported(module: nn.Module) -> bool:
    if type(module).forward is not nn.Embedding.forward:
        return False
    if module.scale_grad_by_freq or module.sparse:
        raise ValueError(
            "nn.Embedding with scale_grad_by_freq=True (its gradient divides by token counts "
            "over the whole batch, mixing samples) or sparse=True (ISOPO writes dense "
            "gradients) is not supported; construct it with scale_grad_by_freq=False, "
            "sparse=False")
    return True


@register(when=lambda m: isinstance(m, nn.Embedding) and _supported(m))
class EmbeddingRule(Rule):
    name = "embedding"
    factor = True

    def forward(self, mb, layer, entry, orig, args, kwargs):
        ids = mb.expand_shared(only_input(entry, args, kwargs), features=False,
                                name=entry.name)
        record, gated = mb.gate(layer)
        smap = mb.sample_map(ids.shape, f"module '{entry.name}' input", ids.device, ids)
        w = entry.slot("weight")
        m = entry.module
        if m.max_norm is not None:
            _renorm(layer, entry, ids)
        return EmbeddingFn.apply(ids, entry.tensor("weight", gated),
                                 EmbeddingUse(record, smap, m.padding_idx, w))


def _renorm(layer, entry, ids) -> None:
    """What ``F.embedding`` (or ``F.embedding_bag``) does first with ``max_norm``, outside
    autograd: rescale the looked-up rows in place. Through ``.data``, so the gate's views of the
    weight stay valid; nothing else holds the weight for its backward (the lookup keeps only the
    ids), unless the weight is tied to another module, which is refused as plain autograd would
    refuse an in-place change of a tensor saved for backward."""
    m = entry.module
    if len(layer.entries) > 1:
        raise ValueError(
            f"ISOPO: module '{entry.name}' ({type(m).__name__} with max_norm) shares its weight with "
            f"{', '.join(repr(e.name) for e in layer.entries if e is not entry)}; renormalising "
            "it in place would change a weight another module uses in the same graph. Untie "
            "the weights or construct the embedding without max_norm")
    with torch.no_grad():
        torch.embedding_renorm_(m.weight.data, ids.reshape(-1), m.max_norm, m.norm_type)


def _scaled(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass whose forward is the lookup times a constant ``embed_scale``
    (the scaled word embeddings of Gemma and its relatives), checked on a few ids."""
    scale = getattr(module, "embed_scale", None)
    if not (isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward
            and isinstance(scale, (torch.Tensor, float, int)) and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse):
        return False
    w = module.weight
    ids = torch.arange(min(4, module.num_embeddings), device=w.device)
    try:
        with torch.no_grad():
            out = type(module).forward(module, ids)
            want = F.embedding(ids, w, module.padding_idx) * _scale(module, w.dtype)
    except Exception:             # a weight that cannot run here (sharded, meta): take generic
        return False
    return isinstance(out, torch.Tensor) and out.shape == want.shape and torch.equal(out, want)


def _scale(module: nn.Module, dtype: torch.dtype):
    s = module.embed_scale
    return s.to(dtype) if isinstance(s, torch.Tensor) else s


@register(when=_scaled)
class ScaledEmbeddingRule(EmbeddingRule):
    """``y = W[ids] · embed_scale``: the embedding rule, the constant scale applied after it."""

    name = "scaled_embedding"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        y = super().forward(mb, layer, entry, orig, args, kwargs)
        return y * _scale(entry.module, y.dtype)


@dataclass
class BagUse:
    record: object
    smap: object              # one row per index entry, mapped to its bag's sample
    bag: object               # (J,) the bag of every index entry
    scale: object             # (J,) each entry's weight in its bag (mean, per_sample_weights)
    padding_idx: int | None
    weight: int


@own_op
class EmbeddingBagFn(Function):
    """``y_b = Σ_{j∈b} s_j W[id_j]``; the backward hands ``(id_j, s_j δ_b)`` to the gate."""

    @staticmethod
    def forward(ctx, ids, weight, psw, use, args):
        ctx.save_for_backward(ids, weight)
        ctx.use = use
        return F.embedding_bag(ids, weight, per_sample_weights=psw, **args)

    @staticmethod
    def backward(ctx, dy):
        ids, weight = ctx.saved_tensors
        use = ctx.use
        flat = ids.reshape(-1).long()
        V = dy[use.bag] * use.scale[:, None].to(dy.dtype)
        if use.padding_idx is not None:
            V = V.masked_fill((flat == use.padding_idx)[:, None], 0)
        use.record.add(FactorUse(flat, V, V, use.smap, use.weight, None))
        dpsw = None
        if ctx.needs_input_grad[2]:
            dpsw = (dy[use.bag] * weight[flat]).sum(-1).view(ids.shape)
        return None, None, dpsw, None, None


def _bag_supported(module: nn.Module) -> bool:
    if not (isinstance(module, nn.EmbeddingBag)
            and type(module).forward is nn.EmbeddingBag.forward):
        return False
    if module.scale_grad_by_freq or module.sparse or (module.max_norm is not None
                                                       and module.mode == "max"):
        raise ValueError(
            "nn.EmbeddingBag with scale_grad_by_freq=True (it divides by token counts over the "
            "whole batch, mixing samples), sparse=True (ISOPO writes dense gradients) or "
            "max_norm with mode='max' (its generic recompute would renormalise the weight "
            "again) is not supported; construct it with scale_grad_by_freq=False, sparse=False, "
            "and mode='sum' or 'mean' with max_norm")
    return module.mode in ("sum", "mean")


@register(when=_bag_supported)
class EmbeddingBagRule(Rule):
    """``nn.EmbeddingBag`` with ``mode="sum"`` or ``"mean"`` (``"max"`` takes the generic rule):
    one-hot factors per index entry, scaled by its weight in its bag; each bag is a batch entry
    and each sample one ``fisher`` position."""

    name = "embedding_bag"
    factor = True
    pieces = "samples"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m = entry.module
        a = _BAG.bind(m, *args, **kwargs).arguments
        ids, offsets, psw = a["input"], a.get("offsets"), a.get("per_sample_weights")
        record, gated = mb.gate(layer)
        if m.max_norm is not None:
            _renorm(layer, entry, ids)
        bag, counts = _bags(ids, offsets, m.include_last_offset)
        scale = torch.ones(bag.numel(), dtype=m.weight.dtype,
                           device=ids.device) if psw is None else psw.reshape(-1)
        if m.mode == "mean":
            if m.padding_idx is not None:
                counts = torch.zeros_like(counts).index_add_(
                    0, bag, (ids.reshape(-1) != m.padding_idx).to(counts.dtype))
            scale = scale / counts.clamp_min(1)[bag].to(scale.dtype)
        B = counts.numel()
        bags = mb.batch_map(B, 1, f"module '{entry.name}' input", ids.device)
        smap = SampleMap(bags.ids[bag], mb.n, 1, None, 0)
        w = entry.slot("weight")
        use = BagUse(record, smap, bag, scale.detach(), m.padding_idx, w)
        return EmbeddingBagFn.apply(ids, entry.tensor("weight", gated), psw, use, dict(
            offsets=offsets, mode=m.mode, include_last_offset=m.include_last_offset,
            padding_idx=m.padding_idx))


_BAG = inspect.signature(nn.EmbeddingBag.forward)


def _bags(ids, offsets, include_last):
    """``(bag of every index entry, entries per bag)``."""
    if ids.dim() == 2:
        B, L = ids.shape
        return (torch.arange(B, device=ids.device).repeat_interleave(L),
                torch.full((B,), L, device=ids.device))
    ends = offsets[1:] if include_last else torch.cat([offsets[1:], offsets.new_tensor([ids.numel()])])
    counts = ends - offsets[:len(ends)]
    return torch.arange(counts.numel(), device=ids.device).repeat_interleave(counts), counts
