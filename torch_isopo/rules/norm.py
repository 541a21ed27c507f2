"""Normalisation layers: LayerNorm, RMSNorm and their Hugging Face ``*Norm`` classes (features
last), and BatchNorm in eval mode, GroupNorm and InstanceNorm (channels first).

Their parameters act per feature. A norm whose output is ``h(x) ⊙ weight + bias`` (checked once,
with random parameters) runs ``h`` through its own forward (unit weight, zero bias) or a checked
fast normaliser, and the affine step as one op whose backward gives each token's piece with one
product. Other per-feature norms (Gemma's ``(1 + w)``) are recomputed in the backward, with each
token's piece ``δ_t ⊙ ∂y_t/∂θ`` from one forward-mode pass per parameter.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd import forward_ad as fwAD

from .. import _compat
from ..factors import work_dtype
from ..gate import own_op
from . import Rule, register
from .generic import explicit_use, recompute
from .linear import only_input


@dataclass
class NormUse:
    record: object
    smap: object
    weight: int | None   # the layer's slots of the trainable weight and bias
    bias: int | None


@own_op
class NormAffineFn(Function):
    """``y = h ⊙ weight + bias``: the affine step of a normalisation layer."""

    @staticmethod
    def forward(ctx, h, weight, bias, use):
        y = h * weight
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(h, weight)
        ctx.use = use
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight = ctx.saved_tensors
        use = ctx.use
        dh = dy * weight if ctx.needs_input_grad[0] else None
        dt = work_dtype(dy)
        D = dy.shape[-1]
        d = dy.to(dt)
        parts = [] if use.weight is None else [(d * h.to(dt)).reshape(-1, D)]
        if use.bias is not None:
            parts.append(d.reshape(-1, D))
        slots = tuple(s for s in (use.weight, use.bias) if s is not None)
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        use.record.add(explicit_use(rows, use.smap, d, use.record.wants_pieces, slots))
        return dh, None, None, None


def _is_norm(module: nn.Module) -> bool:
    """``nn.LayerNorm``/``nn.RMSNorm`` with their own forward (a subclass with another, timm's
    channels-first ``LayerNorm2d``, may compute anything), or a class named ``*LayerNorm`` or
    ``*RMSNorm`` (Hugging Face's): whether its parameters act per feature of the last axis is
    checked at its first forward."""
    cls = type(module)
    named = any(isinstance(module, t) and cls.forward is t.forward
                for t in (nn.LayerNorm, nn.RMSNorm)) or cls.__name__.endswith(
        ("RMSNorm", "LayerNorm"))
    return (named and not any(p.requires_grad for c in module.children() for p in c.parameters())
            and all(p.dim() == 1 for p in module.parameters(recurse=False)))


@register(when=_is_norm)
class NormRule(Rule):
    name = "norm"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        if not args and kwargs:                  # the input by keyword: ln(input=x), rms(x=x)
            args, kwargs = _input_first(entry, orig, kwargs)
        if "affine" not in entry.cache:
            entry.cache["affine"] = _is_affine(entry, orig, args, kwargs)
        if not entry.cache["affine"]:
            if "per_feature" not in entry.cache:
                entry.cache["per_feature"] = _acts_per_feature(entry, orig, args, kwargs)
            if not entry.cache["per_feature"]:
                _refuse_not_per_feature(entry)
            out = recompute(mb, layer, entry, orig, args, kwargs, _forward_mode_pieces, rng=False)
            _check_per_feature(entry, layer, mb, args, out)
            return out
        record, gated = mb.gate(layer)
        if args:
            args = (mb.expand_shared(args[0], features=True, name=entry.name), *args[1:])
        own = dict(entry.module.named_parameters(recurse=False))
        normalise = entry.cache.get("normalise")
        if normalise is not None and len(args) == 1 and not kwargs:
            h = normalise(args[0])
        else:
            with _set(entry.module, {a: None if own.get(a) is None else _unit(a, own[a])
                                     for a in ("weight", "bias")}):
                h = orig(*args, **kwargs)
        ws, bs = entry.slot("weight"), entry.slot("bias")
        w, b = entry.tensor("weight", gated), entry.tensor("bias", gated)
        smap = mb.sample_map(h.shape[:-1], f"module '{entry.name}' input", h.device,
                             args[0] if args else None)
        return NormAffineFn.apply(h, w, b, NormUse(record, smap, ws, bs))


def _input_first(entry, orig, kwargs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the forward's first parameter, given by keyword, as ``args[0]``."""
    first = entry.cache.get("input")
    if first is None:
        params = [p for p in inspect.signature(orig).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        first = entry.cache["input"] = params[0].name if params else ""
    if first not in kwargs:
        return (), kwargs
    rest = dict(kwargs)
    return (rest.pop(first),), rest


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def mixes_samples(module: nn.Module) -> bool:
    """Whether the module normalises with statistics of the whole batch (BatchNorm in training
    mode, or without running statistics): every sample's output then depends on the others."""
    return isinstance(module, BATCH_NORMS) and (
        module.training or (module.running_mean is None and module.running_var is None))


def refuse_batch_statistics(name: str, module: nn.Module) -> None:
    raise ValueError(
        f"ISOPO: module '{name}' ({type(module).__name__}) normalises with the statistics of the "
        "whole batch, which mixes samples: per-sample gradients do not exist. Run it in eval mode "
        "with running statistics during the policy update (module.eval()), or use a per-sample "
        "norm (GroupNorm, LayerNorm)")


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)
class ChannelNormRule(Rule):
    """A norm over channels-first inputs ``(N, C, *spatial)``: ``h(x)`` from the module's own
    forward with unit weight and zero bias (running statistics move as in a plain forward), then
    the affine step per channel, each location of each sample a position."""

    name = "channel_norm"
    pieces = "channels"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m = entry.module
        if mixes_samples(m):
            refuse_batch_statistics(entry.name, m)
        x = only_input(entry, args, kwargs)
        unbatched = any(isinstance(m, t) and x.dim() == r for t, r in _UNBATCHED.items())
        x = mb.unbatched(x, entry.name) if unbatched else mb.expand_shared(
            x, features=True, axis=0, name=entry.name)
        record, gated = mb.gate(layer)
        own = dict(m.named_parameters(recurse=False))
        with _set(m, {a: None if own.get(a) is None else _unit(a, own[a])
                      for a in ("weight", "bias")}):
            h = orig(x)
        ws, bs = entry.slot("weight"), entry.slot("bias")
        w, b = entry.tensor("weight", gated), entry.tensor("bias", gated)
        N, C = h.shape[:2]
        smap = mb.batch_map(N, h.numel() // max(N * C, 1), f"module '{entry.name}' input", h.device)
        y = NormAffineFn.apply(h.movedim(1, -1), w, b, NormUse(record, smap, ws, bs)).movedim(-1, 1)
        return y[0] if unbatched else y


_UNBATCHED = {nn.InstanceNorm1d: 2, nn.InstanceNorm2d: 3, nn.InstanceNorm3d: 4}


def _unit(attr: str, p: Tensor) -> Tensor:
    return (torch.ones_like if attr == "weight" else torch.zeros_like)(p, requires_grad=False)


def _set(module, tensors: dict):
    """Give the module other tensors for its ``weight``/``bias`` parameters for a while."""
    given = {a: t for a, t in tensors.items() if t is not None}
    return _compat.swapped_parameters([(module, a) for a in given], list(given.values()))


def _check_per_feature(entry, layer, mb, args, out) -> None:
    x = mb.expand_shared(args[0], features=True) if args and isinstance(args[0], Tensor) else None
    if not (isinstance(out, Tensor) and x is not None and out.shape == x.shape
            and all(layer.params[i].numel() == x.shape[-1] for _, _, i in entry.slots)):
        _refuse_not_per_feature(entry)


def _refuse_not_per_feature(entry) -> None:
    cls = type(entry.module).__name__
    raise ValueError(
        f"ISOPO: normalisation layer '{entry.name}' ({cls}) does not act per feature of its "
        "input's last axis (a channels-first layer norm, say): the norm rule cannot apply. "
        "Normalise channels last (an nn.LayerNorm between x.permute(0, 2, 3, 1) and "
        "permute(0, 3, 1, 2)), or have ISOPO take the module as a black box, exact: before "
        f"building ISOPO, torch_isopo.rules.register({cls})(torch_isopo.rules.generic.GenericRule)")


def _acts_per_feature(entry, orig, args, kwargs) -> bool:
    """Whether every parameter entry acts on its own feature of the output's last axis, as the
    per-token pieces ``δ_t ⊙ ∂y_t/∂θ`` assume: checked once, on one row, by forward mode — a
    random tangent ``r`` must give the tangent of ones scaled by ``r`` along the last axis."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return False
    row = (x[:1] if x.dim() > 1 else x).detach()
    gen = torch.Generator(device=row.device).manual_seed(0)
    for owner, attr, _ in entry.slots:
        p = _compat.registered(owner, attr).detach()
        r = torch.rand(p.shape, generator=gen, device=p.device).to(p.dtype) + 0.5
        tangents = []
        for t in (torch.ones_like(p), r):
            with fwAD.dual_level(), torch.no_grad(), \
                    _compat.swapped_parameters([(owner, attr)], [fwAD.make_dual(p, t)]):
                y = orig(row, *args[1:], **kwargs)
                tangents.append(fwAD.unpack_dual(y).tangent if isinstance(y, Tensor) else None)
        ones, rand = tangents
        if ones is None or rand is None or y.shape[-1] != p.numel():
            return False
        tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 2e-2
        if not torch.allclose(rand.float(), (ones * r.reshape(-1)).float(), rtol=tol, atol=tol):
            return False
    return True


def _is_affine(entry, orig, args, kwargs) -> bool:
    """Check once, with random parameters, that the module computes ``h(x) ⊙ weight + bias``."""
    m = entry.module
    own = dict(m.named_parameters(recurse=False))
    if not args or not isinstance(args[0], Tensor) or any(
            owner is not m or attr not in ("weight", "bias") for owner, attr, _ in entry.slots):
        return False
    x = (args[0][:1] if args[0].dim() > 1 else args[0]).detach()   # one row (or the 1-D input)
    w, b = own.get("weight"), own.get("bias")
    if not isinstance(w, Tensor):
        return False
    gen = torch.Generator(device=w.device).manual_seed(0)
    rand = {"weight": torch.rand(w.shape, generator=gen, device=w.device).to(w.dtype) + 0.5,
            "bias": None if b is None else torch.randn(b.shape, generator=gen,
                                                        device=b.device).to(b.dtype)}
    unit = {"weight": torch.ones_like(w), "bias": None if b is None else torch.zeros_like(b)}
    with torch.no_grad():
        with _set(m, rand):
            y = orig(x, *args[1:], **kwargs)
        with _set(m, unit):
            h = orig(x, *args[1:], **kwargs)
    if not isinstance(y, Tensor) or not isinstance(h, Tensor) or y.shape != h.shape \
            or h.shape[-1] != w.numel():
        return False
    want = h * rand["weight"] + (0 if b is None else rand["bias"])
    tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(y.float(), want.float(), rtol=tol, atol=tol):
        return False
    fast = _normaliser(m)
    if fast is not None and len(args) == 1 and not kwargs:
        with torch.no_grad():
            if torch.allclose(fast(x).float(), h.float(), rtol=tol, atol=tol):
                entry.cache["normalise"] = fast
    return True


def _normaliser(m: nn.Module):
    """``x ↦ h(x)`` for the common norms, checked against the module's own forward before use:
    it saves the product with a unit weight (and its backward) on every call."""
    if type(m) is nn.LayerNorm:
        return lambda x: F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    if type(m) is nn.RMSNorm:
        return lambda x: F.rms_norm(x, m.normalized_shape, None, m.eps)
    eps = getattr(m, "variance_epsilon", None)
    if isinstance(eps, float):         # the Llama-family RMSNorm of Hugging Face
        def rms(x):
            x32 = x.to(torch.float32)
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return rms
    return None


def _forward_mode_pieces(use, xs, ps, pairs):
    """Per-token pieces ``δ_t ⊙ ∂y_t/∂θ`` by forward mode, one pass per parameter."""
    (_, d, smap), = pairs
    dt = work_dtype(d)
    cols = []
    for i, p in enumerate(ps):
        with fwAD.dual_level(), torch.no_grad():
            dual = [fwAD.make_dual(q.detach(), torch.ones_like(q)) if j == i else q.detach()
                    for j, q in enumerate(ps)]
            out = _compat.tree_flatten(use.call([x.detach() for x in xs], dual))[0][0]
            J = fwAD.unpack_dual(out).tangent
        cols.append((d.to(dt) * J.to(dt)).reshape(-1, p.numel()))
    return explicit_use(torch.cat(cols, 1), smap, d, use.record.wants_pieces)
