"""``ISOPO``: a ``torch.optim.Optimizer`` that wraps another one and writes ISOPO gradients."""
from __future__ import annotations

import contextlib
import inspect
import math
import operator

import torch
from torch import Tensor, nn

from . import _compat
from .attach import Attachment, Ledger, attach, detach
from .coefficients import Layer as BatchLayer, condition_number
from .settings import Settings, check_settings
from .layers import Layer, find_layers
from .microbatch import Microbatch, check_advantages, check_segments
from .shared import Tracker, constants

SMALL = 1 << 20   # a model with at most this many trainable parameters has one gate for all
                  # layers: they finish together, solved in one batch (docs/performance.md)


class _Unset:
    """Stands in for the inner optimizer while ``Optimizer.__init__`` sets up the wrapper."""

    def add_param_group(self, param_group: dict) -> None:
        pass


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
        gates: ``"layer"``: each layer's gradient is made as soon as the backward has passed it
            (DDP can start reducing it); ``"model"``: all layers at the end of the backward, their
            solves in one batch (less fixed cost per layer); ``"auto"``: ``"model"`` for models
            of at most 2^20 trainable parameters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str = "ntk",
                 damping: float = 1.0, ema: float | None = 0.9, fisher_probes: int | None = 250,
                 generator: torch.Generator | None = None, route: str = "auto",
                 memory_budget: int = 256 * 2**20, grad_scaler: torch.amp.GradScaler | None = None,
                 gates: str = "auto"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_settings(mode, damping, ema, fisher_probes, route, grad_scaler, gates, generator,
                       memory_budget)
        _check_materialised(model)
        damping = float(damping)
        self.optimizer = _Unset()
        super().__init__([{"params": []}], {})    # hook registries and step profiling, as torch sets them
        self.optimizer = optimizer
        self.model = model
        self.mode, self.damping, self.ema = mode, damping, None if ema is None else float(ema)
        self.fisher_probes, self.route, self.memory_budget = fisher_probes, route, int(memory_budget)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._stepped_generator = None     # fisher probes: the generator as the last step left it
        self._mark_stepped()
        self.grad_scaler = grad_scaler
        self.layers: list[Layer] = find_layers(model)
        self.gates = gates
        self._modules_list = list(model.modules())
        self._together = gates == "model" or gates == "auto" and sum(
            p.numel() for layer in self.layers for p in layer.params) <= SMALL
        self._attachment = Attachment()
        self._ledger = Ledger(self._attachment)
        self._m: dict[str, float] = {}                 # EMA of m per layer
        self._maps: dict = {}                          # sample maps without segments, reused
        self._step_figures: dict[str, list] = {}       # this step's microbatch figures
        self._last_figures: dict[str, list] = {}       # the last step's, for diagnostics
        self._diagnostics: dict[str, dict[str, float]] | None = None
        self._undo = attach(model, self.layers, self._attachment, self._ledger)
        try:
            self._fix_structure(model, optimizer)
        except BaseException:
            self.detach()                  # a refused build leaves the model as it was
            raise

    def _fix_structure(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The modules, and which of their parameters train, are fixed with the layers: checked
        at every microbatch."""
        self._named_modules = list(model.named_modules(remove_duplicate=False))
        self._children = [_compat.own_children(m)
                          for m in {id(m): m for _, m in self._named_modules}.values()]
        self._kids = _snapshot(self._children)
        self._trainable = [(f"{mn}.{attr}" if mn else attr, _compat.own_parameters(m), attr,
                            p.requires_grad)
                           for mn, m in model.named_modules() for attr, p in
                           m.named_parameters(recurse=False)]
        self._registered = [(mn, params, tuple(params.keys())) for mn, m in model.named_modules()
                            for params in (_compat.own_parameters(m),)]
        self._ids = self._parameter_ids()
        self._guard_strays(optimizer.param_groups)

    def _parameter_ids(self) -> list[int]:
        """The trainable parameters' tensors by identity, slot by slot (frozen ones may be tied
        and untied freely: no layer holds them; their slot's index stands in, never an id)."""
        return [id(params.get(attr)) if trains else k
                for k, (_, params, attr, trains) in enumerate(self._trainable)]

    def _check_unchanged(self) -> None:
        """The layers and the parameters they train are found once, when ISOPO is built: a module
        replaced, added or removed since, a parameter frozen, unfrozen, added or removed, or two
        parameters tied or untied, is refused (a new or unfrozen one would get plain autograd's
        gradient, a frozen one would still enter ``K``, an untied one would not be used). A
        parameter replaced by a trainable one on the same module, ties kept (a device move,
        weights tied again), is what the layer's gate reads and the tracker follows."""
        same = _snapshot(self._children) == self._kids
        now = [] if same else list(self.model.named_modules(remove_duplicate=False))
        if not same and (len(now) != len(self._named_modules) or not all(
                m is old for (_, m), (_, old) in zip(now, self._named_modules))):
            self._refuse_change(_module_change(self._named_modules, now))
        for name, params, attr, trainable in self._trainable:
            p = params.get(attr)
            if p is None:
                self._refuse_change(f"parameter '{name}' was removed")
            elif p.requires_grad != trainable:
                self._refuse_change(
                    f"parameter '{name}' was {'trainable' if trainable else 'frozen'} when ISOPO "
                    f"was built and is {'trainable' if p.requires_grad else 'frozen'} now")
        for mn, params, names in self._registered:
            if tuple(params.keys()) != names:
                added = next((a for a, q in params.items()
                              if a not in names and q is not None and q.requires_grad), None)
                if added is not None:
                    self._refuse_change(f"parameter '{f'{mn}.{added}' if mn else added}' was added")
        ids = self._parameter_ids()
        if ids != self._ids:
            change = _identity_change([name for name, *_ in self._trainable], self._ids, ids)
            if change is not None:
                self._refuse_change(change)

    @staticmethod
    def _refuse_change(change: str) -> None:
        raise ValueError(
            f"ISOPO: {change}: ISOPO finds the layers and the parameters they train once, when it "
            "is built. Build it again after changing the model or which parameters train: "
            "opt.detach(); opt = ISOPO(model, opt.optimizer, ...); a parameter frozen for a while "
            "(peft's disable_adapter()) must be trainable again when the block starts")

    def _guard_strays(self, groups, start: int = 0) -> None:
        """Trainable parameters of the inner optimizer that no layer holds (a ``log_std`` kept
        beside the model, ISOPO built on a submodule): a gradient they receive inside a
        microbatch would be plain autograd's, without advantages, so it is refused."""
        owned = {id(_compat.registered(owner, attr)) for layer in self.layers
                 for owner, attr in layer.owners}
        for i, group in enumerate(groups, start):
            for p in group["params"]:
                if id(p) not in owned and p.requires_grad:
                    owned.add(id(p))
                    self._undo.append(("hook", p.register_hook(self._stray(i, p)), None))

    def _stray(self, group: int, p: Tensor):
        def check(grad):
            if self._attachment.active is not None:
                raise RuntimeError(
                    f"ISOPO: a parameter of shape {tuple(p.shape)} in the optimizer's param group "
                    f"{group} is not a trainable parameter of the model ISOPO was built on, and it "
                    "received a gradient inside a microbatch, which ISOPO cannot attribute to "
                    "samples. Build ISOPO on the module that holds all the parameters the loss "
                    "trains (the whole agent), or compute that parameter's loss outside the "
                    "microbatch block")
            return None
        return check

    @classmethod
    def factory(cls, model: nn.Module, optimizer_cls, **isopo_kwargs) -> type:
        """An optimizer class for trainers that build the optimizer from parameters alone.

        ``ISOPO.factory(model, torch.optim.AdamW, mode="ntk")(params, lr=1e-5)`` is
        ``ISOPO(model, torch.optim.AdamW(params, lr=1e-5), mode="ntk")``. Pass it wherever an
        optimizer class is expected: ``Trainer(optimizer_cls_and_kwargs=(it, {"lr": 1e-5}))``, a
        ``cls(params, **kwargs)`` config. Its instances are ``ISOPO`` instances.
        """
        try:
            bound = inspect.signature(cls.__init__).bind(None, model, None, **isopo_kwargs)
        except TypeError as e:
            raise TypeError(f"ISOPO.factory: {e}; arguments of the inner optimizer (lr, ...) are "
                            "given to the returned class") from None
        bound.apply_defaults()
        a = bound.arguments                       # their values checked now, not in the trainer
        check_settings(a["mode"], a["damping"], a["ema"], a["fisher_probes"], a["route"],
                       a["grad_scaler"], a["gates"], a["generator"], a["memory_budget"])
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
        if getattr(self, "_undo", None):         # not while Optimizer.__init__ sets up
            self._guard_strays(self.optimizer.param_groups[-1:], len(self.param_groups) - 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the statistics of the microbatches that made them (a
        step the loss scaler skipped must not count)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._step_figures.clear()
        if self._attachment.active is not None:
            self._attachment.active.drop_figures()
        if self._stepped_generator is not None:     # the probes drawn since are undrawn too
            self.generator.set_state(self._stepped_generator)

    @torch.no_grad()
    def step(self, closure=None):
        """Step the inner optimizer, then fold this step's statistics into the averages."""
        if self._attachment.active is not None:     # inside a block: its statistics count
            self._attachment.active.commit_figures()
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
        if self._attachment.active is not None:
            raise RuntimeError("ISOPO microbatch contexts cannot be nested")
        if not self._undo:
            raise RuntimeError("this ISOPO optimizer was detached from its model")
        self._check_unchanged()
        A, amax = check_advantages(advantages)
        seg = check_segments(segments, A.numel())
        if sample_dim not in (0, 1):
            raise ValueError(f"sample_dim must be 0 or 1, got {sample_dim!r}")
        self._ledger.clear()
        mb = Microbatch(self._attachment, A, amax, seg, sample_dim, self._settings(),
                        self._m if self.ema is not None else None, self._step_figures,
                        self._ledger, self._loss_scale, self._maps, self.generator)
        if self._together:
            mb.gate_all = self.layers
        free = [layer for layer in self.layers if layer.rule == "parameter"]
        if free:
            mb.tracker = Tracker(self._attachment, free, constants(self._modules_list))
        self._attachment.active = mb
        self._attachment.graphs.add(mb)
        failed = True
        try:
            with contextlib.nullcontext() if mb.tracker is None else _tracking(mb.tracker):
                yield self
            failed = False
        finally:
            self._attachment.active = None
            self._ledger.clear()
            mb.close(failed)
            if failed and mb.drawn_from is not None:   # its probes are undrawn
                self.generator.set_state(mb.drawn_from)

    def _settings(self) -> Settings:
        probes = self.mode == "fisher" and self.fisher_probes is not None
        return Settings(self.mode, self.damping, self.fisher_probes, self.route,
                        self.memory_budget, None if probes else 0)

    def _loss_scale(self) -> float:
        s = self.grad_scaler
        return 1.0 if s is None or not s.is_enabled() else float(s.get_scale())

    # -- statistics and diagnostics ------------------------------------------------------------
    def _end_step(self) -> None:
        """Fold this step's microbatch statistics into the averages; keep its figures for
        ``diagnostics``."""
        if self.ema is not None:
            ms = iter(_host_m([coef for figs in self._step_figures.values() for coef, _, _ in figs]))
            for name, figs in self._step_figures.items():
                # a microbatch that overflowed (a step the scaler skipped, its figures kept by a
                # loop that zeroes through the model) is left out; the others count
                finite = [v for v in (next(ms) / S ** 2 for _, _, S in figs) if math.isfinite(v)]
                m = sum(finite) / len(finite) if finite else 0.0
                if m > 0:
                    # a step without gradient for the layer (m = 0) or with an overflow is no
                    # history
                    old = self._m.get(name)
                    self._m[name] = m if old is None else self.ema * old + (1 - self.ema) * m
        self._last_figures = dict(self._step_figures)
        self._step_figures.clear()
        self._diagnostics = None
        self._mark_stepped()

    def _mark_stepped(self) -> None:
        """Remember the generator's state: ``zero_grad`` rewinds to it, so that microbatches
        dropped without a step leave no trace in the probes drawn later."""
        if self.mode == "fisher" and self.fisher_probes is not None:
            self._stepped_generator = self.generator.get_state()

    @property
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per layer, for the last ``step()``: the mean ``m``, ``rho`` and ``‖c‖/‖A‖`` over its
        microbatches, the largest condition number (of K, or of ν for fisher) and the number of
        microbatches. Computed when read, so steps that are not logged cost nothing."""
        if self._diagnostics is None:
            self._diagnostics = {}
            for name, figs in self._last_figures.items():
                figs = [(float(coef.m) / S ** 2, float(coef.rho) / S ** 2,
                         float(coef.c.norm().to(A.device) / A.norm())   # (layers may be
                         * (S if self.mode == "fisher" else 1.0),          # on other devices)
                         condition_number(coef.spectrum, self.mode)) for coef, A, S in figs]
                k = len(figs)
                self._diagnostics[name] = {
                    "m": sum(f[0] for f in figs) / k, "rho": sum(f[1] for f in figs) / k,
                    "c_ratio": sum(f[2] for f in figs) / k, "cond": max(f[3] for f in figs),
                    "microbatches": k}
        return self._diagnostics

    def detach(self) -> None:
        """Remove every patch and hook: the model is exactly as before ISOPO was attached."""
        detach(self._undo, self._ledger)
        self._undo = []

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        for hook in _compat.optimizer_hooks(self, "state_dict_pre"):
            hook(self)
        sd = self.optimizer.state_dict()
        sd["isopo"] = {"m": dict(self._m), "generator": self.generator.get_state()}
        for hook in _compat.optimizer_hooks(self, "state_dict_post"):
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in _compat.optimizer_hooks(self, "load_state_dict_pre"):
            state_dict = hook(self, state_dict) or state_dict
        sd = dict(state_dict)
        extra = sd.pop("isopo", None)
        if extra is not None:
            m, state = self._checked_extra(extra)
        self.optimizer.load_state_dict(sd)
        if extra is not None:
            self._m.clear()
            self._m.update(m)
            self.generator.set_state(state)
            self._mark_stepped()
        for hook in _compat.optimizer_hooks(self, "load_state_dict_post"):
            hook(self)

    def _checked_extra(self, extra) -> tuple[dict, Tensor]:
        """ISOPO's part of a state dict, checked before anything is loaded: the moving averages
        of layers this optimizer has, and a generator state."""
        try:
            m = {str(k): float(v) for k, v in extra["m"].items()}
            state = extra["generator"]
            torch.Generator().set_state(state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise ValueError("ISOPO: the state dict's 'isopo' entry is malformed (it needs 'm': "
                             "{layer name: float} and 'generator': a torch.Generator state): "
                             f"{e}") from None
        bad = {k: v for k, v in m.items() if not (math.isfinite(v) and v > 0)}
        if bad:                       # a step never stores these: no history to damp with
            raise ValueError(f"ISOPO: the state dict's moving averages of m must be finite and "
                             f"positive, got {bad}")
        unknown = sorted(set(m) - {layer.name for layer in self.layers})
        if unknown:
            raise ValueError(
                f"ISOPO: the state dict has statistics of layers {unknown} that this model does "
                f"not have (its layers: {[layer.name for layer in self.layers][:8]}...): it was "
                "saved from another model, or the same one wrapped or named differently; build "
                "ISOPO on the module it was saved with")
        return m, state

    def __getstate__(self) -> dict:
        """A copy or pickle carries the model, the inner optimizer, the settings and the
        statistics; it attaches itself to the copied model."""
        settings = {k: getattr(self, k) for k in ("mode", "damping", "ema", "fisher_probes",
                                                   "generator", "route", "memory_budget",
                                                   "grad_scaler", "gates")}
        return {"model": self.model, "optimizer": self.optimizer, "settings": settings,
                "m": dict(self._m)}

    def __setstate__(self, state: dict) -> None:
        ISOPO.__init__(self, state["model"], state["optimizer"], **state["settings"])
        self._m.update(state["m"])

    def __repr__(self) -> str:
        return (f"ISOPO(mode={self.mode!r}, damping={self.damping}, ema={self.ema}, "
                f"layers={len(self.layers)}, optimizer={self.optimizer!r})")


def _ties(ids: list[int]) -> list[int]:
    """Which parameter slots hold one tensor: each slot's first slot with the same tensor."""
    first: dict[int, int] = {}
    return [first.setdefault(i, k) for k, i in enumerate(ids)]


def _identity_change(names: list[str], was: list[int], now: list[int]) -> str | None:
    """The first change, in words, in which parameter slots hold which tensors since ISOPO was
    built (``was``, ``now``: the tensors' ids slot by slot), or None when each replaced tensor is
    a new one and the ties are as they were."""
    ties_was, ties_now = _ties(was), _ties(now)
    k = next((k for k, (a, b) in enumerate(zip(ties_was, ties_now)) if a != b), None)
    if k is not None:
        if ties_now[k] != k:
            return f"parameter '{names[k]}' was tied to '{names[ties_now[k]]}'"
        return f"parameter '{names[k]}' was untied from '{names[ties_was[k]]}'"
    first = {i: k for k, i in reversed(list(enumerate(was)))}
    k = next((k for k, (i, j) in enumerate(zip(now, was)) if i != j and i in first), None)
    if k is not None:                  # a tensor of the build now in another slot (a swap)
        return f"parameter '{names[k]}' now holds the tensor of '{names[first[now[k]]]}'"
    return None


def _module_change(was: list, now: list) -> str:
    """The first module replaced, added or removed since ISOPO was built, in words."""
    old = dict(was)
    old_ids, new_ids = {id(m) for _, m in was}, {id(m) for _, m in now}
    for n, m in now:
        if id(m) not in old_ids:
            replaced = n in old and id(old[n]) not in new_ids
            return f"module '{n}' was {'replaced' if replaced else 'added'}"
    for n, m in was:
        if id(m) not in new_ids:
            return f"module '{n}' was removed"
    moved = next((n for n, m in now if old.get(n) is not m), None)
    return "the model's modules were rearranged" + (f" (module '{moved}')" if moved else "")


_ITEMS = operator.methodcaller("items")


def _snapshot(children: list) -> list[tuple]:
    """Every module's children, by name, as they are now (one C-level pass; a TorchScript
    module's are an ordered dict of its own)."""
    return list(map(tuple, map(_ITEMS, children)))


@contextlib.contextmanager
def _tracking(tracker):
    """The free-parameter tracker's mode for the block, with compiled code run eagerly inside it
    (a compiled policy is traced again once the block is over)."""
    with _compat.eager_compiled(), tracker:
        yield


def _check_materialised(model: nn.Module) -> None:
    """A lazy module (``nn.LazyLinear``) has no shape until its first forward, and becomes
    another module then: its layer cannot be found before that."""
    for name, m in model.named_modules():
        if any(nn.parameter.is_lazy(t) for t in (*m.parameters(recurse=False),
                                                   *m.buffers(recurse=False))):
            raise ValueError(
                f"ISOPO: module '{name or type(m).__name__}' ({type(m).__name__}) is not "
                "initialised yet (a lazy module): run one forward with a dummy batch before "
                "ISOPO(model, ...)")
        if type(m).__module__ == "peft.tuners.lora.dora":
            raise ValueError(
                f"ISOPO: module '{name}' is peft's DoRA ({type(m).__name__}, use_dora=True), "
                "which ISOPO does not support (its magnitude runs the LoRA factors on an "
                "identity matrix, rows that belong to no sample): use LoRA without DoRA "
                "(use_dora=False)")


def _host_m(coefs: list) -> list[float]:
    """Each layer's ``m`` as a float, read from the batches its microbatch solved the layers in:
    one copy per device (one host sync), not a select and a copy per layer and microbatch."""
    batches: dict[int, tuple[int, Tensor]] = {}      # a batch's m, by identity: (number, m)
    where = []
    for coef in coefs:
        m, i = (coef.batch.m, coef.i) if isinstance(coef, BatchLayer) else (coef.m.reshape(1), 0)
        where.append((batches.setdefault(id(m), (len(batches), m))[0], i))
    ms = [m for _, m in batches.values()]
    read: list = [None] * len(ms)
    by_device: dict = {}
    for k, m in enumerate(ms):
        by_device.setdefault(m.device, []).append(k)
    for ks in by_device.values():
        flat = torch.cat([ms[k].reshape(-1) for k in ks]).double().tolist()
        start = 0
        for k in ks:
            read[k], start = flat[start:start + ms[k].numel()], start + ms[k].numel()
    return [read[b][i] for b, i in where]
