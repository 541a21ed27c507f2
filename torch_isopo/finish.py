"""One layer, one microbatch: the uses its backward collected → the ISOPO gradient.

``layer_gradients`` is what the layer's gate runs once every use of the layer has been
back-propagated (docs/math.md for the modes, docs/performance.md for the routes).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import Tensor

from . import factors
from .coefficients import Coefficients, fisher_coefficients, fisher_nu2, ntk_coefficients
from .factors import FactorUse
from .samples import SampleMap


@dataclass
class ExplicitUse:
    """One use of a layer whose per-sample gradients are formed explicitly (norms, generic
    modules): over the layer's parameters ``slots`` (all of them when None), flattened in order."""

    G: Tensor            # (n, D) per-sample gradients of the slots' flattened parameters
    pieces: Tensor | None       # (k, D) Fisher pieces, per token (norms) or per sample
    candidates: Tensor | None   # which pieces are non-zero (both only in fisher mode)
    slots: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Settings:
    """The optimizer's settings as one microbatch sees them."""

    mode: str
    damping: float
    fisher_probes: int | None
    route: str
    budget_bytes: int
    probe_seed: int       # fisher: each layer draws its probes from a generator seeded with
                          # this plus its index, so results do not depend on the finishing order


def _draw(candidates: list[Tensor], k: int | None, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Probe positions: per use, token indices and 0/1 weights.

    All tokens when ``k`` is None or not smaller than their number (tokens without output
    gradient have zero pieces). Otherwise a uniform random ``k``-subset of the candidates: the
    ``k`` smallest of i.i.d. uniform keys, with non-candidates keyed ``inf``. No device sync.
    """
    counts = [c.numel() for c in candidates]
    total = sum(counts)
    if k is None or total <= k:
        return [(torch.arange(c.numel(), device=c.device), c) for c in candidates]
    dev = candidates[0].device
    keys = torch.rand(total, generator=gen, dtype=torch.float64).to(dev)
    keys = keys.masked_fill(~torch.cat(candidates), torch.inf)
    chosen = keys.topk(k, largest=False).indices
    valid = torch.isfinite(keys[chosen])
    out, start = [], 0
    for c in counts:
        mine = (chosen >= start) & (chosen < start + c) & valid
        out.append(((chosen - start).clamp(0, c - 1), mine))
        start += c
    return out


@dataclass
class Prepared:
    """One layer's uses, sorted and summed, with its statistic: ``K`` (ntk) or ``ν²`` (fisher)."""

    params: list[Tensor]
    factor: list[FactorUse]
    explicit: "_Explicit | None"
    stat: Tensor | None = None
    kept: dict = None
    one_row: FactorUse | None = None    # a single use with one row per sample (fast path)

    @property
    def ref(self) -> Tensor:
        return self.factor[0].V if self.factor else self.explicit.G


def prepare(uses: list, params: list[Tensor], n: int, cfg: Settings,
            sample_pieces: bool = False, key: int = 0) -> Prepared:
    """Sort a layer's uses and compute its statistic. ``K``, the Fisher products and
    ``Σ c_i G_i`` add up over the layer's parameters: factor uses per weight and per bias slot
    (``factors``), explicit uses over the slots they cover. With ``sample_pieces`` the Fisher
    positions are the samples themselves (``g_i = G_i``), whose products are ``K``'s entries."""
    if len(uses) == 1 and isinstance(uses[0], FactorUse) and not uses[0].indexed and \
            uses[0].smap.trivial:
        p = Prepared(params, [uses[0]], None, one_row=uses[0])
        if cfg.mode != "reinforce":
            p.stat = _statistic(_one_row_kernel(uses[0]), cfg, True, key)
        return p
    factor = merge_uses([u for u in uses if isinstance(u, FactorUse)])
    explicit = _explicit_gradients([u for u in uses if isinstance(u, ExplicitUse)], params)
    p = Prepared(params, factor, explicit, kept={})
    if cfg.mode == "reinforce":
        return p
    dt = factors.work_dtype(p.ref)
    budget = max(1, cfg.budget_bytes * 8 // torch.finfo(dt).bits)
    if cfg.mode == "ntk" or sample_pieces:
        p.stat = _statistic(_kernel(p, n, dt, budget, cfg), cfg, sample_pieces, key)
    else:
        p.stat = fisher_nu2(*_fisher_products(factor, explicit, n, dt, budget, cfg, key))
    return p


def _statistic(K: Tensor, cfg: Settings, sample_pieces: bool, key: int) -> Tensor:
    """``K`` for ntk; ``ν²`` for fisher when every sample is one position."""
    return K if cfg.mode == "ntk" else fisher_nu2(*_sample_pieces(K, cfg, key))


def _generator(cfg: Settings, key: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.probe_seed + key)


def _one_row_kernel(u: FactorUse) -> Tensor:
    """``K = (UUᵀ) ⊙ (VVᵀ) + ΔΔᵀ`` when row i is sample i (``G_i = U_i ⊗ V_i``, bias ``Δ_i``)."""
    dt = factors.work_dtype(u.V)
    U, V, d = (x if x.dtype == dt else x.to(dt) for x in (u.U, u.V, u.delta))
    if u.weight is not None and u.bias is not None and u.U is u.delta:   # nn.Linear: U = Δ
        return (d @ d.T) * (V @ V.T + 1)
    K = (U @ U.T) * (V @ V.T) if u.weight is not None else 0
    return K + d @ d.T if u.bias is not None else K


def _kernel(p: Prepared, n: int, dt, budget: int, cfg: Settings) -> Tensor:
    K = torch.zeros(n, n, dtype=dt, device=p.ref.device)
    for s, group in _by_slot(p.factor, "weight").items():
        KW, p.kept[s] = _weight_kernel(group, n, _matrix(p.params[s]), dt, budget, cfg.route)
        K += KW
    for group in _by_slot(p.factor, "bias").values():
        Gb = factors.bias_gradients(group, n, dt)
        K += Gb @ Gb.T
    if p.explicit is not None:
        G = p.explicit.G.to(dt)
        K += G @ G.T
    return K


def coefficients(stats: list[Tensor], A: Tensor, cfg: Settings,
                 m_used: list[float | None]) -> Coefficients:
    """``c`` of several layers at once (a leading layer axis): their statistics stacked, one
    batched solve (ntk) or one batched normalisation (fisher) for all of them."""
    if cfg.mode == "reinforce":
        zero = A.new_zeros(len(stats))
        return Coefficients(A.expand(len(stats), -1), zero, zero, None)
    if len({(s.shape, s.device) for s in stats}) > 1:     # layers on several devices
        parts = [coefficients([s], A, cfg, [m]) for s, m in zip(stats, m_used)]
        return Coefficients(*(None if parts[0].spectrum is None and f == "spectrum" else
                              torch.cat([getattr(p, f).to(A.device) for p in parts])
                              for f in ("c", "m", "rho", "spectrum")))
    stat = (stats[0][None] if len(stats) == 1 else torch.stack(stats)).to(torch.float64)
    used = None if all(m is None for m in m_used) else [math.nan if m is None else m
                                                         for m in m_used]
    make = ntk_coefficients if cfg.mode == "ntk" else fisher_coefficients
    return make(stat, A.to(stat), cfg.damping, used)


def contract(p: Prepared, c: Tensor) -> list[Tensor | None]:
    """The layer's gradient per parameter slot (``None`` where it has none): ``Σ_i c_i G_i``."""
    if p.one_row is None:
        return _contract(p.factor, p.explicit, p.kept, p.params, c.to(p.ref.device), c.numel())
    u = p.one_row
    c = c.to(device=u.V.device, dtype=u.V.dtype)[:, None]
    grads: list[Tensor | None] = [None] * len(p.params)
    scaled = u.U * c if u.weight is not None and u.U.shape[1] <= u.V.shape[1] else None
    if u.weight is not None:
        W = scaled.T @ u.V if scaled is not None else u.U.T @ (u.V * c)
        grads[u.weight] = W.view(p.params[u.weight].shape)
    if u.bias is not None:
        grads[u.bias] = (scaled if u.delta is u.U and scaled is not None else u.delta * c).sum(0)
    return grads


def _contract(factor, explicit, kept, params, c, n) -> list[Tensor | None]:
    grads: list[Tensor | None] = [None] * len(params)
    for s, group in _by_slot(factor, "weight").items():
        P, Q = _matrix(params[s])
        rows, G = kept.get(s) or (None, None)
        if G is None:
            W = factors.contract_weight(group, c, P, Q)
        else:
            flat = (c.to(G.dtype) @ G.reshape(n, -1)).view(-1, Q)
            W = flat if rows is None else flat.new_zeros(P, Q).index_copy_(0, rows, flat)
        grads[s] = W.view(params[s].shape)
    for b, group in _by_slot(factor, "bias").items():
        grads[b] = factors.contract_bias(group, c)
    if explicit is not None:
        flat = c.to(explicit.G) @ explicit.G
        for s, g in zip(explicit.slots, flat.split(explicit.sizes)):
            grads[s] = g.view_as(params[s])
    return grads


def _matrix(p: Tensor) -> tuple[int, int]:
    """A weight as the matrix its factors address: rows × everything else."""
    return p.shape[0], p.numel() // max(p.shape[0], 1)


def _by_slot(uses: list[FactorUse], kind: str) -> dict[int, list[FactorUse]]:
    out: dict[int, list[FactorUse]] = {}
    for u in uses:
        s = getattr(u, kind)
        if s is not None:
            out.setdefault(s, []).append(u)
    return out


def merge_uses(uses: list[FactorUse]) -> list[FactorUse]:
    """Uses of the same parameters in the same layout (a weight applied at every step of a loop)
    as one use with their rows concatenated: one Gram or batched product instead of many."""
    groups: dict[tuple, list[FactorUse]] = {}
    for u in uses:
        key = (u.weight, u.bias, u.indexed, u.U.shape[1:], u.V.shape[1:], u.delta.shape[1:], u.smap.inner,
               str(u.V.device))
        groups.setdefault(key, []).append(u)
    if len(groups) == len(uses):
        return uses
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        first = group[0]
        U, V = torch.cat([u.U for u in group]), torch.cat([u.V for u in group])
        smap = SampleMap(torch.cat([u.smap.ids for u in group]), first.smap.n, first.smap.inner,
                         None, 0)
        delta = torch.cat([u.delta for u in group])
        merged.append(FactorUse(U, V, delta, smap, first.weight, first.bias))
    return merged


@dataclass
class _Explicit:
    """A layer's explicit uses, their per-sample gradients summed over the union of their slots."""

    slots: tuple[int, ...]
    G: Tensor
    uses: list[ExplicitUse]
    sizes: list[int]          # numel of each slot

    def widen(self, X: Tensor, slots: tuple[int, ...]) -> Tensor:
        """Columns of ``X`` over ``slots`` placed among this layer's columns (zeros elsewhere)."""
        if slots == self.slots:
            return X
        cols = dict(zip(slots, X.split([self.sizes[self.slots.index(s)] for s in slots], 1)))
        return torch.cat([cols[s] if s in cols else X.new_zeros(X.shape[0], k)
                          for s, k in zip(self.slots, self.sizes)], 1)


def _explicit_gradients(uses: list[ExplicitUse], params) -> _Explicit | None:
    if not uses:
        return None
    everything = tuple(range(len(params)))
    for u in uses:
        u.slots = u.slots or everything
    union = tuple(sorted(set().union(*(u.slots for u in uses))))
    ex = _Explicit(union, uses[0].G, uses, [params[s].numel() for s in union])
    ex.G = sum(ex.widen(u.G, u.slots) for u in uses)
    return ex


def _fisher_products(factor, explicit, n, dt, budget, cfg, key):
    """``⟨g_t, G_i⟩`` (probes × n) and ``‖g_t‖²`` over the layer's probe positions: the tokens of
    its factor uses, then the pieces of its explicit uses, drawn together."""
    euses = [] if explicit is None else explicit.uses
    candidates = factors.fisher_candidates(factor) + [u.candidates for u in euses]
    probes = _draw(candidates, cfg.fisher_probes, _generator(cfg, key))
    dots, norms = [], []
    if factor:
        d, q = factors.fisher_products(factor, probes[:len(factor)], n, dt, budget)
        dots.append(d)
        norms.append(q)
    if euses:
        pieces = torch.cat([explicit.widen(u.pieces[idx] * w[:, None].to(u.pieces.dtype), u.slots)
                            for u, (idx, w) in zip(euses, probes[len(factor):])])
        dots.append(pieces @ explicit.G.T)
        norms.append((pieces ** 2).sum(1))
    if len(dots) == 1:
        return dots[0], norms[0]
    return torch.cat([d.to(dt) for d in dots]), torch.cat([q.to(dt) for q in norms])


def _sample_pieces(K: Tensor, cfg: Settings, key: int):
    """Fisher products when each sample is one position: ``⟨G_t, G_i⟩ = K_ti`` for probe samples
    ``t`` drawn among those with a non-zero gradient."""
    (idx, w), = _draw([torch.diagonal(K) > 0], cfg.fisher_probes, _generator(cfg, key))
    w = w.to(K.dtype)
    return K[idx] * w[:, None], torch.diagonal(K)[idx] * w


def _weight_kernel(uses, n, shape, dt, budget, route):
    """``K`` of one weight by the cheaper exact route, and ``(rows, G)`` when ``G`` fits."""
    P, Q = shape
    rows = factors.weight_rows(uses, P)
    R = P if rows is None else rows.numel()
    gram_cost = sum(u.smap.rows * w.smap.rows * ((P if not (u.indexed or w.indexed) else 1) + Q)
                    for u in uses for w in uses)
    mat_cost = sum(u.smap.rows * (1 if u.indexed else P) * Q for u in uses) + n * n * R * Q
    if route == "gram" or (route == "auto" and gram_cost < mat_cost):
        return factors.gram_kernel(uses, n, dt, budget), None
    chunk = max(1, budget // max(1, n * Q))
    K = torch.zeros(n, n, dtype=dt, device=uses[0].V.device)
    kept = None
    for sl, G in factors.materialised_gradients(uses, n, P, Q, rows, chunk):
        Gf = G.reshape(n, -1).to(dt)
        K += Gf @ Gf.T
        if sl.start == 0 and sl.stop == R:
            kept = (rows, G)
    return K, kept
