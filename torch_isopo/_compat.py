"""Every private PyTorch interface ISOPO relies on, each with why and where torch itself uses it.

``tests/test_compat.py`` calls each of them, so a PyTorch release that drops one fails there with
the name of what went missing, not somewhere deep inside a backward.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn
from torch.autograd import Function
from torch.utils import _pytree

# Nested containers of tensors (a module's arguments and outputs): the flattening torch's own
# ``torch.func`` and ``torch.utils.checkpoint`` use. There is no public alias.
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten


# Which backward pass is running (-1 outside any): tells a gate's uses of one backward from those
# an interrupted earlier backward left. ``torch.utils.checkpoint`` and FSDP2 use it. (Bound
# directly, as the next one: both are called several times per layer and microbatch.)
graph_task_id = torch._C._current_graph_task_id

# The autograd node whose backward is running, or None: a forward run inside a backward (an
# activation-checkpoint recompute) finds its graph from it. ``torch.autograd.graph`` uses it.
autograd_node = torch._C._current_autograd_node


def reentrant_recompute(node) -> bool:
    """Whether the running autograd node is reentrant activation checkpointing's
    (``torch.utils.checkpoint`` with ``use_reentrant=True``), which recomputes its region's forward
    and back-propagates it on its own."""
    from torch.utils.checkpoint import CheckpointFunction
    return isinstance(node, node_type(CheckpointFunction))


def checkpointed() -> bool:
    """Whether the running code is a region of non-reentrant activation checkpointing (its
    forward or its recompute): ``torch.utils.checkpoint`` pushes its own saved-tensor hooks
    there, found at the top of autograd's stack of default hooks."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    name = getattr(hooks[0], "__qualname__", "") if hooks else ""
    return name.startswith(("_checkpoint_hook.", "_recomputation_hook."))


def node_type(fn: type[Function]) -> type:
    """The class of the graph nodes a custom ``Function`` creates, to recognise them while walking
    ``next_functions``. ``torch.autograd.function`` builds it as ``_backward_cls``."""
    return fn._backward_cls


def at_backward_end(fn) -> None:
    """Run ``fn`` when the running backward has ended without error (never if it fails): the
    autograd engine's final callbacks, which DDP's reducer and FSDP use the same way."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


# whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``) is running (the C function
# itself: it is asked at every call of a patched forward and of ISOPO's autograd ops)
in_functorch_transform = torch._C._are_functorch_transforms_active


def lean_function(fn: type[Function]) -> None:
    """Call a custom ``Function`` without ``Function.apply``'s Python preamble (functorch
    bookkeeping, ~2 µs a call on a small layer) and run its node without the backward class's
    lookup of the user's function: ``apply`` goes straight to the C ``_FunctionBase.apply``
    that ``Function.apply`` ends in, unless a functorch transform is active (then
    ``Function.apply`` itself runs). For Functions without ``setup_context`` or ``vjp``."""
    full, direct = fn.apply, super(Function, fn).apply
    active = in_functorch_transform
    backward = fn.backward

    def apply(*args):
        return full(*args) if active() else direct(*args)
    fn.apply = staticmethod(apply)
    fn._backward_cls.apply = lambda ctx, *grads: backward(ctx, *grads)


def optimizer_hooks(optimizer: torch.optim.Optimizer, kind: str) -> list:
    """The hooks registered with ``register_state_dict_{pre,post}_hook`` or
    ``register_load_state_dict_{pre,post}_hook``: ``ISOPO`` delegates (load_)state_dict to its
    inner optimizer and runs its own hooks around it, as ``Optimizer.state_dict`` does."""
    return list(getattr(optimizer, f"_optimizer_{kind}_hooks").values())


@contextlib.contextmanager
def swapped_parameters(places: list[tuple[nn.Module, str]], tensors: list):
    """Let modules hold other tensors in place of some of their parameters for a while.

    A black-box recompute runs the module's own forward with gated or detached parameters; the
    public ``torch.func.functional_call`` would call the module (its patched forward and its
    hooks) instead. Like ``torch.nn.utils.stateless``, this writes ``module._parameters``.
    """
    saved = [(m, a, m._parameters[a]) for m, a in places]
    for (m, a), t in zip(places, tensors):
        m._parameters[a] = t
    try:
        yield
    finally:
        for m, a, p in reversed(saved):
            m._parameters[a] = p


def forward_pre_hooks(module: nn.Module) -> list:
    """The module's forward pre-hooks: the deprecated hook-based ``weight_norm`` and
    ``spectral_norm`` recompute a weight from its parameters there, out of ISOPO's sight. There is
    no public way to list a module's hooks."""
    return list(module._forward_pre_hooks.values())


def top_function_mode():
    """The innermost ``TorchFunctionMode`` (``torch.overrides`` keeps the stack)."""
    from torch.overrides import _get_current_function_mode
    return _get_current_function_mode()


def without_function_mode():
    """Run ISOPO's own ops without its free-parameter ``TorchFunctionMode`` (the top of the mode
    stack while a rule runs), as ``torch.overrides`` does around a mode's own handler."""
    from torch.overrides import _pop_mode_temporarily
    return _pop_mode_temporarily()


def own_buffers(module):
    """The module's own buffers, ``None`` for a registered empty one (one pass, without the
    generator ``Module.buffers`` builds)."""
    return module._buffers.values()


def registered_all(places) -> list:
    """``registered`` for every ``(module, attr)`` of ``places``, in one pass."""
    return [m._parameters.get(a) if a in m._parameters else getattr(m, a) for m, a in places]


def any_trainable(places) -> bool:
    """Whether any tensor ``registered_all(places)`` finds requires grad (the first one, as a
    rule: a loop that stops there)."""
    for m, a in places:
        t = m._parameters.get(a) if a in m._parameters else getattr(m, a)
        if t is not None and t.requires_grad:
            return True
    return False


def registered(module, attr: str):
    """``getattr(module, attr)`` for a parameter: a dict lookup where it is registered (FSDP2
    registers its unsharded parameters there for a forward), ``Module.__getattr__`` otherwise."""
    found = module._parameters.get(attr)
    return found if found is not None else getattr(module, attr)


def distributed_tensors() -> bool:
    """Whether ``torch.distributed.tensor`` (DTensor, FSDP2's sharded parameters) is loaded."""
    return "torch.distributed.tensor" in sys.modules


def is_convolution(module) -> bool:
    """Whether ``module`` is a convolution of ``torch.nn`` (transposed or not, lazy or not): their
    common base class is private."""
    return isinstance(module, nn.modules.conv._ConvNd)


def own_children(module) -> dict:
    """The module's direct submodules by attribute name (``Module._modules``)."""
    return module._modules


def own_parameters(module) -> dict:
    """The module's own parameters by attribute name, as ``nn.Module`` keeps them (a dict
    lookup, where ``getattr`` goes through ``Module.__getattr__``)."""
    return module._parameters


def run_eagerly(fn):
    """``fn`` never traced by ``torch.compile``: a layer's patched forward reads state that
    changes every microbatch, which would recompile the model each time. Dynamo's own
    ``torch.compiler.disable`` wrapper costs several µs a call; eagerly, ``is_compiling()`` is
    False and ``fn`` runs directly, and under Dynamo (where it is True) the disabled copy runs."""
    disable = getattr(torch.compiler, "disable", None)
    if disable is None:
        return fn
    eager = disable(fn)
    compiling = torch.compiler.is_compiling

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if compiling():
            return eager(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


def eager_compiled():
    """Run ``torch.compile``d code eagerly for a while (``torch.compiler.set_stance``, torch ≥
    2.6): Dynamo cannot trace a region entered with a ``TorchFunctionMode`` already active (the
    free-parameter tracker), and fails inside itself; compiled code skips module hooks added
    after it was compiled (the brute force's). A no-op on older torch."""
    stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if stance is None else stance("force_eager")


_MM_OUT_DTYPE: dict[str, bool] = {}


def has_mm_to(X: torch.Tensor) -> bool:
    """Whether ``mm_to`` returns float32 products of 16-bit matrices like ``X`` on its device
    (probed once per device type)."""
    dev = X.device.type
    if dev != "cuda" or X.dtype not in (torch.float16, torch.bfloat16):
        return False
    if dev not in _MM_OUT_DTYPE:
        mm_to(X[:1, :1], X[:1, :1].T, torch.float32)
    return _MM_OUT_DTYPE[dev]


def mm_to(X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``X @ Y`` of 16-bit matrices accumulated and returned in float32 by the GPU's matrix
    units (``mm(..., out_dtype=)``, torch ≥ 2.8 on CUDA): the products are exact, no float32
    copy of the inputs is made. None where that is unavailable (the caller upcasts instead)."""
    dev = X.device.type
    if dev != "cuda" or dtype != torch.float32 or X.dtype not in (torch.float16, torch.bfloat16) \
            or Y.dtype != X.dtype:
        return None
    if dev not in _MM_OUT_DTYPE:
        try:
            torch.mm(X[:1, :1], Y[:1, :1], out_dtype=dtype)
            _MM_OUT_DTYPE[dev] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[dev] = False
    return torch.mm(X, Y, out_dtype=dtype) if _MM_OUT_DTYPE[dev] else None
