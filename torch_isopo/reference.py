"""A slow ISOPO that is obviously right: per-sample ``torch.autograd.grad`` and the formulas of
docs/math.md.

It shares nothing with the fast path except the grouping of parameters into layers. Use it on
a float64 copy of a small model to check the fast path, or to read what ISOPO computes.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .layers import GenericRuleWarning, find_layers


def _row_samples(shape, n, segments, sample_dim):
    """Sample id and token id of every row of an output whose token shape is ``shape``."""
    shape = tuple(shape)
    inner = math.prod(shape[2:]) if len(shape) > 2 else 1
    tokens = math.prod(shape[:2])
    token = torch.arange(tokens).repeat_interleave(inner)
    if segments is not None:
        return segments.reshape(-1).long()[token], token
    if len(shape) == 1:
        return torch.arange(shape[0]), token
    grid = torch.arange(n).view(-1, 1) if sample_dim == 0 else torch.arange(n).view(1, -1)
    return grid.expand(shape[0], shape[1]).reshape(-1)[token], token


def reference_gradients(model: nn.Module, sample_losses: Callable[[], Tensor], advantages,
                        mode: str, damping: float = 1.0, segments=None, sample_dim: int = 0,
                        m: dict[str, float] | None = None):
    """ISOPO gradients of every trainable parameter, with all positions as Fisher probes.

    ``sample_losses()`` runs the forward and returns the per-sample terms ``ℓ_i`` of the
    advantage-free loss ``L = Σ_i ℓ_i``. ``m`` optionally replaces each layer's statistic.
    Returns ``({param: grad}, {layer name: m of this batch})``.
    """
    A = torch.as_tensor(advantages, dtype=torch.float64)
    n = A.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericRuleWarning)
        layers = find_layers(model)
    losses, calls = _record_calls(layers, sample_losses, n, segments, sample_dim)
    grads, stats = {}, {}
    for layer in layers:
        params = layer.params
        G = torch.stack([_flat(torch.autograd.grad(losses[i], params, retain_graph=True,
                                                   allow_unused=True), params)
                         for i in range(n)]).double()
        pieces = None
        if mode == "fisher":
            pieces = torch.cat([_pieces(layer, e, call, losses, n, segments, sample_dim)
                                for e in layer.entries for call in calls.get(id(e), [])])
        c, stats[layer.name] = _coefficients(mode, G, pieces, A, damping,
                                             None if not m else m.get(layer.name))
        flat = c.to(G.dtype) @ G
        start = 0
        for p in params:
            grads[p] = flat[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
    return grads, {k: v for k, v in stats.items() if v is not None}


def _record_calls(layers, sample_losses, n, segments, sample_dim):
    """Run the forward, recording every layer module's call: ``(losses, {entry: [calls]})``."""
    calls: dict[int, list] = {}
    handles = []
    for layer in layers:
        for e in layer.entries:
            def pre(mod, args, kwargs, e=e):
                args = _expand_shared(args, e.rule.name, n, segments, sample_dim)
                calls.setdefault(id(e), []).append([args, kwargs, None])
                return args, kwargs

            def post(mod, args, kwargs, out, e=e):
                calls[id(e)][-1][2] = out
            handles.append(e.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(e.module.register_forward_hook(post, with_kwargs=True))
    try:
        return sample_losses(), calls
    finally:
        for h in handles:
            h.remove()


def _coefficients(mode, G, pieces, A, damping, m_given):
    """``(c, m)`` of the layer by the formulas of docs/math.md (``m`` None for reinforce)."""
    n = A.numel()
    if mode == "reinforce":
        return A, None
    if mode == "ntk":
        K = G @ G.T
        m = float(K.trace()) / n
        rho = damping * (m if m_given is None else m_given)
        c = rho * torch.linalg.solve(K + rho * torch.eye(n, dtype=K.dtype), A) if rho > 0 else A
        return c, m
    dots = pieces @ G.T
    total = (pieces ** 2).sum()
    nu2 = (dots ** 2).sum(0) / total if total > 0 else torch.zeros(n, dtype=G.dtype)
    m = float(nu2.mean())
    rho = damping * (m if m_given is None else m_given)
    den = torch.sqrt(nu2 + rho)
    return torch.where(den > 0, A / torch.where(den > 0, den, 1.0), 0.0), m


def _expand_shared(args, rule, n, segments, sample_dim):
    """Inputs of size 1 on the sample axis are shared by all samples: give each its own copy."""
    if not args or not isinstance(args[0], Tensor) or segments is not None or n == 1:
        return args
    x = args[0]
    rows = x.dim() if rule == "embedding" else x.dim() - 1
    if rows >= 2 and x.shape[sample_dim] == 1:
        shape = list(x.shape)
        shape[sample_dim] = n
        return (x.expand(shape), *args[1:])
    return args


def _flat(gs, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(gs, params)])


def _pieces(layer, entry, call, losses, n, segments, sample_dim):
    """Fisher pieces of one use: per token (linear and norm layers) or per sample (generic)."""
    args, kwargs, out = call
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, Tensor) and o.requires_grad]
    deltas = torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)
    # the use's own contribution: recompute it from detached inputs
    det = lambda t: t.detach() if isinstance(t, Tensor) else t
    fresh = entry.module.forward(*[det(a) for a in args], **{k: det(v) for k, v in kwargs.items()})
    fresh = [o for o in (fresh if isinstance(fresh, (tuple, list)) else [fresh])
             if isinstance(o, Tensor) and o.requires_grad]
    per_token = layer.rule != "generic"
    rows = []
    maps = [_row_samples(o.shape[:-1], n, segments, sample_dim) for o in fresh]
    groups = int(maps[0][1].max()) + 1 if per_token else n
    for g in range(groups):
        gs = []
        for (samp, tok), d in zip(maps, deltas):
            keep = (tok == g) if per_token else (samp == g)
            d = torch.zeros_like(fresh[0]) if d is None else d
            gs.append((d.reshape(keep.numel(), -1) * keep[:, None].to(d.dtype)).view_as(d))
        rows.append(_flat(torch.autograd.grad(fresh, layer.params, gs, retain_graph=True,
                                              allow_unused=True), layer.params))
    return torch.stack(rows).double()
