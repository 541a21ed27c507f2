"""The autograd ops through which a model runs inside a microbatch.

Every layer's trainable parameters pass through one ``Gate`` per microbatch; each use of the
layer (one forward call of one of its modules) runs as an op whose backward returns the input
gradient and hands the layer's per-sample material to the gate's pending record. Autograd runs
the gate's backward after all uses, and that backward returns the finished ISOPO gradient, so
clipping, loss scalers, DDP and FSDP all see it. Nothing here keeps state outside the graph.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd import forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_unflatten

from .engine import ExplicitUse
from .kernels import FactorUse, work_dtype


class Gate(Function):
    """Identity on the layer's parameters; its backward is where the ISOPO gradient is made."""

    @staticmethod
    def forward(ctx, pending, *params):
        ctx.set_materialize_grads(False)
        ctx.pending = pending
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *_):
        return (None, *ctx.pending.finish())


def graph_microbatch(node, isopo):
    """The microbatch of ``isopo`` that built the graph of autograd ``node``: that of the nearest
    of its gates below it (breadth first), or None for a graph built outside its microbatches."""
    todo, seen = collections.deque([node]), {node}
    while todo:
        fn = todo.popleft()
        if isinstance(fn, Gate._backward_cls) and fn.pending.isopo is isopo:
            return fn.pending.mb
        for nxt, _ in fn.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return None


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return None


def _cast(dtype, *ts):
    return tuple(None if t is None else t.to(dtype) for t in ts)


class LinearFn(Function):
    """``y = x Wᵀ + b`` (``nn.Linear``) or ``y = x W + b`` (Hugging Face ``Conv1D``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, use):
        dtype = _autocast_dtype(x)
        if dtype is None:
            out = LinearFn._apply(x, weight, bias, use.conv1d)
        else:                        # what autocast would run: the op in its lower precision
            x, weight, bias = _cast(dtype, x, weight, bias)
            with torch.autocast(x.device.type, enabled=False):
                out = LinearFn._apply(x, weight, bias, use.conv1d)
        ctx.save_for_backward(x, weight)
        ctx.use = use
        return out

    @staticmethod
    def _apply(x, weight, bias, conv1d):
        if not conv1d:
            return F.linear(x, weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
        return out.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        use = ctx.use
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight.T if use.conv1d else dy @ weight
        a, d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        U, V, delta = (a, d, "V") if use.conv1d else (d, a, "U")
        use.pending.add(FactorUse(U, V, use.smap, delta, use.weight, use.bias))
        return dx, None, None, None


class EmbeddingFn(Function):
    """``y = W[ids]``: a linear layer on one-hot inputs."""

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
        use.pending.add(FactorUse(ids, d, use.smap, "V", True, False))
        return None, None, None


_TENSOR = object()  # placeholder for a tensor argument in ``use.in_consts``


def call_with(use, args, params):
    """Run the module's own forward with the layer's parameters replaced by ``params``."""
    saved = []
    for mod, name, i in use.slots:
        saved.append((mod, name, mod._parameters[name]))
        mod._parameters[name] = params[i]
    try:
        it = iter(args)
        leaves = [next(it) if c is _TENSOR else c for c in use.in_consts]
        a, kw = tree_unflatten(leaves, use.in_spec)
        return use.orig(*a, **kw)
    finally:
        for mod, name, p in reversed(saved):
            mod._parameters[name] = p


class RecomputeFn(Function):
    """Any module with its own parameters, as a black box recomputed in the backward.

    Norm layers get per-token Fisher pieces (their parameters act per feature, so one
    forward-mode pass per parameter gives every token's piece); other modules get exact
    per-sample gradients from one vector-Jacobian product per sample.
    """

    @staticmethod
    def forward(ctx, use, *flat):
        args, params = flat[:use.n_args], flat[use.n_args:]
        dev = next((t.device for t in flat if isinstance(t, Tensor)), torch.device("cpu"))
        ctx.autocast = (dev.type, torch.is_autocast_enabled(dev.type),
                        torch.get_autocast_dtype(dev.type))
        ctx.rng = torch.get_rng_state() if use.kind == "generic" else None
        ctx.cuda_rng = (torch.cuda.get_rng_state(dev) if ctx.rng is not None and dev.type == "cuda"
                        else None)
        with torch.no_grad():
            out = call_with(use, args, params)
        leaves, spec = tree_flatten(out)
        use.set_outputs(leaves, spec)
        tensors = tuple(t for t in leaves if isinstance(t, Tensor))
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        ctx.save_for_backward(*flat)
        ctx.use = use
        return tensors

    @staticmethod
    def backward(ctx, *douts):
        use = ctx.use
        flat = ctx.saved_tensors
        args, params = flat[:use.n_args], flat[use.n_args:]
        dev, enabled, dtype = ctx.autocast
        xs = [a.detach().requires_grad_(need) for a, need in zip(args, ctx.needs_input_grad[1:1 + use.n_args])]
        ps = [p.detach().requires_grad_() for p in params]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
            if ctx.rng is not None:
                stack.enter_context(torch.random.fork_rng(devices=[] if ctx.cuda_rng is None else [torch.device(dev)]))
                torch.set_rng_state(ctx.rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng)
            outs = [t for t in tree_flatten(call_with(use, xs, ps))[0] if isinstance(t, Tensor)]
        pairs = [(o, g, m) for o, g, m in zip(outs, douts, use.out_maps)
                 if g is not None and o.requires_grad]
        need = [x for x, nd in zip(xs, ctx.needs_input_grad[1:1 + use.n_args]) if nd]
        grads_x = iter(())
        if need and pairs:
            grads_x = iter(torch.autograd.grad([o for o, _, _ in pairs], need,
                                               [g for _, g, _ in pairs], retain_graph=True,
                                               allow_unused=True))
        dxs = [next(grads_x) if nd else None for nd in ctx.needs_input_grad[1:1 + use.n_args]]
        if pairs:
            if use.kind == "norm":
                use.pending.add(_norm_use(use, xs, ps, pairs))
            else:
                use.pending.add(_generic_use(use, ps, pairs))
        return (None, *dxs, *([None] * len(params)))


class NormAffineFn(Function):
    """``y = h ⊙ weight + bias``: the affine step of a normalisation layer, whose parameter-free
    part ``h`` ran through the module's own forward."""

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
        rows = (d * h.to(dt)).reshape(-1, D) if use.weight else d.reshape(-1, D)
        if use.weight and use.bias:
            rows = torch.cat([rows, d.reshape(-1, D)], 1)
        use.pending.add(explicit_use(rows, use.smap, d, use.pending.isopo.mode == "fisher"))
        return dh, None, None, None


def explicit_use(rows: Tensor, smap, delta: Tensor, pieces: bool) -> ExplicitUse:
    """Per-row gradient pieces ``rows (N, D)`` → per-sample gradients and, for the Fisher mode,
    per-token pieces with the tokens whose output gradient is non-zero."""
    G = smap.reduce(rows, 0)
    if not pieces:
        return ExplicitUse(G, None, None)
    per_token = rows.view(smap.tokens, smap.inner, -1).sum(1)
    return ExplicitUse(G, per_token, delta.reshape(smap.tokens, -1).abs().sum(1) > 0)


def _norm_use(use, xs, ps, pairs) -> ExplicitUse:
    """Per-token pieces ``δ_t ⊙ ∂y_t/∂θ`` by forward mode, one pass per parameter."""
    (_, d, smap), = pairs
    dt = work_dtype(d)
    cols = []
    for i, p in enumerate(ps):
        with fwAD.dual_level(), torch.no_grad():
            dual = [fwAD.make_dual(q.detach(), torch.ones_like(q)) if j == i else q.detach()
                    for j, q in enumerate(ps)]
            out = tree_flatten(call_with(use, [x.detach() for x in xs], dual))[0][0]
            J = fwAD.unpack_dual(out).tangent
        cols.append((d.to(dt) * J.to(dt)).reshape(-1, p.numel()))
    return explicit_use(torch.cat(cols, 1), smap, d, use.pending.isopo.mode == "fisher")


def _generic_use(use, ps, pairs) -> ExplicitUse:
    """Exact per-sample gradients: one vector-Jacobian product per sample."""
    n = use.pending.n
    dt = work_dtype(pairs[0][1])
    outs = [o for o, _, _ in pairs]
    rows = []
    for i in range(n):
        gs = [(g.reshape(m.rows, -1) * (m.ids == i)[:, None].to(g.dtype)).view_as(g)
              for _, g, m in pairs]
        grads = torch.autograd.grad(outs, ps, gs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(dt)
                               for g, p in zip(grads, ps)]))
    G = torch.stack(rows)
    return ExplicitUse(G, G, G.abs().sum(1) > 0)
