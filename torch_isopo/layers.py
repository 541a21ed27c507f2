"""Which parameters form a layer, and the forward each layer's modules run inside a microbatch.

SPEC §3: ``nn.Linear`` and Hugging Face ``Conv1D`` (weight and bias together) and ``nn.Embedding``
are linear layers; normalisation layers and any other module with its own parameters form one
layer each; modules that share a parameter (tied ``lm_head``/embedding) merge into one layer.
A module with its own parameters and no dedicated rule is a black box together with everything
below it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import functions
from .functions import EmbeddingFn, LinearFn, NormAffineFn, RecomputeFn

FACTOR_RULES = ("linear", "conv1d", "embedding")


@dataclass
class Entry:
    """One module of a layer and how its parameters map into the layer's parameter list."""

    module: nn.Module
    name: str
    rule: str
    slots: list = field(default_factory=list)   # (owner module, attribute, layer param index)
    weight: int | None = None                  # factor rules: layer index of the weight
    bias: int | None = None                    # factor rules: layer index of the bias
    affine: bool | None = None                 # norm rule: output is h(x) ⊙ weight + bias
    normalise: object = None                   # norm rule: h(x) without a unit-weight product


@dataclass
class Layer:
    """A group of trainable parameters transformed together."""

    name: str
    kind: str                      # "factor", "norm" or "generic"
    params: list[nn.Parameter]
    param_names: list[str]
    entries: list[Entry]
    owners: list[tuple[nn.Module, str]]   # where each parameter is registered

    def live_params(self) -> list[Tensor]:
        """The tensors the owning modules hold right now: FSDP2 registers unsharded parameters
        for the duration of a forward, and those are the ones the graph must use."""
        params = [getattr(module, attr) for module, attr in self.owners]
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


def _conv1d_class():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _rule(module: nn.Module, has_trainable_children: bool) -> str:
    t = type(module)
    if isinstance(module.__dict__.get("forward"), PatchedForward):
        raise ValueError(f"module {t.__name__} already has an ISOPO optimizer attached; call "
                         "its detach() first")
    own = module.__dict__.get("forward")
    if own is not None and getattr(own, "__func__", None) is not t.forward:
        return "generic"                    # a forward replaced on the instance: a black box
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d) and t.forward is conv1d.forward:
        return "conv1d"
    if isinstance(module, nn.Embedding) and t.forward is nn.Embedding.forward:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ValueError(
                f"ISOPO does not support nn.Embedding with max_norm, scale_grad_by_freq or "
                f"sparse=True ({t.__name__})")
        return "embedding"
    is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or t.__name__.endswith(("RMSNorm", "LayerNorm"))
    if is_norm and not has_trainable_children and all(
            p.dim() == 1 for p in module.parameters(recurse=False)):
        return "norm"
    return "generic"


def find_layers(model: nn.Module) -> list[Layer]:
    """Group the model's trainable parameters into layers (SPEC §3)."""
    claims = []           # (module, name, rule, {param: [(owner, attr)]})
    inside = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        direct = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not direct:
            continue
        children = any(p.requires_grad for c in m.children() for p in c.parameters())
        rule = _rule(m, children)
        owners: dict[nn.Parameter, list] = {}
        scope = m.modules() if rule == "generic" else [m]
        for sub in scope:
            if sub is not m:
                inside.add(id(sub))
            for attr, p in sub._parameters.items():
                if p is not None and p.requires_grad:
                    owners.setdefault(p, []).append((sub, attr))
        claims.append((m, name or type(m).__name__, rule, owners))

    # merge claims that share a parameter (union-find over claim indices)
    parent = list(range(len(claims)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}
    for i, (_, _, _, owners) in enumerate(claims):
        for p in owners:
            j = first.setdefault(id(p), i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(claims)):
        groups.setdefault(root(i), []).append(i)

    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    return [_build_layer([claims[i] for i in idx], aliases) for idx in groups.values()]


def _build_layer(claims, aliases) -> Layer:
    rules = {c[2] for c in claims}
    label = "+".join(c[1] for c in claims)
    if rules <= set(FACTOR_RULES):
        kind = "factor"
    elif rules == {"norm"}:
        kind = "norm"
    elif rules == {"generic"}:
        kind = "generic"
    else:
        raise ValueError(f"ISOPO cannot merge modules {label} (rules {sorted(rules)}) that share a "
                         "parameter into one layer")
    params: list[nn.Parameter] = []
    homes: list[tuple[nn.Module, str]] = []
    index: dict[int, int] = {}

    def slot(p, module, attr):
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
            homes.append((module, attr))
        return index[id(p)]

    entries = []
    if kind == "factor":
        weights = {id(m.weight) for m, _, _, _ in claims if m.weight.requires_grad}
        biases = [m.bias for m, _, r, _ in claims
                  if r != "embedding" and m.bias is not None and m.bias.requires_grad]
        if len(weights) > 1 or len({id(b) for b in biases}) > 1 or (
                weights and any(not m.weight.requires_grad for m, _, _, _ in claims)):
            raise ValueError(f"ISOPO supports modules sharing one weight (tied embeddings), not the "
                             f"sharing pattern of {label}")
        for m, name, rule, _ in claims:
            w = slot(m.weight, m, "weight") if m.weight.requires_grad else None
            b = None
            if rule != "embedding" and m.bias is not None and m.bias.requires_grad:
                b = slot(m.bias, m, "bias")
            entries.append(Entry(m, name, rule, weight=w, bias=b))
    else:
        for m, name, rule, owners in claims:
            e = Entry(m, name, rule)
            for p, places in owners.items():
                i = slot(p, *places[0])
                e.slots.extend((owner, attr, i) for owner, attr in places)
            entries.append(e)
    pnames = ["=".join(aliases.get(id(p), ["?"])) for p in params]
    return Layer(label, kind, params, pnames, entries, homes)


# ---------------------------------------------------------------------------------------------
# the forwards that run inside a microbatch

@dataclass
class LinearUse:
    pending: object
    smap: object
    conv1d: bool
    weight: bool
    bias: bool


@dataclass
class EmbeddingUse:
    pending: object
    smap: object
    padding_idx: int | None


class RecomputeUse:
    """What a black-box module's backward needs: how to call it and how to split its outputs."""

    def __init__(self, pending, mb, entry: Entry, orig, in_spec, in_consts, n_args, first_arg):
        self.pending, self.mb, self.entry, self.orig = pending, mb, entry, orig
        self.kind = "norm" if entry.rule == "norm" else "generic"
        self.slots = entry.slots
        self.in_spec, self.in_consts, self.n_args = in_spec, in_consts, n_args
        self.first_arg = first_arg
        self.out_maps = []

    def set_outputs(self, leaves, spec):
        """Record the output structure and map every float output's rows to samples."""
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        where = f"module '{self.entry.name}' output"
        self.out_maps = [self.mb.sample_map(t.shape[:-1], where, t.device)
                         if t.is_floating_point() else None for t in tensors]
        self.out_consts = [functions._TENSOR if isinstance(t, Tensor) else t for t in leaves]
        self.out_spec = spec
        if self.kind == "norm":
            x = self.first_arg
            params = self.pending.layer.params
            if not (len(tensors) == 1 and x is not None and tensors[0].shape == x.shape
                    and all(params[i].numel() == x.shape[-1] for _, _, i in self.slots)):
                raise ValueError(f"ISOPO: normalisation layer '{self.entry.name}' does not act "
                                 "per feature of its input; the norm rule cannot apply")
        self.first_arg = None


class PatchedForward:
    """A module's forward while ISOPO is attached: the original one outside a microbatch (or
    without grad), ISOPO's inside. A copy or pickle of the module gets its plain forward back,
    so ``copy.deepcopy(model)`` (a reference policy, say) is an ordinary model."""

    def __init__(self, isopo, layer: Layer, entry: Entry, own):
        module = entry.module
        self.isopo, self.layer, self.entry, self.own = isopo, layer, entry, own
        self.orig = own if own is not None else type(module).forward.__get__(module)
        self.__wrapped__ = self.orig
        self.run = {"linear": _linear, "conv1d": _linear,
                    "embedding": _embedding, "norm": _norm}.get(entry.rule, _recompute)

    def __call__(self, *args, **kwargs):
        mb = self.isopo._forward_microbatch() if torch.is_grad_enabled() else None
        if mb is None:
            return self.orig(*args, **kwargs)
        return self.run(mb, self.layer, self.entry, self.orig, args, kwargs)

    def __reduce__(self):
        return _plain_forward, (self.entry.module, self.own)


def _plain_forward(module, own):
    return own if own is not None else type(module).forward.__get__(module)


def _only_input(entry, args, kwargs):
    if len(args) + len(kwargs) != 1:
        raise TypeError(f"ISOPO: module '{entry.name}' expects one input")
    return args[0] if args else next(iter(kwargs.values()))


def _linear(mb, layer, entry, orig, args, kwargs):
    x = mb.expand_shared(_only_input(entry, args, kwargs), features=True)
    pending, gated = mb.gate(layer)
    m = entry.module
    w = gated[entry.weight] if entry.weight is not None else m.weight
    b = gated[entry.bias] if entry.bias is not None else m.bias
    smap = mb.sample_map(x.shape[:-1], f"module '{entry.name}' input", x.device)
    use = LinearUse(pending, smap, entry.rule == "conv1d", entry.weight is not None,
                    entry.bias is not None)
    return LinearFn.apply(x, w, b, use)


def _embedding(mb, layer, entry, orig, args, kwargs):
    ids = mb.expand_shared(_only_input(entry, args, kwargs), features=False)
    pending, gated = mb.gate(layer)
    smap = mb.sample_map(ids.shape, f"module '{entry.name}' input", ids.device)
    use = EmbeddingUse(pending, smap, entry.module.padding_idx)
    return EmbeddingFn.apply(ids, gated[entry.weight], use)


def _recompute(mb, layer, entry, orig, args, kwargs):
    pending, gated = mb.gate(layer)
    leaves, spec = tree_flatten((args, kwargs))
    first = next((i for i, t in enumerate(leaves) if isinstance(t, Tensor)), None)
    if first is not None:
        leaves[first] = mb.expand_shared(leaves[first], features=True)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    consts = [functions._TENSOR if isinstance(t, Tensor) else t for t in leaves]
    first = tensors[0] if tensors else None
    use = RecomputeUse(pending, mb, entry, orig, spec, consts, len(tensors), first)
    outs = iter(RecomputeFn.apply(use, *tensors, *gated))
    leaves = [next(outs) if c is functions._TENSOR else c for c in use.out_consts]
    return tree_unflatten(leaves, use.out_spec)


@dataclass
class NormUse:
    pending: object
    smap: object
    weight: bool
    bias: bool


def _norm(mb, layer, entry, orig, args, kwargs):
    """A normalisation layer whose output is ``h(x) ⊙ weight + bias`` computes ``h`` with its
    own forward (unit weight, zero bias) and the affine step as an ISOPO op: per-token pieces
    cost one product. Other per-feature norms are recomputed in the backward."""
    if entry.affine is None:
        entry.affine = _is_affine(entry, orig, args, kwargs)
    if not entry.affine:
        return _recompute(mb, layer, entry, orig, args, kwargs)
    pending, gated = mb.gate(layer)
    if args:
        args = (mb.expand_shared(args[0], features=True), *args[1:])
    params = {attr: entry.module._parameters.get(attr) for attr in ("weight", "bias")}
    if entry.normalise is not None and len(args) == 1 and not kwargs:
        h = entry.normalise(args[0])
    else:
        unit = {a: None if p is None else (torch.ones_like if a == "weight" else torch.zeros_like)(
            p, requires_grad=False) for a, p in params.items()}
        with _swapped(entry.module, unit):
            h = orig(*args, **kwargs)
    live = {attr: gated[i] for _, attr, i in entry.slots}
    w = live.get("weight", params["weight"])
    b = live.get("bias", params["bias"])
    smap = mb.sample_map(h.shape[:-1], f"module '{entry.name}' output", h.device)
    return NormAffineFn.apply(h, w, b, NormUse(pending, smap, "weight" in live, "bias" in live))


def _is_affine(entry, orig, args, kwargs) -> bool:
    """Check once, with random parameters, that the module computes ``h(x) ⊙ weight + bias``."""
    m = entry.module
    if not args or not isinstance(args[0], Tensor) or any(
            owner is not m or attr not in ("weight", "bias") for owner, attr, _ in entry.slots):
        return False
    x = args[0][:1].detach()
    w, b = m._parameters.get("weight"), m._parameters.get("bias")
    if not isinstance(w, Tensor):
        return False
    gen = torch.Generator(device=w.device).manual_seed(0)
    rand = {"weight": torch.rand(w.shape, generator=gen, device=w.device).to(w.dtype) + 0.5,
            "bias": None if b is None else torch.randn(b.shape, generator=gen,
                                                        device=b.device).to(b.dtype)}
    unit = {"weight": torch.ones_like(w), "bias": None if b is None else torch.zeros_like(b)}
    with torch.no_grad():
        with _swapped(m, rand):
            y = orig(x, *args[1:], **kwargs)
        with _swapped(m, unit):
            h = orig(x, *args[1:], **kwargs)
    if not isinstance(y, Tensor) or not isinstance(h, Tensor) or y.shape != h.shape:
        return False
    want = h * rand["weight"] + (0 if b is None else rand["bias"])
    tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(y.float(), want.float(), rtol=tol, atol=tol):
        return False
    fast = _normaliser(m)
    if fast is not None and len(args) == 1 and not kwargs:
        with torch.no_grad():
            if torch.allclose(fast(x).float(), h.float(), rtol=tol, atol=tol):
                entry.normalise = fast
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


class _swapped:
    """Temporarily give a module other tensors for its ``weight``/``bias`` parameters."""

    def __init__(self, module, tensors):
        self.module, self.tensors = module, {a: t for a, t in tensors.items() if t is not None}

    def __enter__(self):
        self.saved = {a: self.module._parameters[a] for a in self.tensors}
        self.module._parameters.update(self.tensors)

    def __exit__(self, *exc):
        self.module._parameters.update(self.saved)
