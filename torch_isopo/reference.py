"""A slow ISOPO that is obviously right: per-sample ``torch.autograd.grad`` and the formulas of
docs/math.md.

It shares two definitions with the fast path and nothing else: which parameters form a layer
(``layers.find_layers``) and what a ``fisher`` position of the layer's rule is (``Rule.pieces``:
an output row, an output location, or the sample). Per-sample gradients come from the per-sample
losses; a position's piece is the gradient through that position of one module call, recomputed
from the call's detached inputs. Use it on a float64 copy of a small model to check the fast
path, or to read what ISOPO computes.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from . import _compat
from .gate import find_node
from .layers import GenericRuleWarning, find_layers


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
    before = [(b, b.clone()) for b in model.buffers()]
    losses, calls = _record_calls(layers, sample_losses, n, segments, sample_dim)
    after = [(b, b.clone()) for b in model.buffers()]
    moved = [i for i, ((_, u), (_, v)) in enumerate(zip(before, after)) if not torch.equal(u, v)]
    before, after = [before[i] for i in moved], [after[i] for i in moved]
    grads, stats = {}, {}
    for layer in layers:
        made = [t for e in layer.entries for _, _, out, _ in calls.get(id(e), [])
                for t in _leaves(out)]
        if made and not any(t.requires_grad for t in made) and _reentrant(losses):
            # (a layer run only without grad, a critic weighting the actor's loss, has zero
            # per-sample gradients; under reentrant checkpointing autograd.grad cannot run)
            raise RuntimeError(f"no output of layer '{layer.name}' was made with autograd")
        params = layer.params
        G = torch.stack([_flat(torch.autograd.grad(losses[i], params, retain_graph=True,
                                                   allow_unused=True), params)
                         for i in range(n)]).double()
        pieces = None
        if mode == "fisher":                  # a layer whose modules never ran has no pieces
            pieces = G if layer.pieces == "samples" else torch.cat(
                [G[:0]] + [_pieces(layer, e, call, losses, before, after) for e in layer.entries
                           for call in calls.get(id(e), [])])
        c, stats[layer.name] = _coefficients(mode, G, pieces, A, damping,
                                             None if not m else m.get(layer.name))
        flat = c.to(G.dtype) @ G
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            grads[p] = g.view_as(p).to(p.dtype)
    return grads, {k: v for k, v in stats.items() if v is not None}


def _record_calls(layers, sample_losses, n, segments, sample_dim):
    """Run the forward, recording every layer module's call: ``(losses, {entry: [calls]})``.

    The outputs the rest of the model sees are copies of aliases of the module's own, so the
    gradient reaching the aliases is what flows in from outside the call (a module whose outputs
    feed each other, such as ``LSTMCell``'s ``(h, c)``, is not counted twice), also when the model
    scales them in place."""
    calls: dict[int, list] = {}
    handles = []
    for layer in layers:
        for e in layer.entries:
            def pre(mod, args, kwargs, e=e):
                if mod is not e.module:          # a copy of the module made in the forward
                    return None
                args = _expand_shared(args, e.rule.name, n, segments, sample_dim)
                dev = next((t.device.type for t in (*args, *kwargs.values())
                            if isinstance(t, Tensor)), "cpu")
                amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                calls.setdefault(id(e), []).append([args, kwargs, None, amp])
                return args, kwargs

            def post(mod, args, kwargs, out, e=e):
                if mod is not e.module:
                    return None
                alias = _alias(out)
                calls[id(e)][-1][2] = alias
                return _copied(alias)
            # the call's own inputs, before the user's pre-hooks; its output after their hooks
            handles.append(e.module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(e.module.register_forward_hook(post, with_kwargs=True))
    try:
        with _compat.eager_compiled():    # a compiled model's code would skip the hooks
            return sample_losses(), calls
    finally:
        for h in handles:
            h.remove()


def _alias(out):
    if isinstance(out, Tensor):
        return out.view_as(out) if out.requires_grad else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_alias(o) for o in out)
    return out


def _leaves(out) -> list[Tensor]:
    """The tensors of a module's output, also inside tuples (``PackedSequence``, ``(h, c)``)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []


def _copied(out):
    """What the rest of the model gets: a copy of the alias, which an in-place op there (CTRL's
    ``inputs_embeds *= sqrt(d)``) changes without changing the alias the pieces are taken at."""
    if isinstance(out, Tensor):
        return out.clone() if out.requires_grad else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_copied(o) for o in out)
    return out


def _coefficients(mode, G, pieces, A, damping, m_given):
    """``(c, m)`` of the layer by the formulas of docs/math.md (``m`` None for reinforce)."""
    n = A.numel()
    if mode == "reinforce":
        return A, None
    if mode == "ntk":
        K = G @ G.T
        m = float(K.trace()) / n
        rho = damping * (m if m_given is None else m_given)
        eye = torch.eye(n, dtype=K.dtype, device=K.device)
        c = rho * torch.linalg.solve(K + rho * eye, A) if rho > 0 else A
        return c, m
    dots = pieces @ G.T
    total = (pieces ** 2).sum()
    nu2 = (dots ** 2).sum(0) / total if total > 0 else G.new_zeros(n)
    m = float(nu2.mean())
    rho = damping * (m if m_given is None else m_given)
    den = torch.sqrt(nu2 + rho)
    return torch.where(den > 0, A / torch.where(den > 0, den, 1.0), 0.0), m


def _expand_shared(args, rule, n, segments, sample_dim):
    """Inputs of size 1 on the sample axis are shared by all samples: give each its own copy
    (not for the layers that know their batch axis: there a batch of one is one sample's)."""
    if not args or not isinstance(args[0], Tensor) or segments is not None or n == 1 or rule in (
            "attention", "recurrent", "recurrent_cell"):
        return args
    x = args[0]
    rows = x.dim() if rule == "embedding" else x.dim() - 1
    axis = 0 if rule in ("conv", "channel_norm") else sample_dim    # channels-first: batch first
    if rows >= 2 and x.shape[axis] == 1:
        shape = list(x.shape)
        shape[axis] = n
        return (x.expand(shape), *args[1:])
    return args


def _reentrant(t: Tensor) -> bool:
    """Whether ``t``'s graph holds a region of reentrant activation checkpointing."""
    return find_node(t.grad_fn, _compat.reentrant_recompute) is not None


def _flat(gs, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(gs, params)])


def _positions(out: Tensor, kind: str) -> Tensor:
    """The position of every element of a call's output: an output row (the leading dims after
    the first two belong to their token) or a location of a channel-first output."""
    if kind == "channels":
        N, C = out.shape[:2]
        loc = torch.arange(N * math.prod(out.shape[2:]), device=out.device).view(N, 1, -1)
        return loc.expand(N, C, loc.shape[-1]).reshape(out.shape)
    shape = out.shape[:-1]
    inner = math.prod(shape[2:]) if len(shape) > 2 else 1
    token = torch.arange(math.prod(shape), device=out.device) // inner
    return token.view(*shape, 1).expand(out.shape)


def _unbatched(module: nn.Module, out: Tensor, kind: str) -> bool:
    """A channel-first output without its batch axis (a convolution or instance norm called on
    one unbatched input)."""
    if kind != "channels":
        return False
    for types, rank in ((nn.Conv1d, nn.InstanceNorm1d), 2), ((nn.Conv2d, nn.InstanceNorm2d), 3), \
            ((nn.Conv3d, nn.InstanceNorm3d), 4):
        if isinstance(module, types):
            return out.dim() == rank
    return False


def _pieces(layer, entry, call, losses, before, after):
    """Fisher pieces of one module call: the gradient through each position of its output.

    The call is recomputed from its detached inputs, under the autocast state it ran in, with
    the module's hooks and the buffers as the forward found them (a spectral norm's power
    iteration repeats exactly), then the buffers are put back."""
    args, kwargs, out, (dev, enabled, dtype) = call
    outs = [o for o in (out if isinstance(out, tuple) else [out])
            if isinstance(o, Tensor) and o.requires_grad]
    if not outs:                         # a call under no_grad (a target from the same body)
        return torch.zeros(0, sum(p.numel() for p in layer.params), dtype=torch.float64)
    deltas = torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)
    det = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
    with torch.no_grad():
        for b, v in before:
            b.data.copy_(v)     # (not counted as a change: the graph saved some)
    with torch.autocast(dev, dtype=dtype, enabled=enabled):     # as the call ran
        fresh = entry.module(*[det(a) for a in args], **{k: det(v) for k, v in kwargs.items()})
    with torch.no_grad():
        for b, v in after:
            b.data.copy_(v)     # (not counted as a change: the graph saved some)
    fresh = [o for o in (fresh if isinstance(fresh, tuple) else [fresh])
             if isinstance(o, Tensor) and o.requires_grad]
    where = [_positions(o[None], layer.pieces)[0] if _unbatched(entry.module, o, layer.pieces)
             else _positions(o, layer.pieces) for o in fresh]
    count = int(max(int(w.max()) for w in where)) + 1
    rows = []
    for t in range(count):
        gs = [torch.zeros_like(o) if d is None else d * (w == t).to(d.dtype)
              for o, d, w in zip(fresh, deltas, where)]
        rows.append(_flat(torch.autograd.grad(fresh, layer.params, gs, retain_graph=True,
                                              allow_unused=True), layer.params))
    return torch.stack(rows).double()
