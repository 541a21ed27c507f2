"""Free parameters: those of a module that has no rule of its own but whose children have theirs.

A policy's state-independent ``log_std``, a learned position table or a class token live on a
container and are used by arbitrary code (``get_action_and_value``, ``evaluate_actions``), not
by a forward ISOPO could patch. While a microbatch is open a ``TorchFunctionMode`` follows them:

* a *shared* tensor is a free parameter, a constant (a buffer, a tensor held by a module, one
  built by a factory such as ``torch.ones``) or the result of an op that reads shared tensors only;
* an op that reads a free parameter (through shared tensors) and whose results have the sample
  layout (``n`` along the sample axis), with the samples coming from data among its inputs or from
  an op that broadcasts the shared ones along that axis (``expand``, ``repeat``), is where the
  parameter *meets* the samples. Its results pass through ``Meet``, whose backward takes each
  sample's vector-Jacobian product back to the parameter through the forward's own graph
  (vectorised over samples, stopping at other meetings): the parameter's ``G_i``;
* a result of data and shared tensors without the sample layout (``W @ h.T``, a distribution's
  ``(d, n)`` intermediate) carries the data on: the samples are met where an op puts them back
  on the sample axis.

The layer's gate then checks that the gradient autograd delivers equals ``Σ_i G_i``: a path from
a free parameter to the loss that never met the samples is an error, never a silent gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode
import weakref

from . import _compat
from .finish import ExplicitUse
from .gate import in_meeting_vjp, meeting_vjp, own_node, own_op


class _ByIdentity:
    """Tensor → value by identity, without keeping the tensor alive (a dict of weak references
    keyed by ``id``: cheaper per lookup than ``WeakIdKeyDictionary``, which the tracker does
    for every op of the forward)."""

    def __init__(self):
        self.items: dict[int, tuple] = {}

    def __contains__(self, t) -> bool:
        found = self.items.get(id(t))
        return found is not None and found[0]() is t

    def __getitem__(self, t):
        return self.items[id(t)][1]

    def get(self, t, default=None):
        return self[t] if t in self else default

    def __setitem__(self, t, value) -> None:
        self.items[id(t)] = (weakref.ref(t), value)

    def discard(self, t) -> None:
        if t in self:
            del self.items[id(t)]


class Tracker(TorchFunctionMode):
    """Follows the free parameters of ``layers`` through one microbatch's forward."""

    def __init__(self, attachment, layers, constants):
        super().__init__()
        self.attachment = attachment
        # the parameters the modules hold now (one replaced since the build is the one used)
        self.free = {id(_compat.registered(owner, attr)): (layer, i) for layer in layers
                     for i, (owner, attr) in enumerate(layer.owners)}
        self.shared = _ByIdentity()             # tensor -> ids of the free layers it reads
        self.mixed = _ByIdentity()              # shared tensors that also carry data
        self.gates: dict[int, tuple] = {}       # free layer id -> (record, gated parameters)
        self.alias_of = _ByIdentity()           # a parameter's stand-in -> its index in the layer
        self.copies = _ByIdentity()             # broadcasts of shared tensors alone (row i:
                                                # sample i), and what was computed from them alone
        for t in constants:
            self.shared[t] = frozenset()
        self.paused = 0

    def on_top(self) -> bool:
        """Whether this mode is the innermost one (so it can step aside for ISOPO's own ops)."""
        return _compat.top_function_mode() is self

    def __exit__(self, *exc):
        """The block is over: drop every reference to its tensors (no cycle through the graph
        outlives it)."""
        self.shared, self.mixed, self.gates, self.alias_of, self.copies = (
            _ByIdentity(), _ByIdentity(), {}, _ByIdentity(), _ByIdentity())
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or func in _PASSED:
            return func(*args, **kwargs)
        if func is Tensor.to or func is Tensor.type_as:
            func, args, kwargs = _cast_args(func, args, kwargs)
        inputs = _tensors(args, kwargs)
        if self.copies.items and inputs:
            copied = [t for t in inputs if t in self.copies and t.is_floating_point()]
            if copied:
                axes = {id(t): self.copies[t] for t in copied}
                mb = self.attachment.forward_microbatch()
                self._keep_rows(mb, func, args, kwargs, copied, axes)
                if all(t in self.copies or self.shared.get(t) == frozenset() for t in inputs):
                    result = func(*args, **kwargs)      # copies and constants alone: a copy
                    first, a = copied[0], axes[id(copied[0])]
                    if mb is not None and mb.n > 1:
                        self._known(func, args, copied, axes, result)
                        self._keep_blocks(mb, func, first, a, result)
                    for t in _out_tensors(result):
                        if t.is_floating_point():       # (masks carry no gradient)
                            self.copies[t] = _axis_after(func, args, kwargs, first, a, t)
                    return result
        if not inputs:                           # a factory: its result is a constant
            if own_node(_compat.autograd_node()):
                return func(*args, **kwargs)
            return self._mark(func(*args, **kwargs), frozenset())
        free, shared = self.free, self.shared.items      # (inlined: this runs for every op)
        hits = [t for t in inputs if id(t) in free
                or (found := shared.get(id(t))) is not None and found[0]() is t]
        if not hits or not torch.is_grad_enabled() or own_node(_compat.autograd_node()):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None)
        if name == "__set__":
            # an attribute written (p.grad = None in zero_grad, p.data = clamped): the
            # parameter's own, never its stand-in's
            return func(*args, **kwargs)
        if name == "__get__" and func.__self__.__name__ not in _VIEWS:
            # an attribute of the tensor itself (is_leaf, grad, shape): the parameter's own,
            # never its stand-in's (a ParameterList slice re-registers the parameters)
            return self._mark(func(*args, **kwargs), frozenset())
        mb = self.attachment.forward_microbatch()
        if mb is None:
            return func(*args, **kwargs)
        if (_compat.checkpointed() or _compat.reentrant_recompute(_compat.autograd_node())) \
                and any(id(t) in free or shared[id(t)][1] for t in hits):
            self._refuse_checkpointed(hits)   # (constants, a mask built in the region, are fine)
        args, kwargs, reads = self._gated(mb, args, kwargs, hits)
        self.paused += 1
        try:
            result = func(*args, **kwargs)
            out = args[0] if func is Tensor.__setitem__ else result    # what the op wrote
            mixed = any(t in self.mixed for t in hits)
            data = len(hits) < len(inputs) or mixed
            # rows picked by ids (pos[positions]) are not yet where the samples are: positions
            # and samples alike have one id per row. The next op meets them (x + pos[positions])
            picked = func in _INDEXING and not mixed and not any(
                t.is_floating_point() for t in inputs if all(t is not h for h in hits))
            inputs = _tensors(args, kwargs)
            if reads and not picked and meets_samples(mb, func, out, inputs, data):
                if _in_place(func) and any(o is t for o in _out_tensors(out) for t in inputs):
                    raise ValueError(
                        f"ISOPO: the in-place op {getattr(func, '__name__', func)} meets free "
                        "parameters with the samples in a tensor it overwrites, whose history "
                        "ISOPO cannot take over; write it out of place (h = h * p, not "
                        "h.mul_(p); torch.cat([cls.expand(n, 1, -1), x], 1), not "
                        "t[:, 0] = cls)")
                sources = list({id(t): t for t in inputs            # each tensor once
                                if t in self.shared and self.shared[t]}.values())
                if data:
                    _refuse_stacks(mb, func, out, [t for t in sources if t not in self.mixed])
                kind = None if kwargs.get("alpha") is not None else _BROADCASTS.get(func)
                targets = None if kind is None else [
                    0 if kind == "one" else next(i for i, t in enumerate(inputs) if t is src)
                    for src in sources]
                self._rounding(out, reads)
                met = meet(mb, out, sources,
                           [{k: self.gates[k] for k in self.shared[t]} for t in sources], targets,
                           [self.alias_of.get(t) for t in sources])
                if not data:                    # a broadcast: its row i is sample i's
                    for t in _out_tensors(met):
                        self.copies[t] = _sample_axis(mb, t) if t.dim() else None
                return met
        finally:
            self.paused -= 1
        if data and not reads:
            if _in_place(func):                 # a constant written with data holds data now
                for t in _out_tensors(out):
                    self.shared.discard(t)
            return result
        self._mark(out, reads)
        if data:
            for t in _out_tensors(out):
                self.mixed[t] = True
        return result

    def _keep_rows(self, mb, func, args, kwargs, copied, axes) -> None:
        """An op on broadcast copies of free parameters: each row was credited to the sample of
        its place, so an op that moves rows along the sample axis (indexing, ``flip``, ``roll``,
        ``masked_scatter``) would hand them to other samples: refused."""
        if mb is not None and torch.is_grad_enabled() and not own_node(_compat.autograd_node()):
            moved = _moves_rows(func, args, kwargs, copied, axes)
            if moved:
                self._refuse_moved(moved, copied)

    def _known(self, func, args, copied, axes, result) -> None:
        """An op on broadcast copies (and constants) alone is followed only where it keeps each
        row with its sample: pointwise ops on copies whose sample axes line up, the ops that
        move axes, reshapes (``_keep_blocks``) and ops along other axes (``_keep_rows``). Any
        other op (a softmax or a product over the samples, a padding, a repeat along them)
        may mix them: refused, unless nothing of its result carries a gradient."""
        if not any(isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad
                   for t in _out_tensors(result)):
            return
        base = _base(func)
        ends = {t.dim() - axes[id(t)] if axes[id(t)] is not None else None for t in copied}
        lined_up = len(ends) == 1 and None not in ends
        if base in _POINTWISE or base in _JOINS or base == "stack":
            if lined_up:
                return
        elif base in _BATCHED or base == "linear":   # over the last two axes, batched over the rest
            if lined_up and min(ends) > 2:
                return
            if base in ("matmul", "mm", "__matmul__", "linear") and len(copied) == 1 and \
                    args[0] is copied[0] and lined_up and min(ends) > 1:
                return                          # rows of a copy times a constant matrix
        elif base in _FOLLOWED or base in _ALONG or base in _RESHAPES or base == "__getitem__":
            if base in ("repeat", "tile") and not _repeats_elsewhere(args, axes[id(copied[0])]):
                self._refuse_moved(base, copied)
            if base in ("tril", "triu") and (axes[id(copied[0])] is None or
                                             axes[id(copied[0])] >= copied[0].dim() - 2):
                self._refuse_moved(base, copied)
            return
        raise ValueError(
            f"ISOPO: {getattr(func, '__name__', func)} on free parameters broadcast along the "
            f"sample axis (shape {tuple(copied[0].shape)}) may combine the rows of several "
            "samples: ISOPO follows such a broadcast through pointwise ops, ops that move axes, "
            "reshapes and ops along other axes. Apply it to the parameters before broadcasting "
            "them, or after they meet the samples' data")

    @staticmethod
    def _refuse_moved(op: str, copied) -> None:
        raise ValueError(
            f"ISOPO: {op} moves the rows of free parameters broadcast along the sample axis "
            f"(shape {tuple(copied[0].shape)}): ISOPO credits row i of such a broadcast to "
            "sample i, and the op hands the rows to other samples. Broadcast after choosing the "
            "rows (h0.expand(len(idx), -1) for the rows idx picks), and write tokens with "
            "torch.where(mask[..., None], tok, h) rather than masked_scatter")

    def _keep_blocks(self, mb, func, first, a, result) -> None:
        """A reshape of a broadcast copy keeps each sample's rows together and in order when it
        leaves the axes up to the sample axis as they are, or when that axis leads, before and
        after, a multiple of ``n`` long (flattened with the next axes, as batched linear algebra
        does, or split back); any other reshape moves them."""
        if _base(func) not in _RESHAPES:
            return
        for o in _out_tensors(result):
            if not (a is not None and (o.shape[:a + 1] == first.shape[:a + 1] or a == 0 and
                    o.dim() and first.shape[0] % mb.n == 0 and o.shape[0] % mb.n == 0
                    or _unit_axes_moved(first.shape, a, o.shape) is not None)):
                self._refuse_moved(getattr(func, "__name__", str(func)), [first])

    def _refuse_checkpointed(self, hits) -> None:
        names = sorted({self.free[id(t)][0].param_names[self.free[id(t)][1]] for t in hits
                        if id(t) in self.free} or {"computed from free parameters"})
        raise ValueError(
            f"ISOPO: free parameters ({', '.join(names)}) are used inside a region of activation "
            "checkpointing (torch.utils.checkpoint): ISOPO follows a free parameter through the "
            "forward's ops, which the recompute does not repeat alike. Apply it outside the "
            "checkpointed function (checkpoint the children with rules, then x + gamma * y), "
            "or do not checkpoint that region")

    def _gated(self, mb, args, kwargs, hits):
        """Free parameters replaced by their gated tensors; the free layers the op reads."""
        swap, reads = {}, set()
        for t in hits:
            if id(t) in self.free:
                layer, i = self.free[id(t)]
                record, gated = self.gates[id(layer)] = mb.gate(layer)
                # a stand-in of its own: a vector-Jacobian product taken to it (``Meet``) runs
                # only this op's path, not every use of the gate's other parameters (a model's
                # single gate holds them all), whose backward would run a second time
                swap[id(t)] = alias = gated[i].view_as(gated[i])
                self.alias_of[alias] = i
                reads.add(id(layer))
                self.shared[alias] = frozenset([id(layer)])
            else:
                reads |= self.shared[t]
        if swap:
            put = lambda a: swap.get(id(a), a) if isinstance(a, Tensor) else a  # noqa: E731
            if all(not isinstance(a, (list, tuple, dict)) for a in (*args, *kwargs.values())):
                args, kwargs = tuple(map(put, args)), {k: put(v) for k, v in kwargs.items()}
            else:
                leaves, spec = _compat.tree_flatten((args, kwargs))
                args, kwargs = _compat.tree_unflatten(list(map(put, leaves)), spec)
        return args, kwargs, frozenset(reads)

    def _mark(self, out, reads):
        for t in _out_tensors(out):
            self.shared[t] = reads
        self._rounding(out, reads)
        return out

    def _rounding(self, out, reads) -> None:
        """The coarsest rounding on the paths of the free layers ``reads`` (a float32 op on a
        float64 parameter), for the gate's check of what arrives."""
        if not reads:
            return
        eps = max((torch.finfo(t.dtype).eps for t in _out_tensors(out) if t.is_floating_point()),
                  default=0.0)
        for key in reads:
            record = self.gates[key][0]
            record.eps = max(record.eps, eps)

    def layer_input(self, mb, x: Tensor, where: str) -> Tensor:
        """A layer's input: one that carries data from free parameters meets the samples here
        when its rows are samples (a free table's rows picked per sample, ``table[ids]``);
        otherwise ``refuse_free``."""
        if x in self.mixed and self.shared[x] and meets_samples(mb, None, x, [x], True):
            return meet(mb, x, [x], [{k: self.gates[k] for k in self.shared[x]}], None,
                        [self.alias_of.get(x)])
        self.refuse_free(x, where)
        return x

    def refuse_free(self, x: Tensor, where: str) -> None:
        """A layer input computed from free parameters that never met the samples has no sample
        axis of its own (a position table, learned queries): its rows are not samples."""
        if x in self.mixed:
            raise ValueError(
                f"ISOPO: {where} (shape {tuple(x.shape)}) mixes free parameters with the samples, "
                "but its rows are not where ISOPO reads the samples (n along dim 0, or "
                "sample_dim; with segments=, one id per row of its first two dims): ISOPO cannot "
                "tell which sample uses which of its rows. Move the samples to that axis before "
                "the module (x @ W.T rather than (W @ x.T).T), or give segments one id per token")
        if id(x) in self.free or x in self.shared and self.shared[x]:
            raise ValueError(
                f"ISOPO: {where} (shape {tuple(x.shape)}) is computed from parameters and "
                "constants alone, without the samples along the sample axis (dim 0, or "
                "sample_dim): ISOPO cannot tell which sample uses which of its rows. Broadcast it "
                "along that axis first (table.expand(n, *table.shape), or add it to the batch's "
                "activations); for a learned initial state with the batch on dim 1, as an RNN "
                "takes it: h0.transpose(0, 1).expand(n, -1, -1).transpose(0, 1), or "
                "h0.expand(-1, n, -1) in a microbatch with sample_dim=1. (Tensors held by "
                "modules, as attributes or buffers, count as constants: pass the data to the "
                "forward as an argument)")


def constants(modules: list[nn.Module]) -> list:
    """Tensors a free parameter may meet that are not data: buffers, frozen parameters (a
    frozen table a trainable delta is added to) and tensors held by modules."""
    return [t for m in modules
            for t in (*_compat.own_buffers(m), *_compat.own_parameters(m).values(),
                      *vars(m).values())
            if isinstance(t, Tensor) and not (isinstance(t, nn.Parameter) and t.requires_grad)]


def _cast_args(func, args, kwargs):
    """``t.to(other)`` and ``t.type_as(other)`` read only ``other``'s dtype and device: as
    ``t.to(device, dtype)`` they do not take ``other`` for data (peft's BOFT casts its rotation
    with ``.to(x)``)."""
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if not isinstance(other, Tensor):
        return func, args, kwargs
    kwargs = {k: v for k, v in kwargs.items() if k != "other"}
    return Tensor.to, (args[0], other.device, other.dtype, *args[2:]), kwargs


def _tensors(args, kwargs) -> list[Tensor]:
    """The tensor arguments of an op, also inside lists and tuples (``torch.cat``'s)."""
    out = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


def _in_place(func) -> bool:
    """``mul_``, ``add_``, ``h *= p`` (``__imul__``), ``t[i] = v``: ops that overwrite an input."""
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or name.startswith("__i") and name.endswith("__") or (
        name.endswith("_") and not name.startswith("__"))


def _out_tensors(out):
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, Tensor)]
    return []


def _sample_axis(mb, t: Tensor) -> int:
    return mb.sample_dim if t.dim() >= 3 else 0


# ops that carry a broadcast copy's rows elsewhere when they act along its sample axis (any
# axis, where it is unknown): by ``__name__`` (``torch.x`` and ``Tensor.x`` alike)
_ALONG = frozenset({
    "flip", "roll", "rot90", "index_select", "gather", "take_along_dim", "narrow", "cumsum",
    "cumprod", "cummax", "cummin", "logcumsumexp", "sum", "mean", "nansum", "nanmean", "prod",
    "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "median", "nanmedian",
    "mode", "sort", "argsort", "topk", "kthvalue", "unbind", "split", "chunk", "tensor_split",
    "split_with_sizes", "diff", "index_copy", "index_add",
    "index_fill", "scatter", "scatter_add", "scatter_reduce", "put", "index_reduce", "softmax",
    "log_softmax", "softmin", "normalize", "vector_norm", "var_mean", "std_mean", "quantile",
    "nanquantile", "all", "any", "count_nonzero", "argmax", "argmin"})
# ops that always do: they read or place rows in mask or index order
_ALWAYS = frozenset({"masked_scatter", "masked_select", "flipud", "fliplr", "__setitem__",
                     "index_put", "take"})
# ops that join tensors along an axis (the sample axis: 2n rows)
_JOINS = frozenset({"cat", "concat", "concatenate"})
# ops that reshape a tensor (checked on their result, ``_keep_blocks``)
_RESHAPES = frozenset({"reshape", "view", "view_as", "reshape_as", "flatten", "unflatten"})


# ops that act element by element (with broadcasting): a copy's rows stay with their samples
# when every copy's sample axis lines up (counted from the last axis)
_POINTWISE = frozenset({
    "abs", "absolute", "neg", "negative", "exp", "exp2", "expm1", "log", "log1p", "log2",
    "log10", "sqrt", "rsqrt", "square", "reciprocal", "sigmoid", "tanh", "sin", "cos", "tan",
    "atan", "asin", "acos", "asinh", "acosh", "atanh", "sinh", "cosh", "erf", "erfc", "erfinv",
    "softplus", "softsign", "relu", "relu6", "gelu", "silu", "mish", "elu", "celu", "selu",
    "leaky_relu", "hardtanh", "hardsigmoid", "hardswish", "logsigmoid", "logit", "clamp", "clip",
    "clamp_min", "clamp_max", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "add",
    "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "pow", "float_power", "maximum", "minimum", "fmax", "fmin", "where", "lerp",
    "addcmul", "addcdiv", "atan2", "hypot", "remainder", "fmod", "xlogy", "nan_to_num",
    "masked_fill", "to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous",
    "clone", "copysign", "sinc", "logaddexp", "logaddexp2", "threshold", "dropout",
    "alpha_dropout", "digamma", "lgamma", "polygamma", "mvlgamma", "i0",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
    "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
    "__pow__", "__rpow__", "__ipow__", "__neg__", "__abs__", "__pos__", "__mod__", "__rmod__"})
# ops that move or add axes, or broadcast: followed by ``_axis_after``
_FOLLOWED = frozenset({
    "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "unsqueeze",
    "squeeze", "__get__", "expand", "expand_as", "broadcast_to", "tril", "triu", "diagonal",
    "diag_embed", "repeat", "tile"})


# linear algebra on the last two axes, batched over the others (a batch of covariance matrices)
_BATCHED = frozenset({
    "matmul", "bmm", "baddbmm", "__matmul__", "__rmatmul__", "cholesky", "linalg_cholesky",
    "linalg_cholesky_ex", "cholesky_inverse", "cholesky_solve", "inverse", "linalg_inv",
    "linalg_inv_ex", "linalg_solve", "linalg_solve_ex", "linalg_solve_triangular",
    "triangular_solve", "det", "logdet", "slogdet", "linalg_det", "linalg_slogdet",
    "linalg_eigh", "linalg_eigvalsh", "linalg_qr", "linalg_svd", "linalg_svdvals",
    "matrix_exp", "linalg_matrix_exp", "linalg_matrix_norm", "linalg_lu_factor",
    "linalg_lu_factor_ex", "linalg_lu_solve", "linalg_ldl_factor"})


def _repeats_elsewhere(args, a) -> bool:
    """Whether ``repeat``/``tile`` leaves the sample axis ``a`` as it is (a factor of 1 there)."""
    t, reps = args[0], args[1:]
    if len(reps) == 1 and not isinstance(reps[0], int):
        reps = tuple(reps[0])
    if a is None:
        return False
    k = a + len(reps) - t.dim()                 # (leading factors add axes)
    return 0 <= k < len(reps) and reps[k] == 1 and all(r == 1 for r in reps[:len(reps) - t.dim()])


def _base(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name if name.startswith("__") else name.rstrip("_")


def _moves_rows(func, args, kwargs, copied, axes) -> str | None:
    """The name of ``func`` if it may move rows of the broadcast copies ``copied`` along their
    sample axis (``axes``, by ``id``; None where it is unknown), else None."""
    name, base = getattr(func, "__name__", str(func)), _base(func)
    if base in _JOINS:
        d = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return name if any(axes[id(t)] is None or d % t.dim() == axes[id(t)]
                           for t in args[0] if id(t) in axes and t.dim()) else None
    first = copied[0] if args and args[0] is copied[0] else None
    if base in _ALWAYS or first is None and base in _ALONG:   # (a copy as the rows written)
        return None if base == "__setitem__" and first is not None else name
    if first is None or first.dim() == 0 or base in _RESHAPES:
        return None                              # (reshapes: checked on their result)
    a = axes[id(first)]
    if base == "__getitem__":
        entry = _index_entry(args[1], first.dim(), a)
        return None if isinstance(entry, slice) and entry == slice(None) else "indexing"
    if base not in _ALONG:
        return None
    dims = _dims(base, args, kwargs)
    return name if a is None or dims is None or a in dims else None


def _index_entry(index, nd: int, a: int | None):
    """The entry of an index that addresses input axis ``a`` (``slice(None)`` when none does;
    None when ``a`` is unknown and the index is not all ``:``)."""
    index = index if isinstance(index, tuple) else (index,)
    if a is None:
        plain = all(i is None or i is Ellipsis or isinstance(i, slice) and i == slice(None)
                    for i in index)
        return slice(None) if plain else None
    pos = 0
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    for i in index:
        if i is None:
            continue
        if i is Ellipsis:
            pos += nd - used
            continue
        if pos == a:
            return i
        pos += 1
    return slice(None)


def _unit_axes_moved(shape, a: int, out) -> int | None:
    """Where axis ``a`` of ``shape`` is after a reshape to ``out`` that only inserts or drops
    axes of size 1 (``h0.expand(n, -1).view(1, n, H)``, an ``unsqueeze``); None for any other."""
    if shape[a] == 1 or [s for s in shape if s != 1] != [s for s in out if s != 1]:
        return None
    k = sum(s != 1 for s in shape[:a])
    return [i for i, s in enumerate(out) if s != 1][k]


def _axis_after(func, args, kwargs, first: Tensor, a: int | None, out: Tensor) -> int | None:
    """Where the sample axis ``a`` of the copy ``first`` is in ``out``, a result of an op on
    copies and constants alone (None: unknown, and then every row-moving op is refused)."""
    if a is None or not isinstance(out, Tensor) or out.dim() == 0:
        return None
    base, nd = _base(func), first.dim()
    rest = [*args[1:], *kwargs.values()]
    if base in _RESHAPES:
        if out.shape[:a + 1] == first.shape[:a + 1]:
            return a
        moved = _unit_axes_moved(first.shape, a, out.shape)
        return moved if moved is not None else 0 if a == 0 else None
    if base in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (d % nd for d in rest[:2])
        return d1 if a == d0 else d0 if a == d1 else a
    if base == "t":
        return 1 - a if nd == 2 else a
    if base == "permute":
        dims = rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else rest
        return [d % nd for d in dims].index(a)
    if base in ("movedim", "moveaxis"):
        src, dst = ([x] if isinstance(x, int) else list(x) for x in rest[:2])
        src, dst = [s % nd for s in src], [d % nd for d in dst]
        order = [None] * nd
        for s, d in zip(src, dst):
            order[d] = s
        left = iter(i for i in range(nd) if i not in src)
        order = [next(left) if o is None else o for o in order]
        return order.index(a)
    if base == "__get__":
        view = func.__self__.__name__
        if view in ("T", "H"):
            return nd - 1 - a
        if view in ("mT", "mH"):
            return {nd - 1: nd - 2, nd - 2: nd - 1}.get(a, a)
        return a
    if base == "unsqueeze":
        return a + (rest[0] % (nd + 1) <= a)
    if base in ("diagonal", "diag_embed"):
        if base == "diag_embed":                 # (its last axis becomes two)
            return a if a < nd - 1 else None
        d1 = kwargs.get("dim1", args[2] if len(args) > 2 else 0) % nd
        d2 = kwargs.get("dim2", args[3] if len(args) > 3 else 1) % nd
        return None if a in (d1, d2) else a - (d1 < a) - (d2 < a)
    if base == "__getitem__":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, (Tensor, list)) for i in index):
            return None
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        pos = off = 0
        for i in index:
            if i is None:
                off += 1
            elif i is Ellipsis:
                if a < pos + nd - used:
                    return a + off
                pos += nd - used
            elif isinstance(i, int):
                if pos == a:
                    return None
                pos, off = pos + 1, off - 1
            else:
                if pos == a:
                    return a + off
                pos += 1
        return a + off
    if base == "stack":
        d = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
        return a + (d <= a)
    if out.dim() == nd:
        return a
    if out.dim() > nd:                           # broadcast against more axes
        return a + out.dim() - nd
    if base in _ALONG:                           # reduced over other axes
        dims = _dims(base, args, kwargs)
        return None if dims is None else a - sum(d < a for d in dims)
    if base == "squeeze":
        gone = [i for i in range(nd) if first.shape[i] == 1 and (
            not rest or i in [d % nd for d in ([rest[0]] if isinstance(rest[0], int)
                                               else rest[0])])]
        return None if a in gone else a - sum(d < a for d in gone)
    return None


def _dims(base: str, args, kwargs) -> list[int] | None:
    """The axes an op of ``_ALONG`` acts along, as non-negative ints (None: all of them)."""
    t = args[0]
    if base in ("roll",):
        d = kwargs.get("dims", args[2] if len(args) > 2 else None)
    elif base in ("rot90",):
        d = kwargs.get("dims", args[2] if len(args) > 2 else (0, 1))
    elif base in ("split", "chunk", "tensor_split", "split_with_sizes"):
        d = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    elif base in ("index_copy", "index_add", "index_fill", "scatter", "scatter_add",
                  "scatter_reduce", "put", "index_reduce", "unbind"):
        d = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    elif base == "diff":                         # (x, n=1, dim=-1)
        d = kwargs.get("dim", args[2] if len(args) > 2 else -1)
    elif base in ("norm", "vector_norm", "quantile", "nanquantile"):   # (x, p or q, dim)
        d = kwargs.get("dim", args[2] if len(args) > 2 else None)
    elif base == "normalize":                    # (x, p=2, dim=1)
        d = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    else:
        d = kwargs.get("dim", kwargs.get("dims", args[1] if len(args) > 1 else None))
    if isinstance(d, Tensor) or isinstance(d, bool):  # max(a, b), std(unbiased): elementwise
        return []
    if d is None:
        return None
    if isinstance(d, int):
        d = [d]
    try:
        return [int(x) % max(t.dim(), 1) for x in d]
    except (TypeError, ValueError):
        return None


def sample_layout(mb, o: Tensor) -> bool:
    """Whether ``o``'s rows can be samples: ``n`` along the sample axis, or one row per segment
    entry."""
    if mb.n == 1:                             # one sample: every result is its own
        return True
    if o.dim() == 0:
        return False
    if mb.segments is not None:
        if o.dim() >= 4 and o.shape[1] == o.shape[2]:   # (B, H, L, ·) and (B, L, H, ·) alike:
            return False            # not here; the data is carried to where they differ
        if o.dim() <= 2 and mb.sample_dim == 1:         # flat rows of a time-major batch:
            return False            # their order is unknown (samples.sample_map)
        rows = o.shape[0] * o.shape[1] if o.dim() >= 3 else o.shape[0]
        return rows == mb.segments.numel()
    return o.shape[_sample_axis(mb, o)] == mb.n


def _tokens(o: Tensor) -> tuple:
    """A result's token shape: all but its last (feature) axis, if it has one."""
    return tuple(o.shape[:-1]) if o.dim() >= 2 else tuple(o.shape)


def meets_samples(mb, func, out, inputs, data: bool) -> bool:
    """Whether every float result has the sample layout, with data among the inputs or, without
    data, an op that broadcasts every input along the sample axis (size 1 or absent there). Any
    other op on shared tensors alone (a ``transpose``, ``torch.diag``, ``torch.stack``) only
    reshapes a table: its rows are not samples, even when there are ``n`` of them."""
    outs = [o for o in _out_tensors(out) if o.is_floating_point()]
    if not outs or not all(sample_layout(mb, o) for o in outs):
        return False
    return data or func in _EXPANDS and all(
        _broadcast(t, o, _sample_axis(mb, o)) for t in inputs for o in outs)


def _refuse_stacks(mb, func, out, sources) -> None:
    """A stack of matrices read from free parameters with ``n`` entries where the result has
    the samples (a ``scale_tril`` per head or mixture component, which
    ``MultivariateNormal.log_prob`` solves against data it moved to ``(k, d, n)``) may be a table
    whose ``k`` happens to equal ``n``: ISOPO cannot tell, so it refuses."""
    if mb.segments is not None or mb.n == 1 or func in _INDEXING:
        return
    for o in _out_tensors(out):
        axis = _sample_axis(mb, o)
        for t in sources:
            # aligned with the result by its trailing axes, unless it has more axes than the
            # result: then the op reduced them (cosine_similarity, a norm) and it is aligned
            # by its leading ones
            k = axis if t.dim() > o.dim() else axis - (o.dim() - t.dim())
            if t.dim() >= 3 and k >= 0 and t.shape[k] == mb.n:
                raise ValueError(
                    f"ISOPO: a tensor of shape {tuple(t.shape)} computed from free parameters "
                    f"meets the samples in {getattr(func, '__name__', func)} with {mb.n} entries "
                    "along the sample axis, as many as there are samples: ISOPO cannot tell a "
                    "stack shared by all samples (a scale_tril per head or mixture component) "
                    "from one entry per sample. Broadcast it along the sample axis first "
                    "(L.expand(n, *L.shape)), which is exact")


# ops that select entries of their first input by the others: its shape is not aligned with theirs
_INDEXING = frozenset({Tensor.__getitem__, torch.index_select, Tensor.index_select, torch.gather,
                       Tensor.gather, torch.take_along_dim, Tensor.take_along_dim,
                       torch.nn.functional.embedding})


def _broadcast(t: Tensor, o: Tensor, axis: int) -> bool:
    if o.dim() == 0:                 # a scalar of shared tensors alone has no sample axis
        return False
    k = axis - (o.dim() - t.dim())
    return k < 0 or t.shape[k] == 1


def meet(mb, out, sources: list[Tensor], reads: list[dict], targets, params):
    """``out`` (a tensor or a tuple of them), computed from the free-parameter tensors
    ``sources`` (and data), passed through ``Meet``; ``reads[k]`` maps the free layers source k
    reads to their ``(record, gated parameters)``. When the op only broadcasts its inputs,
    ``targets[k]`` is the result source k is broadcast into; ``params[k]`` is the index of the
    parameter source k stands for, if it is one."""
    tensors = _out_tensors(out)
    keep = [t for t in tensors if t.is_floating_point() and t.requires_grad]
    if not keep:
        return out
    meeting = _Meeting(mb, sources, reads, params)
    if len(keep) == len(tensors):
        meeting.targets = targets
    met = iter(Meet.apply(meeting, *keep))
    swapped = {id(t): next(met) for t in keep}
    if isinstance(out, Tensor):
        return swapped[id(out)]
    return type(out)(swapped.get(id(t), t) if isinstance(t, Tensor) else t for t in out)


class _Meeting:
    def __init__(self, mb, sources, reads, params):
        self.mb, self.sources, self.reads, self.params = mb, sources, reads, params
        self.targets = None     # per source, the result it is broadcast into (a pure broadcast)


@own_op
class Meet(Function):
    """Identity on results where free parameters meet the samples; its backward records the
    parameters' per-sample gradients through the graph that made the results."""

    @staticmethod
    def forward(ctx, meeting, *outs):
        ctx.meeting = meeting
        # kept on ctx, not saved, and returned as detached aliases rather than views: an
        # in-place op on a result (y += x after y = gamma * f(x); relu(y, inplace=True)) is the
        # plain in-place op on the forward's tensor, whose version counter it shares
        ctx.outs = outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *douts):
        if in_meeting_vjp():                 # another meeting's VJP crossing this one: its
            return (None,) * (len(douts) + 1)   # paths are this one's, recorded when it runs
        m = ctx.meeting
        outs = [o for o, d in zip(ctx.outs, douts) if d is not None]
        grads = [d for d in douts if d is not None]
        if len(outs) == len(douts):
            with meeting_vjp():
                uses = _recorded(m, outs, grads)
            for record, G in uses:
                record.add(ExplicitUse(G, None, None))
        return (None, *douts)


def _recorded(m: "_Meeting", outs, grads) -> list[tuple]:
    """``(record, G)`` per free layer the meeting's sources read: the per-sample gradients of
    its parameters along the paths from the results to the sources and on to the parameters."""
    per_layer: dict[int, tuple] = {}
    masked = None
    for k, (src, reads) in enumerate(zip(m.sources, m.reads)):
        G_src = _broadcast_grad(m, k, src, outs, grads)
        if G_src is None:
            masked = masked or [_per_sample(m.mb, o, d) for o, d in zip(outs, grads)]
            G_src, = _batched_grad(outs, [src], masked, m.mb.n, flat=False)
        for key, (record, gated) in reads.items():
            G = _carried(src, m.params[k], gated, G_src, m.mb.n)
            old = per_layer.get(key)
            per_layer[key] = (record, G if old is None else old[1] + G)
    return list(per_layer.values())


# calls run as they are: autograd's own, whose parameters named (``backward(inputs=[log_std])``)
# are the parameters, never their stand-ins; ``detach``, whose result is a constant
_PASSED = frozenset({Tensor.backward, torch.autograd.backward, torch.autograd.grad,
                     Tensor.detach})

# tensor attributes that compute a view, followed like any op (``w.T``, ``w.mT``)
_VIEWS = frozenset({"T", "mT", "H", "mH", "real", "imag"})

# ops that copy their inputs along new or size-1 axes: the only ones where shared tensors alone
# meet the samples
_EXPANDS = frozenset({Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to,
                      torch.broadcast_tensors, Tensor.repeat, torch.tile, Tensor.tile,
                      Tensor.repeat_interleave, torch.repeat_interleave})

# ops whose results only broadcast their inputs (``"each"``: the k-th input into the k-th result)
_BROADCASTS = {Tensor.expand: "one", Tensor.expand_as: "one", torch.broadcast_to: "one",
               Tensor.broadcast_to: "one", torch.broadcast_tensors: "each", torch.add: "one",
               Tensor.add: "one", Tensor.__add__: "one", Tensor.__radd__: "one"}


def _broadcast_grad(m: "_Meeting", k: int, src: Tensor, outs, grads) -> Tensor | None:
    """``(n, *src.shape)`` without vectorising autograd when the op only broadcast ``src`` along
    every row axis of its result: each sample's gradient is its rows' summed down to ``src``."""
    if m.targets is None or m.targets[k] >= len(outs):
        return None
    i = m.targets[k]
    o, d = outs[i], grads[i]
    token = _tokens(o)
    lead = o.dim() - src.dim()
    if any(j - lead >= 0 and src.shape[j - lead] != 1 for j in range(len(token))):
        return None
    smap = m.mb.sample_map(token, "a free parameter's result", o.device)
    G = smap.reduce(d.reshape(smap.rows, -1), 0)               # (n, last dim)
    last = o.shape[-1] if o.dim() >= 2 else 1
    G = G.view(m.mb.n, last) if src.dim() and src.shape[-1] == last else G.sum(1, keepdim=True)
    return G.view(m.mb.n, *src.shape) if src.numel() == G.shape[1] else None


def _carried(src: Tensor, index: int | None, gated, G_src: Tensor, n: int) -> Tensor:
    """``(n, D)``: per-sample gradients of a free layer's parameters from those of ``src``, which
    is parameter ``index`` itself or computed from the layer's parameters."""
    if index is not None:                   # the parameter itself: nothing to carry
        parts = [G_src.reshape(n, -1) if j == index else G_src.new_zeros(n, q.numel())
                 for j, q in enumerate(gated)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return _batched_grad([src], gated, [G_src], n)


def _per_sample(mb, o: Tensor, d: Tensor) -> Tensor:
    """``(n, *d.shape)``: the output gradient restricted to each sample's rows."""
    smap = mb.sample_map(_tokens(o), "a free parameter's result", o.device)
    rows = d.reshape(smap.rows, -1)
    onehot = torch.zeros(mb.n, smap.rows, 1, dtype=d.dtype, device=d.device)
    onehot[smap.ids, torch.arange(smap.rows, device=d.device)] = 1
    return (onehot * rows).view(mb.n, *d.shape)


def _batched_grad(outs, params, masked, n, flat: bool = True):
    """``(n, D)``: per-sample gradients of ``params`` for the per-sample output gradients (or,
    with ``flat=False``, one ``(n, *p.shape)`` per parameter)."""
    try:
        got = torch.autograd.grad(outs, params, masked, is_grads_batched=True,
                                  retain_graph=True, allow_unused=True)
    except RuntimeError:                 # an op without a batching rule: one sample at a time
        rows = [torch.autograd.grad(outs, params, [m[i] for m in masked], retain_graph=True,
                                    allow_unused=True) for i in range(n)]
        got = [None if all(r[j] is None for r in rows) else torch.stack(
            [torch.zeros_like(params[j]) if r[j] is None else r[j] for r in rows])
            for j in range(len(params))]
    if not flat:
        return [masked[0].new_zeros(n, *p.shape) if g is None else g for g, p in zip(got, params)]
    return torch.cat([masked[0].new_zeros(n, p.numel()) if g is None else g.reshape(n, -1)
                      for g, p in zip(got, params)], 1)
