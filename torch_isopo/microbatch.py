"""The state of one ``with opt.microbatch(...)`` block, and each layer's record of its uses.

Everything a layer needs in its backward travels down from here (settings, advantages, the
statistics to damp with, where to leave its figures): nothing below calls back into the optimizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import operator

import numpy as np
import torch
from torch import Tensor

from . import _compat
from .finish import ExplicitUse, coefficients, contract, prepare
from .settings import Settings
from .gate import Gate, descends_from_use, in_meeting_vjp
from .layers import _is_dtensor
from .samples import SampleMap, batch_map, expand_shared, sample_map


class LayerRecord:
    """One layer's uses within one backward of one microbatch's graph, collected until the layer's
    gate runs. It travels with the graph and remembers its microbatch, wherever and whenever that
    graph's backward runs."""

    def __init__(self, layer, mb: "Microbatch", params: list[Tensor]):
        self.layer, self.mb, self.n = layer, mb, mb.n
        self.params = params          # the parameter tensors the gate received
        self.autocast = torch.is_autocast_enabled(params[0].device.type)
        self.eps = 0.0                # the coarsest rounding of a free parameter's ops (tracker)
        self.uses: list = []
        self.task = None              # the backward (autograd graph task) the uses came from

    @property
    def wants_pieces(self) -> bool:
        """Whether the uses must carry per-token Fisher pieces."""
        return self.mb.settings.mode == "fisher"

    def add(self, use) -> None:
        if in_meeting_vjp():          # a free parameter's VJP ran this layer's backward again
            return
        task = _compat.graph_task_id()
        if task != self.task:         # a new backward: drop what an interrupted one left
            self.uses, self.task = [], task
        self.uses.append(use)

    def take(self) -> list:
        """The uses of the backward that is running (an interrupted one's are dropped)."""
        uses = self.uses if self.task == _compat.graph_task_id() else []
        self.uses = []
        return uses

    def finish(self, arrived: tuple) -> tuple:
        """The layer's ISOPO gradients, one per gated parameter (the gate's backward);
        ``arrived`` is what autograd delivered to the gate around the rules."""
        return finish_records([self], [arrived])[0]


class ModelRecord:
    """The records of all layers of a small model behind one gate: they finish together at the
    end of the backward, their coefficients solved in one batch."""

    def __init__(self, records: list[LayerRecord]):
        self.records, self.mb = records, records[0].mb

    def finish(self, arrived: tuple) -> tuple:
        parts, start = [], 0
        for r in self.records:
            parts.append(arrived[start:start + len(r.params)])
            start += len(r.params)
        return tuple(g for out in finish_records(self.records, parts) for g in out)


def finish_records(records: list[LayerRecord], arrived: list[tuple]) -> list[tuple]:
    """The ISOPO gradients of the layers whose gates are running, per layer and parameter."""
    outs = [(None,) * len(r.params) for r in records]
    live = []
    for k, (r, got) in enumerate(zip(records, arrived)):
        uses = r.take()
        _check_arrived(r, uses, got)
        if uses:
            live.append((k, r, uses))
    mb = records[0].mb
    mb.check_shared([r.layer for r in records])
    if not live:
        return outs
    cfg = mb.settings
    A, back, S = mb.advantages(live[0][1].params[0].device)
    if cfg.mode == "fisher":
        back *= S                     # the fisher gradient ignores the loss scale: restore it
    preps = [prepare(uses, r.params, mb.n, cfg, r.layer.pieces == "samples", r.layer.index)
             for _, r, uses in live]
    m_used = [None if mb.stats is None or r.layer.name not in mb.stats
              else mb.stats[r.layer.name] * S * S for _, r, _ in live]   # kept unscaled
    coef = coefficients([p.stat for p in preps], A, cfg, m_used, [p.low_rank for p in preps])
    ref = preps[0].ref         # c in the layers' dtype once, where that is a work dtype
    cs = coef.c.to(ref.device, ref.dtype) if ref.dtype in (torch.float32, torch.float64) \
        else coef.c
    figures = []
    for j, ((k, r, _), p) in enumerate(zip(live, preps)):
        same = p.ref.dtype == cs.dtype and p.ref.device == cs.device and p.explicit is None
        c = cs[j] if same else coef.c[j]                     # explicit G: c in float64
        grads = contract(p, c, precise=cfg.mode != "reinforce")
        outs[k] = _finished(grads, r.params, back)
        mb.ledger.record(r.params, outs[k])
        if cfg.mode != "reinforce":   # tensors, read at step() and when logged
            figures.append((r.layer.name, (coef.layer(j), A, S)))
    if figures:
        mb.add_figures(figures)
    return outs


class Microbatch:
    """State of one ``with opt.microbatch(...)`` block.

    ``owner`` identifies the optimizer (a checkpoint recompute looks for its own microbatches),
    ``stats`` holds the moving averages of ``m`` (None without ``ema``), ``figures`` collects each
    layer's coefficients for the step, ``ledger`` checks that every gradient came from a gate and
    ``loss_scale()`` reads the loss scaler, once per microbatch.
    """

    def __init__(self, owner, A: Tensor, amax: float, segments: Tensor | None, sample_dim: int,
                 settings: Settings, stats: dict | None, figures: dict, ledger, loss_scale,
                 maps: dict | None = None, generator: torch.Generator | None = None):
        self.owner, self.A, self.amax, self.n = owner, A, amax, A.numel()
        self.segments, self.sample_dim = segments, sample_dim
        self._settings, self.stats, self.figures, self.ledger = settings, stats, figures, ledger
        self._generator = generator
        self.drawn_from = None       # the generator's state before this block drew its probes
        self._loss_scale = loss_scale
        self.tracker = None          # follows free parameters (``shared.Tracker``), if any
        self.gate_all = None         # the layers to gate together (a small model), if any
        self._together: set[int] = set()   # the layers gated together
        self._gates: dict[int, tuple] | None = {}
        # sample maps by token shape; without segments they depend on n and the shape alone and
        # are kept from one microbatch to the next (``maps``, cleared when it grows large)
        self._maps: dict[tuple, SampleMap] = {} if maps is None or segments is not None else maps
        if len(self._maps) > 64:
            self._maps.clear()
        self._used: set[int] = set()             # layers whose forward ran with grad here
        self._shared: set[str] = set()           # modules given an input shared by all samples
        self._data = False           # whether data with the samples has reached a layer
        self._suspect: dict[str, bool] = {}      # modules with a suspect shared input: True
                                                 # for a second call, False for data first
        self.watching: tuple | None = None   # (module, axis) of the running call whose output's
        self._copies: dict = {}              # copies are watched; per module, (axis, their use)
        self._regions: dict[int, tuple] = {}     # layer -> (reentrant region node, its gate)
        self._explicit = None        # the first input with a sample axis (its description)
        self._pending: list = []     # inputs without one, their history not yet needed
        self._advantages: dict = {}      # device -> (A', back, S)
        self._figures: list | None = []   # made while the block is open, kept if it ends well

    @property
    def settings(self) -> Settings:
        """The settings; ``fisher``'s probe seed is drawn at the first backward that needs it,
        so a block without one (or a failed one, rewound) leaves the generator as it was."""
        cfg = self._settings
        if cfg.probe_seed is None:
            self.drawn_from = self._generator.get_state()
            seed = int(torch.randint(0, 2**62, (), generator=self._generator))
            cfg = self._settings = dataclasses.replace(cfg, probe_seed=seed)
        return cfg

    def add_figures(self, figures: list) -> None:
        """The figures of layers finished in the running backward: they count once it has ended
        without error (one refused after them leaves none)."""
        _compat.at_backward_end(lambda: self._keep_figures(figures))

    def _keep_figures(self, figures: list) -> None:
        if self._figures is None:         # a backward after the block (its graph kept)
            for name, figs in figures:
                self.figures.setdefault(name, []).append(figs)
        else:
            self._figures.extend(figures)

    def drop_figures(self) -> None:
        """Forget the figures made so far (``zero_grad`` inside the block)."""
        if self._figures is not None:
            self._figures = []

    def commit_figures(self) -> None:
        """The statistics made so far enter the step's (at the end of the block, or at a
        ``step()`` inside it)."""
        for name, figures in self._figures:
            self.figures.setdefault(name, []).append(figures)
        self._figures = []

    def close(self, failed: bool = False) -> None:
        """The block has ended: only the graph keeps the gates alive. A forward run for this
        microbatch later (a checkpoint recompute) gets gates of its own, kept by nothing here,
        so no reference cycle outlives the graph. The statistics of a block that ended in an
        error (a refused backward) do not enter the step's."""
        if not failed:
            self.commit_figures()
        self._figures = None
        self._gates = None
        self._pending = []
        self._regions = {}

    def gate(self, layer) -> tuple:
        """``(record, gated params)``: the layer's parameters as this microbatch's graph sees them
        (one gate per layer and microbatch, or one for all ``gate_all`` layers at once)."""
        key = id(layer)
        node = _compat.autograd_node()
        if node is not None and _compat.reentrant_recompute(node):
            return self._region_gate(layer, node)
        recompute = node is not None
        first = key not in self._used
        if not recompute:
            self._used.add(key)
        found = None if self._gates is None else self._gates.get(key)
        if found is not None and not (recompute and key in self._together):
            if recompute or all(map(operator.is_, found[0].params,
                                    _compat.registered_all(layer.owners))):
                return found
            return self._swapped(layer, first)
        if found is None and self._gates is not None and self.gate_all and not recompute \
                and self._gate_together(self.gate_all):
            return self._gates[key]
        found = self._new_gate(layer)
        if self._gates is not None and key not in self._together:
            self._gates[key] = found
        return found

    def _swapped(self, layer, first: bool) -> tuple:
        """The layer holds other tensors than its gate was made for (``functional_call`` with
        some of them replaced, or replaced since an earlier call): a gate of its own if the
        shared one was only made while they were swapped; else refused, as its uses could not
        be joined into one ``K``."""
        key = id(layer)
        if first and key in self._together:
            self._together.discard(key)
            found = self._gates[key] = self._new_gate(layer)
            return found
        raise ValueError(
            f"ISOPO: layer '{layer.name}' runs with other tensors than at its earlier call in "
            "this microbatch (torch.func.functional_call, or parameters swapped on the module "
            "with only some replaced by detached tensors): its uses cannot be joined. Replace all "
            "of a layer's parameters by detached tensors for a target (those calls run as plain "
            "forwards), or compute the target under torch.no_grad()")

    def _new_gate(self, layer) -> tuple:
        params = layer.live_params()
        self.ledger.watch(layer, params)
        record = LayerRecord(layer, self, params)
        return record, Gate.apply(record, *params)

    def _region_gate(self, layer, node) -> tuple:
        """A region of reentrant activation checkpointing is recomputed inside the backward and
        back-propagated on its own: its layers get gates of their own, which finish there. That
        is exact when all of a layer's uses are in the one region; a layer used in two regions,
        or in one and outside, is refused (its uses could not be joined into one ``K``)."""
        region, found = self._regions.get(id(layer), (node, None))
        if region is not node or id(layer) in self._used:
            raise ValueError(
                f"ISOPO: layer '{layer.name}' runs in more than one region of reentrant "
                "activation checkpointing (torch.utils.checkpoint with use_reentrant=True), or in "
                "one and outside it: each region is back-propagated on its own, so the layer's "
                "per-sample gradients cannot be joined. Use use_reentrant=False (exact), or "
                "checkpoint all calls of the layer in one region")
        if found is None:
            found = self._new_gate(layer)
            self._regions[id(layer)] = (node, found)
        return found

    def _gate_together(self, layers) -> bool:
        """One gate for all layers of a small model: one node, one batched solve, at the end of
        the backward. False (nothing done) while some parameter is sharded (FSDP2 unshards each
        module in its forward): then each layer is gated when its module runs."""
        params = [_compat.registered_all(layer.owners) for layer in layers]
        flat = [p for ps in params for p in ps]
        if _compat.distributed_tensors() and any(
                _is_dtensor(p) for p in {type(p): p for p in flat}.values()):
            return False
        records = []
        for layer, ps in zip(layers, params):
            self.ledger.watch(layer, ps)
            records.append(LayerRecord(layer, self, ps))
        gated, start = Gate.apply(ModelRecord(records), *flat), 0
        for layer, record, ps in zip(layers, records, params):
            self._gates[id(layer)] = (record, gated[start:start + len(ps)])
            self._together.add(id(layer))
            start += len(ps)
        return True

    def advantages(self, device) -> tuple[Tensor, float, float]:
        """``(A', back, S)`` on ``device``, read once per microbatch: ``A = A' · back`` (see
        ``unit_advantages``) and ``S`` the loss scale, so the backward never waits on the device."""
        found = self._advantages.get(device)
        if found is None:
            A, back = unit_advantages(self.A, self.amax)
            found = self._advantages[device] = (A.to(device), back, self._loss_scale())
        return found

    def expand_shared(self, t: Tensor, features: bool, axis: int | None = None,
                      name: str | None = None) -> Tensor:
        """``t`` expanded to ``n`` along the sample axis where it has size 1 there (``axis``: a
        layer's own batch axis, as a convolution's, whatever ``sample_dim`` says); ``name``, the
        module's, has the expansion checked (``_check_shared``)."""
        dim = self.sample_dim if axis is None else axis
        out = expand_shared(t, self.n, self.segments, dim, t.dim() - int(features))
        if name is not None and isinstance(t, Tensor):
            if out is t:
                self.note_rows(t, dim if t.dim() - int(features) >= 2 else 0)
            else:                # not in a non-reentrant checkpoint's recompute (seen before)
                node = _compat.autograd_node()
                if node is None or _compat.reentrant_recompute(node):
                    self._check_shared(t, dim, name)
        return out

    def note_rows(self, t: Tensor, dim: int) -> None:
        """A layer input computed without grad (data) with the ``n`` samples along ``dim``: the
        samples have entered the forward."""
        if not self._data and not t.requires_grad and t.dim() > dim and t.shape[dim] == self.n:
            self._data = True

    def _check_shared(self, t: Tensor, dim: int, name: str) -> None:
        """An input of size 1 on the sample axis is a table shared by all samples, each using its
        own copy. Rows of a layer's per-sample output are not: refused. A call per sample (a
        loop with a batch of one), a packed row without ``segments`` and data ``(1, n, d)`` with
        ``sample_dim`` forgotten look like one; a module with a suspect call (its second such
        input, or data while no data with the samples reached a layer in the whole forward) is
        checked at its gate by how the copies of all its calls' outputs reached the loss
        (``check_shared``)."""
        if t.grad_fn is not None and descends_from_use(t):
            raise ValueError(
                f"ISOPO: module '{name}' got an input of shape {tuple(t.shape)}, size 1 on the "
                f"sample axis (dim {dim}), computed from a layer's per-sample output: its samples "
                "lie along another axis (a recurrent or attention layer run time-major on one step "
                f"returns (1, B, d)) or were reduced away. Give it the samples on dim {dim} (h[0], "
                "h.transpose(0, 1)), or say where they are with sample_dim=")
        if name in self._shared:
            self._suspect[name] = True
        elif not self._data and not t.requires_grad:
            self._suspect.setdefault(name, False)     # unless data with the samples follows
        self._shared.add(name)
        self.watching = (name, dim)

    def watch_copies(self, out) -> None:
        """Hooks on the outputs of the call ``watching`` names: which of their copies reach the
        loss, and whether all with the same gradient (device tensors, read at the gate)."""
        name, dim = self.watching
        self.watching = None
        outs = [out] if isinstance(out, Tensor) else _compat.tree_flatten(out)[0]
        call: list = []                  # this call's outputs' figures, as their hooks run
        self._copies.setdefault(name, (dim, []))[1].append(call)
        tracked = self.tracker is not None and self.tracker.on_top()
        with _compat.without_function_mode() if tracked else contextlib.nullcontext():
            for o in outs:
                if isinstance(o, Tensor) and o.requires_grad and o.dim() > dim \
                        and o.shape[dim] == self.n:
                    o.register_hook(lambda g, dim=dim: call.append(
                        _copies_used(g.detach().movedim(dim, 0).reshape(self.n, -1))))

    def check_shared(self, layers) -> None:
        """At the gate of ``layers``: refuse a module with a suspect call (``_check_shared``)
        whose copies were used as the rows of one sample or of several: over all its calls so
        far (of every backward) the first copy alone reached the loss (what a loop's ``out[0]``
        reads, a packed row read as one), or each of its several calls gave every copy the same
        gradient (the copies reduced: ``out.mean(0)``, a distribution broadcast over them),
        which samples that differ in any way never give."""
        if not self._copies:               # (most models: no input taken as shared)
            return
        found = []
        for name in dict.fromkeys(e.name for layer in layers for e in layer.entries):
            suspect = self._suspect.get(name)      # True, False (data first) or None
            if name in self._copies and (suspect or (suspect is False and not self._data)):
                dim, calls = self._copies[name]
                calls = [c for c in calls if c]     # the calls whose outputs got a gradient
                if calls:
                    found.append((name, dim, calls))
        if not found:
            return
        device = found[0][2][0][0].device
        figures = iter(torch.stack([f.to(device) for *_, calls in found for c in calls
                                    for f in c]).tolist())
        for name, dim, calls in found:
            stats = [[next(figures) for _ in c] for c in calls]     # per call, per output
            used = [any(f[i] for c in stats for f in c) for i in range(self.n)]
            first_alone = used[0] and sum(used) == 1    # (another sample alone: masking)
            alike = len(stats) > 1 and all(used) and all(f[-1] for c in stats for f in c)
            if first_alone or alike:
                raise ValueError(
                    f"ISOPO: module '{name}' got inputs of size 1 on the sample axis (dim {dim}), "
                    "taken as shared by all samples (each output has a copy per sample), but "
                    + ("the first copy alone reached the loss" if first_alone else
                       f"each of its {len(stats)} calls gave every copy the same gradient")
                    + ", so their rows were meant as one sample's or as several samples': "
                    + _PER_SAMPLE + "; for samples along another axis, sample_dim=. If the other "
                    "samples have no loss terms at all (masked out), leave them out of the "
                    "microbatch")

    def unbatched(self, x: Tensor, name: str) -> Tensor:
        """An unbatched input ``(C, *spatial)`` as a batch of one: the one sample's (with
        ``segments``, one row of packed samples, an id per location); with several samples and no
        segments its sample is unknown."""
        if self.n > 1 and self.segments is None:
            raise ValueError(
                f"ISOPO: module '{name}' got an unbatched input of shape {tuple(x.shape)} in a "
                f"microbatch of {self.n} samples: which sample it belongs to is unknown. Give it "
                "the batch axis: one entry per sample (the inputs of a call per sample stacked "
                "into one batch), or size 1 (x[None]) for an input shared by all samples, which "
                "each then uses through its own copy")
        return x[None]

    def batch_map(self, N: int, L: int, where: str, device, entry_major: bool = True,
                  locations: bool = False) -> SampleMap:
        """Rows of ``N`` batch entries of ``L`` positions each (``samples.batch_map``)."""
        key = ("batch", self.n, N, L, device, entry_major, self.sample_dim, locations)
        if key not in self._maps:
            self._maps[key] = batch_map(N, L, self.n, self.segments, where, device, entry_major,
                                        self.sample_dim, locations)
        return self._maps[key]

    def check_layout(self, shape, source, where: str) -> None:
        """Inputs without a sample axis (rows taken as samples) next to inputs with one: unless
        its rows descend from a layer's per-sample output, such an input may be a table shared by
        all samples (positions from ``torch.arange(T)``) whose rows would be credited to the wrong
        samples. Refused, naming both fixes (docs/layers.md, "Samples"). The history is searched
        only once both kinds have appeared (a policy whose inputs are all rows never needs it)."""
        if self.segments is not None or len(shape) == 0 or self.n == 1:
            return
        if len(shape) >= 2:
            self._explicit = self._explicit or f"{where} (rows {tuple(shape)})"
            pending, self._pending = self._pending, []
            for rows in pending:
                self._refuse_shared(*rows)
        elif source is not None:
            if self._explicit:
                self._refuse_shared(where, tuple(shape), source)
            else:
                self._pending.append((where, tuple(shape), source))

    def _refuse_shared(self, rows: str, shape: tuple, source) -> None:
        if descends_from_use(source):
            return
        shared, rows_fix, pos = (("torch.arange(T)[:, None]", "x[None]", "pos[:, None]")
                                 if self.sample_dim == 1 else
                                 ("torch.arange(T)[None]", "x[:, None]", "pos[None]"))
        raise ValueError(
            f"ISOPO: {rows} has no sample axis (rows {shape}), while {self._explicit} has one: "
            "its rows would be taken as samples. If it is shared by all samples (a table of "
            "positions built with torch.arange(T), say), give it a sample axis of size 1 on "
            f"dim {self.sample_dim} ({shared}) and it is used by every sample: the module's "
            "output then holds one copy per sample along that axis, to be broadcast against the "
            f"batch (x + wpe({pos})), not indexed or reduced along it; if its rows are samples, "
            f"say so with {rows_fix} (sample axis on dim {self.sample_dim}) or segments=")

    def sample_map(self, shape, where: str, device, source=None) -> SampleMap:
        """Rows → samples of an input (or output) of token shape ``shape``; ``source`` is the
        input tensor, whose history tells a per-sample input from a shared table."""
        if source is not None:
            self.check_layout(tuple(shape), source, where)
        key = (self.n, self.sample_dim, tuple(shape), device)
        if key not in self._maps:
            self._maps[key] = sample_map(shape, self.n, self.segments, self.sample_dim, where,
                                         device)
        return self._maps[key]


def _copies_used(G: Tensor) -> Tensor:
    """``[whether each copy (a row of G) has a gradient..., whether all rows are the same to
    rounding]``, kept on the device until the gate reads it. (Identical rows of a batch may
    round differently in a blocked product.)"""
    tol = min(64 * torch.finfo(G.dtype).eps, 1e-2) if G.is_floating_point() else 0.0
    same = (G - G[:1]).abs().amax() <= tol * G.abs().amax()
    return torch.cat([G.ne(0).any(1), same[None]])


_PER_SAMPLE = (
    "a forward per sample (a loop with a batch of one) cannot be told from a table shared by all "
    "samples, which every sample uses through a copy of its own (out[0] would credit each call "
    "to the first sample). Run the samples as one batch (padded, with a mask), or packed along "
    "one row with segments= (one id per token); for a table shared by all samples, expand it "
    "along the sample axis (t.expand(n, ...))")


def _check_arrived(record: LayerRecord, uses, arrived) -> None:
    """A gradient that reached the gate without a use to account for it came from a path ISOPO
    did not see: refuse it rather than write a gradient it cannot attribute to samples."""
    if all(g is None for g in arrived):
        return
    whole = [u for u in uses if isinstance(u, ExplicitUse) and u.slots is None]
    bad = len(whole) < len(uses)
    if not bad:
        flat = arrived[0].reshape(-1) if len(arrived) == 1 else torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1)
             for g, p in zip(arrived, record.params)])
        if whole:
            G = whole[0].G if len(whole) == 1 else sum(u.G for u in whole)
            # rounding scales with the terms summed, not with their sum: per-sample gradients
            # that cancel (a Gaussian's log_std at its fit) leave a small sum with their rounding
            sums = torch.stack([G.sum(0, dtype=torch.float64).sub_(flat.to(G.device)),
                                G.abs().sum(0, dtype=torch.float64),
                                flat.to(G.device, torch.float64)])
        else:                            # nothing to account for what arrived
            sums = flat.double().expand(3, -1)
        err, scale, size = torch.linalg.vector_norm(sums, dim=1).tolist()
        # the rounding of the coarsest dtype on the way (a float32 op on a float64 parameter);
        # each G_i may itself be what is left of larger terms (a gain in front of a norm, whose
        # gradient only the norm's eps keeps from zero), so a difference far below the gradient
        # that arrived (0.1·sqrt(eps) of it) is rounding too
        eps = max(record.eps, torch.finfo(next(g for g in arrived if g is not None).dtype).eps)
        tol = 2e-2 if record.autocast else 64 * eps
        bad = err > tol * scale + 1e-30 and err > 0.1 * math.sqrt(eps) * size
    if bad:
        raise RuntimeError(
            f"ISOPO: parameters {', '.join(repr(n) for n in record.layer.param_names)} reach "
            "the loss through ops where they never meet the samples (a result without a sample "
            "axis, such as a loss term that is not a sum of per-sample terms); ISOPO cannot "
            "attribute their gradient. Keep such terms out of the microbatch's backward" + (
                "; with segments=, a 2-D result (B, T) has a row per entry of its first axis, "
                "not per token: give per-token terms one row per token in the order of segments "
                "(flatten (B, T) to (B·T,), or keep a trailing axis: (B, T, 1))"
                if record.mb.segments is not None else ""))


def _finished(grads: list, params: list[Tensor], back: float) -> tuple:
    """The gradients in their parameters' dtypes, scaled back (``unit_advantages``), contiguous."""
    out = []
    for g, p in zip(grads, params):
        if g is not None:
            if back != 1.0:           # in the wider dtype: 16 bits overflow or lose small entries
                g = g.to(torch.promote_types(g.dtype, p.dtype)) * back
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if not g.is_contiguous():
                g = g.contiguous()
        out.append(g)
    return tuple(out)


def unit_advantages(A: Tensor, amax: float) -> tuple[Tensor, float]:
    """``(A / 2^e, 2^e)`` with ``|A / 2^e| < 1`` for very large or small advantages (exact;
    ordinary ones are kept; ``amax`` is ``max |A|``): ``c`` is linear in ``A``, and fp16
    activations can hold neither."""
    if amax == 0 or 2.0 ** -8 <= amax <= 2.0 ** 8:
        return A, 1.0
    e = math.frexp(amax)[1]
    half = -e // 2       # in two exact steps: 2^-e alone overflows for subnormal advantages
    return A * math.ldexp(1.0, half) * math.ldexp(1.0, -e - half), math.ldexp(1.0, e)


def check_advantages(advantages) -> tuple[Tensor, float]:
    """The advantages as float64 on the host, a copy of their own, with ``max |A|`` (read
    once)."""
    if isinstance(advantages, np.ndarray):      # a view with negative strides (np.flip)
        advantages = np.ascontiguousarray(advantages)
    try:
        A = torch.as_tensor(advantages)
        if A.is_floating_point() and not isinstance(advantages, (Tensor, np.ndarray)):
            A = torch.as_tensor(advantages, dtype=torch.float64)  # Python floats are float64
    except (TypeError, ValueError, RuntimeError):
        raise TypeError("advantages must be a 1-D tensor, array or sequence of real numbers, got "
                        f"{type(advantages).__name__}") from None
    if A.is_meta:
        raise ValueError("advantages must hold values: got a tensor on the meta device")
    if A.dim() != 1 or A.numel() == 0:
        raise ValueError(f"advantages must be a 1-D tensor with one value per sample, got shape "
                         f"{tuple(A.shape)}")
    if A.is_complex() or A.dtype == torch.bool:
        raise TypeError(f"advantages must be real numbers, got {A.dtype}")
    A = A.detach().to("cpu", torch.float64, copy=True)     # the caller may reuse its buffer
    amax = float(A.abs().max())
    if not math.isfinite(amax):
        raise ValueError("advantages must be finite; got NaN or inf at positions "
                         f"{torch.nonzero(~torch.isfinite(A)).flatten().tolist()}")
    return A, amax


def check_segments(segments, n: int) -> Tensor | None:
    if segments is None:
        return None
    if isinstance(segments, np.ndarray):
        segments = np.ascontiguousarray(segments)
    try:
        seg = torch.as_tensor(segments)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError("segments must be an integer tensor, array or sequence of sample ids, "
                        f"got {type(segments).__name__}") from None
    if seg.is_meta:
        raise ValueError("segments must hold values: got a tensor on the meta device")
    if seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor of sample ids, got {seg.dtype}")
    seg = seg.reshape(-1).to(torch.long, copy=True)
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= n):
        raise ValueError(f"segments must hold sample ids in [0, {n}) for {n} advantages, got "
                         f"values in [{int(seg.min())}, {int(seg.max())}]")
    return seg
