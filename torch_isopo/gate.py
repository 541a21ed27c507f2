"""The gate: the autograd op whose backward makes a layer's ISOPO gradient.

Every layer's trainable parameters pass through one ``Gate`` per microbatch. Each use of the layer
(one forward call of one of its modules, run by its rule) is an op whose backward returns only the
input gradient and hands the layer's per-sample material to the gate's record. Autograd runs the
gate's backward after all uses, and it returns the finished ISOPO gradient, so clipping, loss
scalers, DDP and FSDP all see it. Nothing here keeps state outside the graph.
"""
from __future__ import annotations

import collections
import contextlib
import threading

from torch.autograd import Function

from . import _compat


_OWN_NODES: set[type] = set()

# vector-Jacobian products a free parameter's meeting runs inside the backward (``shared.Meet``),
# on this thread: the layers' backwards they cross record nothing, and another meeting they cross
# stops them (what lies behind it is its own, recorded when the backward reaches it)
_vjp = threading.local()


def in_meeting_vjp() -> bool:
    return getattr(_vjp, "depth", 0) > 0


@contextlib.contextmanager
def meeting_vjp():
    _vjp.depth = getattr(_vjp, "depth", 0) + 1
    try:
        yield
    finally:
        _vjp.depth -= 1


def own_op(fn: type[Function]) -> type[Function]:
    """Class decorator for ISOPO's autograd ops: code running in their backward is ISOPO's own
    (the free-parameter tracker leaves it alone)."""
    _OWN_NODES.add(_compat.node_type(fn))
    _compat.lean_function(fn)
    return fn


def own_node(node) -> bool:
    return node is not None and type(node) in _OWN_NODES


@own_op
class Gate(Function):
    """Identity on the layer's parameters; its backward is where the ISOPO gradient is made.

    The uses hand their material to the record and return no gradient for the parameters, so
    what reaches the gate through autograd is only what flowed around the rules (free
    parameters' own ops): the record checks it against the material."""

    @staticmethod
    def forward(ctx, record, *params):
        ctx.set_materialize_grads(False)
        ctx.record = record
        return params         # returned inputs come out as views of them, one per parameter

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.record.finish(grads))


_GATE_NODE = _compat.node_type(Gate)


def find_node(node, match, limit: int | None = None):
    """The nearest autograd node at or below ``node`` (breadth first) for which ``match`` is
    true, or None; at most about ``limit`` nodes are searched."""
    if node is None:
        return None
    todo, seen = collections.deque([node]), {node}
    while todo and (limit is None or len(seen) <= limit):
        fn = todo.popleft()
        if match(fn):
            return fn
        for nxt, _ in fn.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return None


def graph_microbatch(node, owner):
    """The microbatch of optimizer ``owner`` that built the graph of autograd ``node``: that of the
    nearest of its gates below it (breadth first), or None for a graph built outside them."""
    gate = find_node(node, lambda fn: isinstance(fn, _GATE_NODE) and fn.record.mb.owner is owner)
    return None if gate is None else gate.record.mb


def descends_from_use(t, limit: int = 256) -> bool:
    """Whether ``t`` was computed from the output of a layer use (an ISOPO op other than a gate),
    searching at most ``limit`` nodes of its history."""
    return find_node(t.grad_fn, lambda fn: type(fn) in _OWN_NODES and not isinstance(
        fn, _GATE_NODE), limit) is not None
