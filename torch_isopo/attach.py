"""What ISOPO adds to a model, and takes away again: patched forwards and gradient checks.

``Attachment`` knows the open microbatch and the microbatches whose graphs may still run
backward; ``PatchedForward`` replaces a layer module's forward and runs its rule inside a
microbatch; ``Ledger`` checks that every gradient a parameter receives inside a microbatch is the
one its gate made.
"""
from __future__ import annotations

import operator
import weakref

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _compat
from .gate import graph_microbatch
from .rules.norm import BATCH_NORMS, mixes_samples, refuse_batch_statistics


class Attachment:
    """The open microbatch and those whose graphs may still be back-propagated."""

    def __init__(self):
        self.active = None
        self.graphs = weakref.WeakSet()

    def forward_microbatch(self):
        """The microbatch a module's forward belongs to: the open one; for a forward run inside
        a backward (an activation-checkpoint recompute), the one whose graph is back-propagated,
        so that the recompute repeats the ops of the original forward."""
        node = _compat.autograd_node()
        if node is None or not self.graphs:        # no graph of ours to search
            return self.active
        mb = graph_microbatch(node, self)
        return mb if mb is not None else self.active


class PatchedForward:
    """A module's forward while ISOPO is attached: the original one outside a microbatch (or
    without grad), its rule's inside. A copy or pickle of the module gets its plain forward back,
    so ``copy.deepcopy(model)`` (a reference policy, say) is an ordinary model."""

    def __init__(self, attachment: Attachment, layer, entry, own):
        module = entry.module
        self.attachment, self.layer, self.entry, self.own = attachment, layer, entry, own
        self.orig = own if own is not None else type(module).forward.__get__(module)
        self.__wrapped__ = self.orig

    @_compat.run_eagerly
    def __call__(self, *args, **kwargs):
        mb = self.attachment.forward_microbatch() if torch.is_grad_enabled() else None
        if mb is None or not _compat.any_trainable(self.layer.owners):
            # (a call with every parameter of the layer swapped for a detached tensor, as
            # functional_call computes a target with: nothing of it reaches the parameters)
            return self.orig(*args, **kwargs)
        if _compat.in_functorch_transform():
            raise ValueError(
                f"ISOPO: module '{self.entry.name}' runs inside a torch.func transform (vmap, "
                "grad, jacrev) in a microbatch: ISOPO's per-layer autograd ops do not run under "
                "such transforms. Call the module on the whole batch outside the transform (its "
                "rows are the samples already), or compute a target with it under "
                "torch.no_grad()")
        tracker = mb.tracker
        try:
            if tracker is None:
                out = self.entry.rule.forward(mb, self.layer, self.entry, self.orig, args, kwargs)
            else:
                out = self._tracked(mb, tracker, args, kwargs)
        except BaseException:
            mb.watching = None             # a refused call leaves nothing for the next one
            raise
        if mb.watching is not None:        # an input taken as shared, checked (microbatch.py)
            mb.watch_copies(out)
        return out

    def _tracked(self, mb, tracker, args, kwargs):
        where = f"the input of module '{self.entry.name}'"
        if not kwargs and all(isinstance(t, Tensor) for t in args):
            args = tuple(tracker.layer_input(mb, t, where) for t in args)
        else:                                           # also inside tuples (an RNN's hx)
            leaves, spec = _compat.tree_flatten((args, kwargs))
            met = [tracker.layer_input(mb, t, where) if isinstance(t, Tensor) else t
                   for t in leaves]
            if any(a is not b for a, b in zip(met, leaves)):
                args, kwargs = _compat.tree_unflatten(met, spec)
        if tracker.on_top():
            with _compat.without_function_mode():
                return self.entry.rule.forward(mb, self.layer, self.entry, self.orig, args, kwargs)
        tracker.paused += 1
        try:
            return self.entry.rule.forward(mb, self.layer, self.entry, self.orig, args, kwargs)
        finally:
            tracker.paused -= 1

    def __reduce__(self):
        return _plain_forward, (self.entry.module, self.own)


def _plain_forward(module, own):
    return own if own is not None else type(module).forward.__get__(module)


class Ledger:
    """The gradients the gates made in the current backward, per parameter: a parameter hook
    compares what the parameter receives with them."""

    def __init__(self, attachment: Attachment):
        self.attachment = attachment
        self.made: dict[int, list[Tensor]] = {}
        self.task: int | None = None               # the backward (graph task) they belong to
        self.watched = WeakIdKeyDictionary()       # parameters swapped in for a forward

    def clear(self) -> None:
        self.made.clear()

    def record(self, params: list[Tensor], grads: tuple) -> None:
        task = _compat.graph_task_id()
        if task != self.task:
            self.made, self.task = {}, task
        for p, g in zip(params, grads):
            if g is not None:
                self.made.setdefault(id(p), []).append(g)

    def watch(self, layer, params: list[Tensor]) -> None:
        """Check the gradients of parameters that a wrapper registers for the forward (FSDP2's
        unsharded ones) like those of the parameters found at attach time."""
        if all(map(operator.is_, params, layer.params)):
            return
        for p, own, name in zip(params, layer.params, layer.param_names):
            if p is not own and p.is_leaf and p.requires_grad and p not in self.watched:
                self.watched[p] = p.register_hook(self.checker(p, name))

    def checker(self, p: Tensor, name: str):
        def check(grad):
            if grad is None:                   # a gate that gave this parameter nothing
                return None
            made = None
            if self.task == _compat.graph_task_id():
                made = self.made.pop(id(p), None)
            if made is None and self.attachment.active is None:
                return None                    # a graph built outside any microbatch
            if made is not None and len(made) > 1:
                error = (f"ISOPO: one backward reached parameter '{name}' through the graphs of "
                         f"{len(made)} microbatches; run one backward per microbatch")
            elif made is None or grad is not made[0]:
                error = (f"ISOPO: parameter '{name}' received a gradient that did not come from "
                         "its module's forward: it was used directly (x @ emb.weight.T, "
                         "F.linear(x, emb.weight), a fused kernel, a method reading "
                         "self.table.weight outside the table module's forward, or "
                         "torch.func.functional_call with tensors computed from the parameters "
                         "in their place), a penalty on the parameters in the loss "
                         "(λ·‖W‖², which no sample owns), a graph built outside any "
                         "microbatch was back-propagated inside one, or a free parameter (one "
                         "held beside children with rules) was used inside a region of reentrant "
                         "activation checkpointing; ISOPO cannot attribute it to samples. Route "
                         "a direct use through a module holding the same Parameter (a tied "
                         "output layer: head = nn.Linear(d, vocab, bias=False); head.weight = "
                         "emb.weight), which ISOPO merges with its owner into one layer; read a "
                         "module's parameter through that module (give it a forward returning "
                         "what is read, and call it: self.table(s)); give functional_call the "
                         "parameters themselves or detached tensors; put a penalty in the inner "
                         "optimizer's weight_decay or in a backward of its own outside the "
                         "microbatch; apply a free parameter outside checkpointed regions")
            else:
                return None
            self.made.clear()                  # this backward stops here: leave nothing behind
            raise RuntimeError(error)
        return check

    def unwatch(self) -> None:
        for handle in self.watched.values():
            handle.remove()
        self.watched = WeakIdKeyDictionary()


def attach(model, layers, attachment: Attachment, ledger: Ledger) -> list:
    """Patch every layer module's forward, hook every layer parameter and guard every module that
    mixes samples; returns what ``detach`` needs to undo it."""
    undo = []
    for name, m in model.named_modules():
        if isinstance(m, BATCH_NORMS):
            undo.append(("hook", m.register_forward_pre_hook(_guard(attachment, name)), None))
    for layer in layers:
        for entry in layer.entries:
            if not entry.rule.patches_forward:
                continue
            m = entry.module
            own = m.__dict__.get("forward")
            m.forward = PatchedForward(attachment, layer, entry, own)
            undo.append(("forward", m, own))
        for p, name in zip(layer.params, layer.param_names):
            undo.append(("hook", p.register_hook(ledger.checker(p, name)), None))
    return undo


def _guard(attachment: Attachment, name: str):
    def check(module, args):
        if mixes_samples(module) and torch.is_grad_enabled() and attachment.forward_microbatch():
            refuse_batch_statistics(name, module)
    return check


def detach(undo: list, ledger: Ledger) -> None:
    """Remove every patch and hook ``attach`` made: the model is exactly as before."""
    for kind, obj, old in reversed(undo):
        if kind == "hook":
            obj.remove()
        elif old is None:
            del obj.forward
        else:
            obj.forward = old
    ledger.unwatch()
