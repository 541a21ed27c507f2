"""Which trainable parameters form a layer, and which rule computes each (docs/layers.md).

Every module with trainable parameters of its own is claimed by the rule registered for it
(``rules``); a module no rule matches is a black box together with everything below it (the
generic rule), and ISOPO says so once. Modules that share a parameter (a tied ``lm_head`` and
embedding) merge into one layer.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _compat
from .rules import FREE, GENERIC, Rule, rule_for


class GenericRuleWarning(UserWarning):
    """A module takes the generic rule: exact, but its per-sample gradients cost a batched
    backward of the module."""


@dataclass
class Entry:
    """One module of a layer and how its parameters map into the layer's parameter list."""

    module: nn.Module
    name: str
    rule: Rule
    slots: list = field(default_factory=list)   # (owner module, attribute, layer param index)
    cache: dict = field(default_factory=dict)  # what the rule learns about the module once

    def slot(self, attr: str) -> int | None:
        """The layer index of the module's own trainable parameter ``attr``, or None."""
        own = self.cache.get("slots")
        if own is None:
            own = self.cache["slots"] = {a: i for owner, a, i in self.slots if owner is self.module}
        return own.get(attr)

    def tensor(self, attr: str, gated, owner: nn.Module | None = None, slot: int | None = None):
        """``owner.attr`` (the module's own by default) as the rule's op must use it: its gated
        parameter (``slot``, or the module's own slot), else the tensor the module holds, frozen
        or absent. One that requires grad without being a trainable parameter of the layer was
        computed from another parameter (``torch.nn.utils.prune``, a hypernetwork setting
        ``lin.weight``): the op would drop its gradient, so it is refused."""
        if owner is None:
            owner, slot = self.module, self.slot(attr)
        if slot is not None:
            return gated[slot]
        t = getattr(owner, attr, None)
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(
                f"ISOPO: module '{self.name}' uses a {attr} that requires grad but is no trainable "
                "parameter of it: a tensor computed from other parameters (torch.nn.utils.prune's "
                "mask, a hypernetwork or reparametrisation setting the attribute), whose gradient "
                "the layer's op would not pass on. Use torch.nn.utils.parametrize (followed "
                f"exactly), make pruning permanent (prune.remove(module, '{attr}')), or apply the "
                "computed tensor in the parent module's own forward (F.linear(x, w, b))")
        return t


@dataclass
class Layer:
    """A group of trainable parameters transformed together; ``rule`` names how."""

    name: str
    rule: str
    pieces: str                    # the Fisher positions of its rule (``Rule.pieces``)
    params: list[nn.Parameter]
    param_names: list[str]
    entries: list[Entry]
    owners: list[tuple[nn.Module, str]]   # where each parameter is registered
    index: int = 0                 # its place among the model's layers

    def live_params(self) -> list[Tensor]:
        """The tensors the owning modules hold right now: FSDP2 registers unsharded parameters
        for the duration of a forward, and those are the ones the graph must use."""
        params = _compat.registered_all(self.owners)
        for p, name in zip(params, self.param_names):
            if _is_dtensor(p):
                raise RuntimeError(
                    f"ISOPO: parameter '{name}' is still a sharded DTensor inside the forward; "
                    "ISOPO needs every rank to hold whole layers and whole samples. Use data "
                    "parallelism (DDP, or FSDP2 through the forward of the modules given to "
                    "fully_shard); tensor, sequence and context parallelism are not supported")
        return params


def _is_dtensor(t) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _choose(module: nn.Module, name: str) -> Rule:
    """The module's rule: a registered one; for a module whose children have trainable
    parameters, or a container that code reads and never calls (``ParameterList``,
    ``ParameterDict``, a module without a forward), the free-parameter rule; else the generic
    black box, announced with its reason."""
    from .attach import PatchedForward
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"ISOPO: module '{name}' is a TorchScript module (torch.jit.script or trace) with "
            "trainable parameters: ISOPO runs each layer's forward through its rule, which a "
            "compiled TorchScript forward does not allow. Keep the policy in eager mode while "
            "training it (script it afterwards), or use torch.compile, which ISOPO supports")
    for hook in _compat.forward_pre_hooks(module):
        if type(hook).__module__ in ("torch.nn.utils.weight_norm", "torch.nn.utils.spectral_norm"):
            raise ValueError(
                f"ISOPO: module '{name}' uses the hook-based {type(hook).__name__} (deprecated), "
                "which computes its weight before the forward where ISOPO cannot follow it; use "
                "torch.nn.utils.parametrizations.weight_norm / spectral_norm instead")
    own = module.__dict__.get("forward")
    if isinstance(own, PatchedForward):
        raise ValueError(f"ISOPO: module '{name}' ({type(module).__name__}) already has an ISOPO "
                         "optimizer attached; call its detach() first")
    replaced = own is not None and getattr(own, "__func__", None) is not type(module).forward
    try:
        rule = None if replaced else rule_for(module)
    except ValueError as e:             # a rule's refusal of the module's configuration
        raise ValueError(f"ISOPO: module '{name}' ({type(module).__name__}): {e}") from None
    # a rule taking the whole subtree reads its children's weights itself: a parametrized one
    # (weight_norm on an attention's out_proj) is a tensor it does not know how to compute
    scope = module.modules() if rule is not None and rule.whole_subtree else (module,)
    tensors = any(parametrize.is_parametrized(m) for m in scope)
    if rule is not None and (not tensors or rule.parametrized and rule.supports(module)):
        return rule
    whole = rule is not None and rule.whole_subtree   # its forward uses its children's weights
    if not whole and any(p.requires_grad for c in _children(module) for p in c.parameters()) or \
            isinstance(module, (nn.ParameterList, nn.ParameterDict)) or \
            not replaced and type(module).forward is nn.Module.forward:   # containers code reads
        return FREE
    if replaced:
        reason = "its forward was replaced on the instance"
    elif rule is not None:
        reason = f"the {rule.name} rule does not take its parametrized tensors"
    else:
        reason = f"no rule is registered for {type(module).__qualname__}"
    warnings.warn(f"ISOPO: module '{name}' takes the generic rule ({reason}), with everything "
                  "below it: exact, but its per-sample gradients cost a batched backward of the "
                  "module", GenericRuleWarning, stacklevel=4)
    return GENERIC


def _whole_subtree(m: nn.Module) -> bool:
    """Whether ``m``'s rule computes its children's parameters itself (attention's
    ``out_proj``): such a module is a layer even when only its children's are trainable."""
    try:
        rule = rule_for(m)
    except ValueError:                  # a refused configuration: reported if m has parameters
        return False
    return rule is not None and rule.whole_subtree


def _parametrizations(m: nn.Module) -> list[nn.Module]:
    """The modules holding the originals of ``m``'s parametrized tensors (``parametrize``)."""
    return list(m.parametrizations.modules()) if parametrize.is_parametrized(m) else []


def _own(m: nn.Module):
    """The parameters a module holds itself: its direct ones and its parametrizations' originals."""
    yield from m.parameters(recurse=False)
    for sub in _parametrizations(m):
        yield from sub.parameters(recurse=False)


def _children(m: nn.Module):
    skip = m.parametrizations if parametrize.is_parametrized(m) else None
    return [c for c in m.children() if c is not skip]


def find_layers(model: nn.Module) -> list[Layer]:
    """Group the model's trainable parameters into layers."""
    claims = []           # (module, name, rule, {param: [(owner, attr)]})
    inside = set()
    for name, m in model.named_modules():
        if id(m) in inside or not any(p.requires_grad for p in _own(m)) and not (
                _whole_subtree(m) and any(p.requires_grad for p in m.parameters())):
            continue
        label = name or type(m).__name__
        rule = _choose(m, label)
        owners: dict[nn.Parameter, list] = {}
        scope = list(m.modules()) if rule.whole_subtree else [m, *_parametrizations(m)]
        for sub in scope:
            if sub is not m:
                inside.add(id(sub))
            for attr, p in sub.named_parameters(recurse=False, remove_duplicate=False):
                if p.requires_grad:
                    owners.setdefault(p, []).append((sub, attr))
        claims.append((m, label, rule, owners))
    groups = _shared_groups([owners for *_, owners in claims])
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    layers = [_build_layer([claims[i] for i in idx], aliases) for idx in groups]
    for i, layer in enumerate(layers):
        layer.index = i
    return layers


def _shared_groups(owner_maps: list[dict]) -> list[list[int]]:
    """Indices of the claims that share a parameter, grouped (union-find), in claim order."""
    parent = list(range(len(owner_maps)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}
    for i, owners in enumerate(owner_maps):
        for p in owners:
            parent[root(i)] = root(first.setdefault(id(p), i))
    groups: dict[int, list[int]] = {}
    for i in range(len(owner_maps)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _build_layer(claims, aliases) -> Layer:
    label = "+".join(c[1] for c in claims)
    rules = {c[2] for c in claims}
    if len(rules) > 1 and not all(r.factor for r in rules) or len({r.pieces for r in rules}) > 1:
        raise ValueError(f"ISOPO cannot merge modules {label} (rules "
                         f"{sorted(r.name for r in rules)}) that share a parameter into one layer")
    params: list[nn.Parameter] = []
    homes: list[tuple[nn.Module, str]] = []
    index: dict[int, int] = {}

    def slot(p, module, attr):
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
            homes.append((module, attr))
        return index[id(p)]

    for p in {id(p): p for *_, owners in claims for p in owners}.values():
        places = [(o, a) for *_, owners in claims for o, a in owners.get(p, [])]
        kinds = {isinstance(o, parametrize.ParametrizationList) for o, _ in places}
        if len(kinds) > 1:            # its rules would follow the one use and drop the other
            raise ValueError(
                f"ISOPO: a parameter of {label} is used both as a parametrization's original and "
                "directly (a weight tied between a parametrized and a plain module): not "
                "supported; parametrize every module that uses it, or none")
    entries = []
    for m, name, rule, owners in claims:
        e = Entry(m, name, rule)
        for p, places in owners.items():
            i = slot(p, *places[0])
            e.slots.extend((owner, attr, i) for owner, attr in places)
        entries.append(e)
    pnames = ["=".join(aliases.get(id(p), ["?"])) for p in params]
    rule_name = "+".join(sorted({r.name for r in rules}))
    return Layer(label, rule_name, next(iter(rules)).pieces, params, pnames, entries, homes)
