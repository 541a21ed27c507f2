"""The generic rule: a module with its own parameters and no dedicated rule, as a black box.

Its forward runs as one op that saves the inputs; the backward recomputes the module (with the
random state of its forward, so dropout repeats) and takes exact per-sample gradients of its
parameters from one vector-Jacobian product per sample. The recompute machinery is shared with
rules whose per-sample material needs the module's own forward (per-feature norms).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.autograd import Function

from .. import _compat
from ..factors import work_dtype
from ..finish import ExplicitUse
from ..gate import own_op
from . import Rule

_TENSOR = object()  # placeholder for a tensor argument in ``RecomputeUse.in_consts``


class RecomputeUse:
    """What a recomputed module's backward needs: how to call it and how to split its outputs.

    ``material(use, inputs, params, pairs)`` makes the per-sample material from the recomputed
    graph; ``pairs`` are ``(output, output gradient, sample map)`` of the differentiable outputs.
    """

    def __init__(self, record, mb, entry, orig, args, kwargs, material, rng: bool):
        leaves, self.in_spec = _compat.tree_flatten((args, kwargs))
        self.record, self.mb, self.entry, self.orig = record, mb, entry, orig
        self.material, self.rng = material, rng
        self.inputs = [t for t in leaves if isinstance(t, Tensor)]
        self.in_consts = [_TENSOR if isinstance(t, Tensor) else t for t in leaves]
        self.out_maps, self.out_consts, self.out_spec = [], [], None

    def set_outputs(self, leaves, spec, per_sample=None) -> None:
        """Record the output structure and map every float output's rows to samples, features
        last. A 1-D output holds one value per sample only if it is computed from the samples'
        inputs: ``per_sample()`` (a second forward that follows the data) says whether it is;
        otherwise it may be a vector shared by all samples (a parameter returned as it is),
        which looks alike whatever its length, and it is refused."""
        where = f"module '{self.entry.name}' output"
        first = self.inputs[0] if self.inputs else None
        held = next((t for t in leaves if not isinstance(t, Tensor)
                     and any(isinstance(v, Tensor) for v in getattr(t, "__dict__", {}).values())),
                    None)
        if held is not None:
            raise TypeError(
                f"ISOPO: {where} is a {type(held).__name__}, an object holding tensors: the "
                "generic rule (a module with parameters of its own and no rule) returns tensors, "
                "in tuples, lists or dicts. Return the tensors it is built from (logits, mean "
                "and scale) and build it outside the module, or keep the parameters in child "
                "modules (nn.Linear), whose parent may return any object")
        if any(isinstance(t, Tensor) and t.is_complex() for t in leaves):
            raise TypeError(
                f"ISOPO: {where} is complex: the generic rule maps real outputs to samples. "
                "Return its real and imaginary parts (torch.view_as_real(z)) and combine them "
                "outside the module")
        flat = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 1]
        rows = self.mb.n > 1 and bool(flat)
        if rows and not (self.mb.segments is None and all(t.numel() == self.mb.n for t in flat)
                         and per_sample is not None and per_sample()):
            raise ValueError(
                f"ISOPO: {where} is 1-D (shape {tuple(flat[0].shape)}) and not computed from the "
                "samples' inputs row by row: ISOPO cannot tell one value per sample from a vector "
                "shared by all samples. Return per-sample values with a trailing axis "
                "(out[:, None]); broadcast a shared vector against the batch (v.expand(n, -1)), "
                "or leave such a parameter on the parent module, where ISOPO follows it to the "
                "samples")
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        # a recurrent module's hidden states (h_n, c_n) are (layers, batch, features) whatever
        # its batch_first says (an RNN with a parametrized weight takes this rule); a
        # convolution's output (a transposed one, a grouped one parametrized) is (batch,
        # channels, *spatial) whatever sample_dim says
        m = self.entry.module
        rnn = isinstance(m, nn.RNNBase)
        conv = _batched_rank(m)
        self.out_maps = [None if not t.is_floating_point()
                         else self.mb.batch_map(t.shape[1], t.shape[0], where, t.device, False)
                         if rnn and k > 0 and t.dim() == 3
                         else self.mb.batch_map(t.shape[0], math.prod(t.shape[1:-1]), where,
                                                t.device) if t.dim() == conv
                         else self.mb.sample_map(t.shape if t.dim() == 1 else t.shape[:-1], where,
                                                 t.device, first)
                         for k, t in enumerate(tensors)]
        self.out_consts = [_TENSOR if isinstance(t, Tensor) else t for t in leaves]
        self.out_spec = spec

    def call(self, inputs, params):
        """The module's own forward on ``inputs``, with the layer's parameters set to ``params``."""
        it = iter(inputs)
        a, kw = _compat.tree_unflatten([next(it) if c is _TENSOR else c for c in self.in_consts],
                                       self.in_spec)
        slots = self.entry.slots
        with _compat.swapped_parameters([(m, attr) for m, attr, _ in slots],
                                        [params[i] for _, _, i in slots]):
            return self.orig(*a, **kw)


@own_op
class RecomputeFn(Function):
    """A module run without autograd in the forward and recomputed in the backward."""

    @staticmethod
    def forward(ctx, use, *flat):
        n = len(use.inputs)
        inputs, params = flat[:n], flat[n:]
        dev = next((t.device for t in flat if isinstance(t, Tensor)), torch.device("cpu"))
        ctx.autocast = (dev.type, torch.is_autocast_enabled(dev.type),
                        torch.get_autocast_dtype(dev.type))
        ctx.rng = torch.get_rng_state() if use.rng else None
        ctx.cuda_rng = (torch.cuda.get_rng_state(dev) if ctx.rng is not None and dev.type == "cuda"
                        else None)
        ctx.device = dev
        before = [(b, b.clone()) for b in use.entry.module.buffers()]
        # with grad, as the recompute runs and as a plain training forward would: modules with a
        # fast path for inference (nn.TransformerEncoder in eval mode) compute otherwise without
        with torch.enable_grad():
            out = use.call(inputs, params)
        # buffers the forward moved (running statistics, power iterations): the recompute
        # starts from where this forward started
        ctx.buffers = [(b, v) for b, v in before if not torch.equal(b, v)]
        ctx.modes = [(m, m.training) for m in use.entry.module.modules()]
        leaves, spec = _compat.tree_flatten(out)
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]   # (graph dropped)
        use.set_outputs(leaves, spec, lambda: _from_samples(use, ctx, inputs, params))
        tensors = tuple(t for t in leaves if isinstance(t, Tensor))
        ctx.prints = [_fingerprint(t) for t in tensors if t.is_floating_point()]
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        ctx.save_for_backward(*flat)
        ctx.use = use
        return tensors

    @staticmethod
    def backward(ctx, *douts):
        use = ctx.use
        n = len(use.inputs)
        flat = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:1 + n]
        xs = [a.detach().requires_grad_(need) for a, need in zip(flat[:n], needs)]
        ps = [p.detach().requires_grad_() for p in flat[n:]]
        buffers = [(b, b.clone()) for b in use.entry.module.buffers()]
        _restore(ctx.buffers)
        with _replayed(ctx):
            outs = [t for t in _compat.tree_flatten(use.call(xs, ps))[0] if isinstance(t, Tensor)]
        if not _same(ctx.prints, outs):
            _restore(buffers)
            raise _changed(use.entry.name)
        pairs = [(o, g, m) for o, g, m in zip(outs, douts, use.out_maps)
                 if g is not None and o.requires_grad]
        need = [x for x, nd in zip(xs, needs) if nd]
        grads_x = iter(())
        if need and pairs:
            grads_x = iter(torch.autograd.grad([o for o, _, _ in pairs], need,
                                               [g for _, g, _ in pairs], retain_graph=True,
                                               allow_unused=True))
        dxs = [next(grads_x) if nd else None for nd in needs]
        if pairs:
            use.record.add(use.material(use, xs, ps, pairs))
        _restore(buffers)
        return (None, *dxs, *([None] * len(ps)))


def _fingerprint(t: Tensor) -> Tensor:
    """Two numbers that change with any output: its sum and its norm, in float64."""
    t = t.detach()
    return torch.stack([t.sum(dtype=torch.float64),
                        torch.linalg.vector_norm(t, dtype=torch.float64)])


def _same(prints: list[Tensor], outs: list[Tensor]) -> bool:
    """Whether the recompute gave the forward's outputs (to rounding): else the module's
    forward read state that changed in between, and the gradients would be another forward's."""
    now = [o for o in outs if o.is_floating_point()]
    if len(now) != len(prints):
        return False
    for a, o in zip(prints, now):
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(o.dtype, 1e-2)
        scale = a[1] * torch.tensor([math.sqrt(max(o.numel(), 1)), 1.0], dtype=a.dtype,
                                    device=a.device)
        b = _fingerprint(o)
        close = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= tol * scale)  # -inf logits
        if not bool(close.all()):
            return False
    return True


def _changed(name: str) -> RuntimeError:
    return RuntimeError(
        f"ISOPO: module '{name}' (generic rule: recomputed from its inputs in the backward) gave "
        "another output when run again than in its forward: the forward reads state that "
        "changed in between (an attribute or a counter its forward moves or that was set after "
        "it, noise drawn with a generator of its own), so its gradients would be another "
        "forward's. Keep that state fixed from the forward to the backward (reset_noise() after "
        "the backward), draw the noise with torch's global generator or into a buffer, or give "
        "the module a rule")


class _DataFlow(torch.overrides.TorchFunctionMode):
    """Marks every tensor computed from a marked one (ids, through indexing, too)."""

    def __init__(self, marked):
        super().__init__()
        self.marked = {id(t): t for t in marked}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = _compat.tree_flatten((args, kwargs or {}))[0]
        if any(isinstance(t, Tensor) and id(t) in self.marked for t in leaves):
            for t in _compat.tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.marked[id(t)] = t
        return out


def _from_samples(use, ctx, inputs, params) -> bool:
    """Whether every 1-D float output of the module is computed from its per-sample inputs (those
    with ``n`` entries along the sample axis, ids included): the forward run again, following
    the data, with the forward's random state; buffers are left as the forward left them."""
    mb = use.mb
    rows = [x for x in inputs if x.dim() >= 1
            and x.shape[mb.sample_dim if x.dim() >= 3 else 0] == mb.n]
    if not rows:
        return False
    buffers = [(b, b.clone()) for b in use.entry.module.buffers()]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if ctx.rng is not None:
            stack.enter_context(torch.random.fork_rng(
                devices=[] if ctx.cuda_rng is None else [ctx.device]))
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
        flow = stack.enter_context(_DataFlow(rows))
        out = use.call(inputs, params)
    _restore(buffers)
    return all(id(t) in flow.marked for t in _compat.tree_flatten(out)[0]
               if isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 1)


def _restore(buffers) -> None:
    """Set buffers to saved values: before a recompute, those the forward started from; after
    it, those the forward left (running statistics, power iterations), so the module ran once,
    in the forward, as a plain forward runs it."""
    with torch.no_grad():
        for b, v in buffers:
            if not torch.equal(b, v):
                b.copy_(v)


@contextlib.contextmanager
def _replayed(ctx):
    """Grad mode, the forward's autocast state, train/eval modes and, where saved, its random
    state."""
    dev, enabled, dtype = ctx.autocast
    now = [(m, m.training) for m, _ in ctx.modes]
    for m, training in ctx.modes:
        m.training = training
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [setattr(m, "training", t) for m, t in now])
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
        if ctx.rng is not None:
            stack.enter_context(torch.random.fork_rng(
                devices=[] if ctx.cuda_rng is None else [torch.device(dev)]))
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
        yield


def _batched_rank(module) -> int | None:
    """The rank of a convolution's batched input and output ``(N, C, *spatial)`` (its batch axis
    is dim 0 whatever ``sample_dim`` says), None for other modules."""
    if _compat.is_convolution(module):
        return len(module.kernel_size) + 2
    return None


def recompute(mb, layer, entry, orig, args, kwargs, material, rng: bool):
    """Run the module as a ``RecomputeFn``: the output, with the module's own structure."""
    record, gated = mb.gate(layer)
    leaves, spec = _compat.tree_flatten((args, kwargs))
    first = next((i for i, t in enumerate(leaves) if isinstance(t, Tensor)), None)
    if first is not None:
        conv = _batched_rank(entry.module) == leaves[first].dim()
        leaves[first] = mb.expand_shared(leaves[first], features=True,
                                         axis=0 if conv else None, name=entry.name)
    args, kwargs = _compat.tree_unflatten(leaves, spec)
    use = RecomputeUse(record, mb, entry, orig, args, kwargs, material, rng)
    outs = iter(RecomputeFn.apply(use, *use.inputs, *gated))
    leaves = [next(outs) if c is _TENSOR else c for c in use.out_consts]
    return _compat.tree_unflatten(leaves, use.out_spec)


def explicit_use(rows: Tensor, smap, delta: Tensor, pieces: bool, slots=None) -> ExplicitUse:
    """Per-row gradient pieces ``rows (N, D)`` over the parameters ``slots`` → per-sample
    gradients and, for the Fisher mode, per-token pieces with the tokens whose output gradient
    is non-zero."""
    G = smap.reduce(rows, 0)
    if not pieces:
        return ExplicitUse(G, None, None, slots)
    per_token = rows.view(smap.tokens, smap.inner, -1).sum(1)
    return ExplicitUse(G, per_token, delta.reshape(smap.tokens, -1).abs().sum(1) > 0, slots)


def per_sample_vjp(use, xs, ps, pairs) -> ExplicitUse:
    """Exact per-sample gradients: the vector-Jacobian products of the recomputed module with
    each output gradient restricted to one sample's rows, vectorised over samples (in chunks that
    fit the memory budget), one sample at a time where an op has no batching rule."""
    n = use.record.n
    dt = work_dtype(pairs[0][1])
    outs = [o for o, _, _ in pairs]
    size = sum(g.numel() * g.element_size() for _, g, _ in pairs)
    step = max(1, min(n, use.mb.settings.budget_bytes // max(size, 1)))
    rows = []
    for start in range(0, n, step):
        ids = torch.arange(start, min(n, start + step), device=pairs[0][1].device)
        gs = [_restricted(g, m, ids) for _, g, m in pairs]
        try:
            grads = torch.autograd.grad(outs, ps, gs, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:
            grads = [torch.stack(col) if col[0] is not None else None for col in zip(*[
                torch.autograd.grad(outs, ps, [g[k] for g in gs], retain_graph=True,
                                    allow_unused=True) for k in range(ids.numel())])]
        rows.append(torch.cat([(p.new_zeros(ids.numel(), p.numel()) if g is None else
                                g.reshape(ids.numel(), -1)).to(dt) for g, p in zip(grads, ps)], 1))
    return ExplicitUse(torch.cat(rows), None, None)


def _restricted(g: Tensor, m, ids: Tensor) -> Tensor:
    """``(len(ids), *g.shape)``: the output gradient ``g`` restricted to each sample's rows."""
    keep = (m.ids[None, :] == ids[:, None]).to(g.dtype)
    return (keep[:, :, None] * g.reshape(1, m.rows, -1)).view(ids.numel(), *g.shape)


class GenericRule(Rule):
    """Any module with its own parameters and no dedicated rule (with everything below it)."""

    name = "generic"
    whole_subtree = True
    pieces = "samples"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        return recompute(mb, layer, entry, orig, args, kwargs, per_sample_vjp, rng=True)
