"""``ISOPO``: a ``torch.optim.Optimizer`` that wraps another one and writes ISOPO gradients."""
from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import engine
from .functions import Gate, graph_microbatch
from .layers import Layer, PatchedForward, find_layers
from .samples import SampleMap, expand_shared, sample_map
from .transforms import condition_number

MODES = ("ntk", "fisher", "reinforce")


class _Pending:
    """One layer's uses within one backward of one microbatch's graph, collected until the
    layer's gate runs. It travels with the graph and remembers its microbatch, wherever and
    whenever that graph's backward runs."""

    def __init__(self, isopo: "ISOPO", layer: Layer, mb: "_Microbatch", params: list):
        self.isopo, self.layer, self.mb, self.n = isopo, layer, mb, mb.n
        self.params = params          # the parameter tensors the gate received
        self.uses: list = []
        self.task = None              # the backward (autograd graph task) the uses came from

    def add(self, use) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:         # a new backward: drop what an interrupted one left
            self.uses, self.task = [], task
        self.uses.append(use)

    def finish(self) -> tuple:
        uses = self.uses if self.task == torch._C._current_graph_task_id() else []
        self.uses = []
        if not uses:
            return (None,) * len(self.params)
        return self.isopo._finish(self.layer, uses, self.mb, self.params)


class _Microbatch:
    """State of one ``with opt.microbatch(...)`` block."""

    def __init__(self, isopo, A: Tensor, segments: Tensor | None, sample_dim: int):
        self.isopo, self.A, self.n = isopo, A, A.numel()
        self.segments, self.sample_dim = segments, sample_dim
        self._gates: dict[int, tuple] | None = {}
        self._maps: dict[tuple, SampleMap] = {}
        self._advantages: dict[str, tuple] = {}

    def close(self) -> None:
        """The block has ended: only the graph keeps the gates alive. A forward run for this
        microbatch later (a checkpoint recompute) gets gates of its own, kept by nothing here,
        so no reference cycle outlives the graph."""
        self._gates = None

    def gate(self, layer: Layer) -> tuple:
        """The layer's parameters as seen by this microbatch's graph (one gate per layer)."""
        key = id(layer)
        found = None if self._gates is None else self._gates.get(key)
        if found is None:
            params = layer.live_params()
            self.isopo._watch(layer, params)
            pending = _Pending(self.isopo, layer, self, params)
            found = (pending, Gate.apply(pending, *params))
            if self._gates is not None:
                self._gates[key] = found
        return found

    def advantages(self, device) -> tuple[Tensor, float, float]:
        """``(A', back, S)`` on ``device``, read once per microbatch: ``A = A' · back`` (see
        ``_unit_advantages``) and ``S`` the loss scale, so the backward never waits on the device."""
        key = str(device)
        if key not in self._advantages:
            A, back = _unit_advantages(self.A)
            self._advantages[key] = (A.to(device), back, self.isopo._loss_scale())
        return self._advantages[key]

    def expand_shared(self, t: Tensor, features: bool) -> Tensor:
        return expand_shared(t, self.n, self.segments, self.sample_dim, t.dim() - int(features))

    def sample_map(self, shape, where: str, device) -> SampleMap:
        key = (tuple(shape), str(device))
        if key not in self._maps:
            self._maps[key] = sample_map(shape, self.n, self.segments, self.sample_dim, where,
                                         device)
        return self._maps[key]


class ISOPO(torch.optim.Optimizer):
    """Isometric Policy Optimization around any optimizer (arXiv 2512.23353).

    Example::

        opt = ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-5), mode="ntk")
        with opt.microbatch(advantages):                  # one advantage per sample
            logp = token_logprobs(model, batch)           # (B, L), any model code
            (-(logp * mask).sum() / mask.sum()).backward()  # advantages stay out of the loss
        opt.step(); opt.zero_grad()

    Inside a microbatch every trainable parameter receives, per layer, ``Σ_i c_i G_i`` where
    ``G_i`` is sample i's gradient of the (advantage-free) loss and ``c`` is

    * ``reinforce``: ``c = A`` (plain REINFORCE, the correctness anchor);
    * ``ntk``: ``c = ρ (K + ρI)⁻¹ A`` with ``K_ij = ⟨G_i, G_j⟩``, ``ρ = damping · tr(K)/n``;
    * ``fisher``: ``c_i = A_i / sqrt(ν_i² + damping · mean ν²)``, ``ν_i`` the Fisher norm of
      ``G_i`` estimated from per-token pieces at ``fisher_probes`` random positions.

    The statistic ``m`` behind ``ρ`` is an exponential moving average over steps (``ema=β``) or
    the microbatch's own (``ema=None``). The inner optimizer then descends the written gradient.
    Outside a microbatch the model computes exactly as without ISOPO.

    Args:
        model: the policy; all its trainable parameters are handled.
        optimizer: the inner optimizer; ``param_groups``, ``state`` and ``defaults`` are its own.
        mode: ``"ntk"``, ``"fisher"`` or ``"reinforce"``.
        damping: ``ρ / m``; must be > 0 for ``ntk`` and ≥ 0 for ``fisher``.
        ema: ``β`` of the moving average of ``m``, or ``None``.
        fisher_probes: number of probe positions per layer, or ``None`` for all of them.
        generator: draws the probe positions (a seeded ``torch.Generator`` by default).
        route: ``"auto"`` picks the cheaper exact route for ``K`` per layer; ``"gram"`` or
            ``"materialise"`` force one.
        memory_budget: bytes of transient memory one layer's ISOPO work may use.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the losses (fp16), if any. ISOPO
            reads its scale, so that the statistics and the ``fisher`` gradient (which does not
            change with the loss scale) keep the units of the unscaled loss.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str = "ntk",
                 damping: float = 1.0, ema: float | None = 0.9, fisher_probes: int | None = 250,
                 generator: torch.Generator | None = None, route: str = "auto",
                 memory_budget: int = 256 * 2**20, grad_scaler: torch.amp.GradScaler | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0 or (mode == "ntk" and damping == 0):
            raise ValueError(f"damping must be {'> 0' if mode == 'ntk' else '>= 0'} and finite for "
                             f"mode {mode!r}, got {damping}")
        if ema is not None and not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"ema must be None or in [0, 1), got {ema}")
        if fisher_probes is not None and (not isinstance(fisher_probes, int) or fisher_probes < 1):
            raise ValueError(f"fisher_probes must be None or a positive int, got {fisher_probes!r}")
        if route not in ("auto", "gram", "materialise"):
            raise ValueError(f"unknown route {route!r}; choose 'auto', 'gram' or 'materialise'")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.mode, self.damping, self.ema = mode, damping, None if ema is None else float(ema)
        self.fisher_probes, self.route, self.memory_budget = fisher_probes, route, int(memory_budget)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.grad_scaler = grad_scaler
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.layers: list[Layer] = find_layers(model)
        self._active: _Microbatch | None = None
        self._graphs = weakref.WeakSet()   # microbatches whose graphs may still run backward
        self._produced: dict[int, list[Tensor]] = {}   # gradients the gates made, per parameter
        self._produced_task: int | None = None          # ... in this backward (graph task)
        self._m: dict[str, float] = {}                 # EMA of m per layer
        self._step_figures: dict[str, list] = {}       # this step's microbatch figures
        self._last_figures: dict[str, list] = {}       # the last step's, for diagnostics
        self._diagnostics: dict[str, dict[str, float]] | None = None
        self._restore: list = []
        self._watched = WeakIdKeyDictionary()          # parameters swapped in for a forward
        self._attach()

    @classmethod
    def factory(cls, model: nn.Module, optimizer_cls, **isopo_kwargs) -> type:
        """An optimizer class for trainers that build the optimizer from parameters alone.

        ``ISOPO.factory(model, torch.optim.AdamW, mode="ntk")(params, lr=1e-5)`` is
        ``ISOPO(model, torch.optim.AdamW(params, lr=1e-5), mode="ntk")``. Pass it wherever an
        optimizer class is expected: ``Trainer(optimizer_cls_and_kwargs=(it, {"lr": 1e-5}))``, a
        ``cls(params, **kwargs)`` config. Its instances are ``ISOPO`` instances.
        """
        try:
            inspect.signature(cls.__init__).bind(None, model, None, **isopo_kwargs)
        except TypeError as e:
            raise TypeError(f"ISOPO.factory: {e}; arguments of the inner optimizer (lr, ...) are "
                            "given to the returned class") from None
        base = cls

        def __init__(self, params, **optimizer_kwargs):
            inner = optimizer_cls(params, **optimizer_kwargs)
            owned = {id(p) for p in model.parameters()}
            stray = sum(id(p) not in owned for g in inner.param_groups for p in g["params"])
            if stray:
                raise ValueError(f"ISOPO.factory: {stray} of the parameters given to the optimizer "
                                 "are not parameters of the model the factory was made for; make "
                                 "it for the model the trainer trains")
            base.__init__(self, model, inner, **isopo_kwargs)

        name = f"{cls.__name__}[{getattr(optimizer_cls, '__name__', type(optimizer_cls).__name__)}]"
        return type(name, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                   "__doc__": f"ISOPO around {name[6:-1]}, bound to one model."})

    # -- the inner optimizer's own objects ---------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the statistics of the microbatches that made them (a
        step the loss scaler skipped must not count)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._step_figures = {}

    @torch.no_grad()
    def step(self, closure=None):
        """Step the inner optimizer, then fold this step's statistics into the averages."""
        loss = self.optimizer.step(closure)
        self._end_step()
        return loss

    # -- microbatches --------------------------------------------------------------------------
    @contextlib.contextmanager
    def microbatch(self, advantages, segments=None, *, sample_dim: int = 0):
        """Run one microbatch's forward and backward inside this block.

        Args:
            advantages: one finite scalar per sample, shape ``(n,)``.
            segments: optional integer sample id (in ``[0, n)``) per token, for packed
                sequences or episodes of several rows.
            sample_dim: the sample axis (0 or 1) of ≥3-D layer inputs, e.g. 1 for ``(L, B, d)``.
        """
        if self._active is not None:
            raise RuntimeError("ISOPO microbatch contexts cannot be nested")
        if not self._restore:
            raise RuntimeError("this ISOPO optimizer was detached from its model")
        A = _check_advantages(advantages)
        seg = _check_segments(segments, A.numel())
        if sample_dim not in (0, 1):
            raise ValueError(f"sample_dim must be 0 or 1, got {sample_dim}")
        self._produced.clear()
        self._active = mb = _Microbatch(self, A, seg, sample_dim)
        self._graphs.add(mb)
        try:
            yield self
        finally:
            self._active = None
            self._produced.clear()
            mb.close()

    def _forward_microbatch(self) -> _Microbatch | None:
        """The microbatch a module's forward belongs to: the open one; for a forward run inside
        a backward (an activation-checkpoint recompute), the one whose graph is back-propagated,
        so that the recompute repeats the ops of the original forward."""
        node = torch._C._current_autograd_node()
        if node is None or not self._graphs:       # no graph of ours to search
            return self._active
        mb = graph_microbatch(node, self)
        return mb if mb is not None else self._active

    # -- per-layer work, called from a gate's backward ---------------------------------------
    def _config(self) -> engine.Config:
        return engine.Config(self.mode, self.damping, self.fisher_probes, self.route,
                             self.memory_budget, self.generator)

    def _loss_scale(self) -> float:
        s = self.grad_scaler
        return 1.0 if s is None or not s.is_enabled() else float(s.get_scale())

    def _finish(self, layer: Layer, uses: list, mb: _Microbatch, params: list) -> tuple:
        cfg = self._config()
        A, back, S = mb.advantages(params[0].device)
        m_used = self._m.get(layer.name) if self.ema is not None else None
        if m_used is not None:
            m_used *= S * S               # the averages are kept in units of the unscaled loss
        if self.mode == "fisher":
            back *= S                     # the fisher gradient ignores the loss scale: restore it
        if layer.kind == "factor":
            weight_idx = next((e.weight for e in layer.entries if e.weight is not None), None)
            shape = params[weight_idx].shape if weight_idx is not None else None
            W, B, coef = engine.finish_factor(uses, shape, A, cfg, m_used)
            grads = [None] * len(params)
            if weight_idx is not None:
                grads[weight_idx] = W
            for e in layer.entries:
                if e.bias is not None:
                    grads[e.bias] = B
        else:
            flat, coef = engine.finish_explicit(uses, A, cfg, m_used)
            grads, start = [], 0
            for p in params:
                grads.append(flat[start:start + p.numel()].view_as(p))
                start += p.numel()
        task = torch._C._current_graph_task_id()
        if task != self._produced_task:
            self._produced, self._produced_task = {}, task
        out = []
        for p, g in zip(params, grads):
            if g is not None:
                g = g.to(p.dtype)
                g = (g if back == 1.0 else g * back).contiguous()
            if g is not None:
                self._produced.setdefault(id(p), []).append(g)
            out.append(g)
        if self.mode != "reinforce":      # tensors, read at step() and when logged
            self._step_figures.setdefault(layer.name, []).append((coef, A, S))
        return tuple(out)

    def _end_step(self) -> None:
        """Fold this step's microbatch statistics into the averages; keep its figures for
        ``diagnostics``."""
        for name, figs in self._step_figures.items():
            m = sum(float(coef.m) / S ** 2 for coef, _, S in figs) / len(figs)
            if self.ema is not None and math.isfinite(m) and m > 0:
                # a step without gradient for the layer (m = 0) or with an overflow is no history
                old = self._m.get(name)
                self._m[name] = m if old is None else self.ema * old + (1 - self.ema) * m
        self._last_figures, self._step_figures = self._step_figures, {}
        self._diagnostics = None

    @property
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per layer, for the last ``step()``: the mean ``m``, ``rho`` and ``‖c‖/‖A‖`` over its
        microbatches, the largest condition number (of K, or of ν for fisher) and the number of
        microbatches. Computed when read, so steps that are not logged cost nothing."""
        if self._diagnostics is None:
            self._diagnostics = {}
            for name, figs in self._last_figures.items():
                figs = [(float(coef.m) / S ** 2, float(coef.rho) / S ** 2,
                         float(coef.c.norm() / A.norm()) * (S if self.mode == "fisher" else 1.0),
                         condition_number(coef.spectrum, self.mode)) for coef, A, S in figs]
                k = len(figs)
                self._diagnostics[name] = {
                    "m": sum(f[0] for f in figs) / k, "rho": sum(f[1] for f in figs) / k,
                    "c_ratio": sum(f[2] for f in figs) / k, "cond": max(f[3] for f in figs),
                    "microbatches": k}
        return self._diagnostics

    # -- hooks ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        for layer in self.layers:
            for entry in layer.entries:
                m = entry.module
                own = m.__dict__.get("forward")
                m.forward = PatchedForward(self, layer, entry, own)
                self._restore.append(("forward", m, own))
            for p, name in zip(layer.params, layer.param_names):
                h = p.register_hook(self._checker(p, name))
                self._restore.append(("hook", h, None))

    def _watch(self, layer: Layer, params: list) -> None:
        """Check the gradients of parameters that a wrapper registers for the forward (FSDP2's
        unsharded ones) like those of the parameters found at attach time."""
        for p, own, name in zip(params, layer.params, layer.param_names):
            if p is not own and p.is_leaf and p.requires_grad and p not in self._watched:
                self._watched[p] = p.register_hook(self._checker(p, name))

    def _checker(self, p: Tensor, name: str):
        def check(grad):
            made = None
            if self._produced_task == torch._C._current_graph_task_id():
                made = self._produced.pop(id(p), None)
            if made is None and self._active is None:
                return None                    # a graph built outside any microbatch
            if made is not None and len(made) > 1:
                error = (f"ISOPO: one backward reached parameter '{name}' through the graphs of "
                         f"{len(made)} microbatches; run one backward per microbatch")
            elif made is None or grad is not made[0]:
                error = (f"ISOPO: parameter '{name}' received a gradient that did not come from "
                         "its module's forward (used directly, e.g. by a fused kernel, or a graph "
                         "built outside any microbatch was back-propagated inside one); ISOPO "
                         "cannot attribute it to samples")
            else:
                return None
            self._produced.clear()             # this backward stops here: leave nothing behind
            raise RuntimeError(error)
        return check

    def detach(self) -> None:
        """Remove every patch and hook: the model is exactly as before ISOPO was attached."""
        for kind, obj, old in reversed(self._restore):
            if kind == "hook":
                obj.remove()
            elif old is None:
                del obj.forward
            else:
                obj.forward = old
        self._restore = []
        for handle in self._watched.values():
            handle.remove()
        self._watched = WeakIdKeyDictionary()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["isopo"] = {"m": dict(self._m), "generator": self.generator.get_state()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        sd = dict(state_dict)
        extra = sd.pop("isopo", None)
        self.optimizer.load_state_dict(sd)
        if extra is not None:
            self._m = {k: float(v) for k, v in extra["m"].items()}
            self.generator.set_state(extra["generator"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        return (f"ISOPO(mode={self.mode!r}, damping={self.damping}, ema={self.ema}, "
                f"layers={len(self.layers)}, optimizer={self.optimizer!r})")


def _unit_advantages(A: Tensor) -> tuple[Tensor, float]:
    """``(A / 2^e, 2^e)`` with ``|A / 2^e| < 1`` for very large or small advantages (exact;
    ordinary ones are kept): ``c`` is linear in ``A``, and fp16 activations can hold neither."""
    amax = float(A.abs().max())
    if amax == 0 or 2.0 ** -8 <= amax <= 2.0 ** 8:
        return A, 1.0
    e = math.frexp(amax)[1]
    return A * 2.0 ** -e, 2.0 ** e


def _check_advantages(advantages) -> Tensor:
    A = torch.as_tensor(advantages)
    if A.dim() != 1 or A.numel() == 0:
        raise ValueError(f"advantages must be a 1-D tensor with one value per sample, got shape "
                         f"{tuple(A.shape)}")
    if A.is_complex() or A.dtype == torch.bool:
        raise TypeError(f"advantages must be real numbers, got {A.dtype}")
    A = A.detach().to("cpu", torch.float64)
    if not torch.isfinite(A).all():
        raise ValueError("advantages must be finite; got NaN or inf at positions "
                         f"{torch.nonzero(~torch.isfinite(A)).flatten().tolist()}")
    return A


def _check_segments(segments, n: int) -> Tensor | None:
    if segments is None:
        return None
    seg = torch.as_tensor(segments)
    if seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor of sample ids, got {seg.dtype}")
    seg = seg.reshape(-1).long()
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= n):
        raise ValueError(f"segments must hold sample ids in [0, {n}) for {n} advantages, got "
                         f"values in [{int(seg.min())}, {int(seg.max())}]")
    return seg
