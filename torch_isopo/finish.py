"""One layer, one microbatch: the uses its backward collected → the ISOPO gradient.

``layer_gradients`` is what the layer's gate runs once every use of the layer has been
back-propagated (docs/math.md for the modes, docs/performance.md for the routes).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import Tensor

from . import factors, probes
from .coefficients import (Coefficients, fisher_coefficients, fisher_nu2, ntk_coefficients,
                           ntk_low_rank)
from .factors import FactorUse
from .samples import SampleMap
from .settings import Settings


def _exact(G: Tensor) -> bool:
    """Whether explicit per-sample gradients are small enough (2^18 entries) to take ``K`` and
    ``Σ c_i G_i`` in float64: with little damping ``c`` is nearly orthogonal to the span of the
    ``G_i`` and the sum cancels most of its terms (float32 kept ~1e-2 of a ``log_std``'s)."""
    return G.numel() <= 1 << 18


LOW_RANK_N = 128   # from here on a layer of D < n/2 parameters is solved in D dimensions: below,
                   # one more n × n matrix in the batched solve costs less than Woodbury's own ops


@dataclass
class ExplicitUse:
    """One use of a layer whose per-sample gradients are formed explicitly (norms, generic
    modules): over the layer's parameters ``slots`` (all of them when None), flattened in order."""

    G: Tensor            # (n, D) per-sample gradients of the slots' flattened parameters
    pieces: Tensor | None       # (k, D) Fisher pieces, per token (norms) or per sample
    candidates: Tensor | None   # which pieces are non-zero (both only in fisher mode)
    slots: tuple[int, ...] | None = None


@dataclass
class Prepared:
    """One layer's uses, sorted and summed, with its statistic: ``K`` (ntk) or ``ν²`` (fisher)."""

    params: list[Tensor]
    factor: list[FactorUse]
    explicit: "_Explicit | None"
    stat: Tensor | None = None
    kept: dict = None
    single: FactorUse | None = None     # a single use with rows (n, R) in order (fast path)
    low_rank: Tensor | None = None      # ntk: G (n, D) with D < n/2, solved in D dimensions
    single_G: tuple | None = None       # when formed, its per-sample gradients: the weight's
                                        # in chunks of rows (a list, empty when frozen), the bias's

    @property
    def ref(self) -> Tensor:
        return self.factor[0].V if self.factor else self.explicit.G


def prepare(uses: list, params: list[Tensor], n: int, cfg: Settings,
            sample_pieces: bool = False, key: int = 0) -> Prepared:
    """Sort a layer's uses and compute its statistic. ``K``, the Fisher products and
    ``Σ c_i G_i`` add up over the layer's parameters: factor uses per weight and per bias slot
    (``factors``), explicit uses over the slots they cover. With ``sample_pieces`` the Fisher
    positions are the samples themselves (``g_i = G_i``), whose products are ``K``'s entries."""
    if len(uses) == 1 and _in_order(uses[0], n, cfg, sample_pieces):
        p = Prepared(params, [uses[0]], None, single=uses[0])
        if cfg.mode != "reinforce":
            p.stat = _statistic(_single_kernel(p, n, cfg), cfg, True, key)
        return p
    factor = merge_uses([u for u in uses if isinstance(u, FactorUse)])
    explicit = _explicit_gradients([u for u in uses if isinstance(u, ExplicitUse)], params)
    p = Prepared(params, factor, explicit, kept={})
    if cfg.mode == "reinforce":
        return p
    dt = factors.work_dtype(p.ref)
    if not factor and _exact(explicit.G):
        dt = torch.float64
    budget = max(1, cfg.budget_bytes * 8 // torch.finfo(dt).bits)
    if cfg.mode == "ntk" and not factor and 2 * explicit.G.shape[1] < n and n >= LOW_RANK_N:
        p.low_rank = explicit.G          # K = GGᵀ is never formed
    elif cfg.mode == "ntk" or sample_pieces:
        p.stat = _statistic(_kernel(p, n, dt, budget, cfg), cfg, sample_pieces, key)
    else:
        p.stat = fisher_nu2(*probes.fisher_products(factor, explicit, n, dt, budget, cfg, key))
    return p


def _statistic(K: Tensor, cfg: Settings, sample_pieces: bool, key: int) -> Tensor:
    """``K`` for ntk; ``ν²`` for fisher when every sample is one position."""
    return K if cfg.mode == "ntk" else fisher_nu2(*probes.sample_pieces(K, cfg, key))


def _in_order(u, n: int, cfg: Settings, sample_pieces: bool) -> bool:
    """A use whose rows are ``(n, R)`` in memory order (one per sample, or a padded batch), on
    which ``K`` and the contraction take a few products within the memory budget; for ``fisher``
    only when each sample is one position (one row per sample, or positions that are samples)."""
    if not (isinstance(u, FactorUse) and not u.indexed and u.smap.layout == "first"
            and (cfg.mode != "fisher" or sample_pieces or u.smap.trivial)):
        return False
    N, P, Q = u.U.shape[0], u.U.shape[1], u.V.shape[1]
    return min(N * N, n * (P * Q + P)) * 8 <= cfg.budget_bytes


def _single_kernel(p: Prepared, n: int, cfg: Settings) -> Tensor:
    """``K`` of a single use with rows ``(n, R)``: by the token Gram ``(UUᵀ) ⊙ (VVᵀ) + ΔΔᵀ``
    summed over each sample's rows, or by forming ``G_i`` (kept for the contraction), whichever
    costs less (the same cost model as ``_weight_kernel``)."""
    u = p.single
    dt = factors.work_dtype(u.V)
    U, V, d = u.U, u.V, u.delta
    N, P, Q = U.shape[0], U.shape[1], V.shape[1]
    R = N // n
    gram = N * N * (P + Q) < N * P * Q + n * n * P * Q
    fits = {"gram": N * N * 8 <= cfg.budget_bytes, "form": n * (P * Q + P) * 8 <= cfg.budget_bytes}
    choice = cfg.route if cfg.route != "auto" else ("gram" if gram else "materialise")
    dots = lambda X: factors.side_dots(X, X, dt)  # noqa: E731
    if R == 1 or (choice == "gram" and fits["gram"]) or not fits["form"]:
        if u.weight is not None and u.bias is not None and u.U is u.delta:   # nn.Linear: U = Δ
            M = dots(V).add_(1).mul_(dots(d))
        else:
            M = dots(U) * dots(V) if u.weight is not None else 0
            M = M + dots(d) if u.bias is not None else M
        return M if R == 1 else M.view(n, R, n, R).sum((1, 3))
    # G_i in the activations' dtype, as autograd forms the weight gradient (a 16-bit G by the
    # matrix units), in chunks of weight rows kept for the contraction; K in the work dtype
    G = []
    if u.weight is not None:
        Us, Vs, step = U.view(n, R, P), V.view(n, R, Q), _row_step(n, P, Q, U)
        G = [torch.bmm(Us[:, :, s:s + step].transpose(1, 2), Vs).view(n, -1)
             for s in range(0, P, step)]
    Gb = d.to(dt).view(n, R, -1).sum(1) if u.bias is not None else None
    p.single_G = (G, Gb)
    K = Gb @ Gb.T if Gb is not None else None
    for g in G:
        K = dots(g) if K is None else K.add_(dots(g))
    return K


HOST_CHUNK = 16 << 20   # bytes of G per chunk on the host: glibc's malloc reuses freed blocks
                        # up to 32 MiB; a larger one is mapped afresh and page-faulted every step


def _row_step(n: int, rows: int, Q: int, ref: Tensor) -> int:
    """Weight rows per chunk of ``G`` (of ``rows`` active rows): all of them on a GPU (its
    allocator reuses blocks of any size), else chunks of at most ``HOST_CHUNK`` bytes (of one row
    at least), as even as that allows."""
    if ref.device.type != "cpu":
        return rows
    chunks = -(-n * rows * Q * ref.element_size() // HOST_CHUNK)
    return -(-rows // max(chunks, 1))


def _kernel(p: Prepared, n: int, dt, budget: int, cfg: Settings) -> Tensor:
    if not p.factor:                        # explicit gradients alone (kept in dt to contract)
        G = p.explicit.G = p.explicit.G.to(dt)
        return G @ G.T
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


def coefficients(stats: list[Tensor], A: Tensor, cfg: Settings, m_used: list[float | None],
                 low_rank: list[Tensor | None] | None = None) -> "Coefficients | _Gathered":
    """``c`` of several layers at once (a leading layer axis): their statistics stacked, one
    batched solve (ntk) or one batched normalisation (fisher) for all of them. A layer with
    fewer parameters than half the samples (``low_rank[j]``, its ``G``) is solved in its own
    dimensions instead (``ntk_low_rank``). Either way ``.c`` holds every layer's ``c`` and
    ``.layer(j)`` layer j's figures."""
    if cfg.mode == "reinforce":
        zero = A.new_zeros(len(stats))
        return Coefficients(A.expand(len(stats), -1), zero, zero, None)
    low = [j for j, G in enumerate(low_rank or []) if G is not None]
    if low:
        rest = [j for j in range(len(stats)) if j not in low]
        parts = {j: ntk_low_rank(low_rank[j], A, cfg.damping, m_used[j]) for j in low}
        if rest:
            batch = coefficients([stats[j] for j in rest], A, cfg, [m_used[j] for j in rest])
            parts.update({j: batch.layer(k) for k, j in enumerate(rest)})
        return _Gathered([parts[j] for j in range(len(stats))], A.device)
    if len({(s.shape, s.device) for s in stats}) > 1:     # layers on several devices
        return _Gathered([coefficients([s], A, cfg, [m]).layer(0)
                          for s, m in zip(stats, m_used)], A.device)
    stat = stats[0][None] if len(stats) == 1 else torch.stack(stats)
    used = None if all(m is None for m in m_used) else [math.nan if m is None else m
                                                         for m in m_used]
    make = ntk_coefficients if cfg.mode == "ntk" else fisher_coefficients
    return make(stat, A.to(stat.device), cfg.damping, used)   # A stays float64


class _Gathered:
    """Layers' coefficients computed apart: ``c`` as one batch on ``device``, each layer's
    figures as they came."""

    def __init__(self, parts: list, device):
        self.parts = parts
        self.c = torch.stack([p.c.to(device) for p in parts])

    def layer(self, i: int):
        return self.parts[i]


def contract(p: Prepared, c: Tensor, precise: bool = True) -> list[Tensor | None]:
    """The layer's gradient per parameter slot (``None`` where it has none): ``Σ_i c_i G_i``;
    16-bit factors scaled in float32 when ``precise`` (``factors.scale_dtype``)."""
    if p.single is None:
        return _contract(p.factor, p.explicit, p.kept, p.params, c.to(p.ref.device), precise)
    u = p.single
    grads: list[Tensor | None] = [None] * len(p.params)
    if p.single_G is not None:
        G, Gb = p.single_G
        c = c.to(u.V.device)
        if G:
            W = _chunks_contracted(c, G, precise)
            grads[u.weight] = W.view(p.params[u.weight].shape).to(u.V.dtype)
        if Gb is not None:
            grads[u.bias] = (c.to(Gb.dtype) @ Gb).to(u.V.dtype)
        return grads
    R = u.U.shape[0] // c.numel()
    dt = factors.scale_dtype(u.V, precise)
    if c.dtype != dt or c.device != u.V.device:
        c = c.to(device=u.V.device, dtype=dt)
    c = (c if R == 1 else c.repeat_interleave(R))[:, None]
    scaled = u.U * c if u.weight is not None and u.U.shape[1] <= u.V.shape[1] else None
    if u.weight is not None:
        if scaled is not None:
            W = factors.mm_scaled(scaled.T, u.V)
        else:
            W = factors.mm_scaled(u.U.T, u.V * c)
        shape = p.params[u.weight].shape
        grads[u.weight] = W if W.shape == shape else W.view(shape)
    if u.bias is not None:
        grads[u.bias] = (scaled if u.delta is u.U and scaled is not None else u.delta * c).sum(0)
    return grads


def _chunks_contracted(c: Tensor, G: list[Tensor], precise: bool) -> Tensor:
    """``Σ_i c_i G_i`` of per-sample gradients kept in chunks ``(n, ·)`` of weight rows, flat."""
    c = c.to(factors.scale_dtype(G[0], precise))[None]
    parts = [factors.mm_scaled(c, g)[0] for g in G]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _contract(factor, explicit, kept, params, c, precise) -> list[Tensor | None]:
    grads: list[Tensor | None] = [None] * len(params)
    for s, group in _by_slot(factor, "weight").items():
        P, Q = _matrix(params[s])
        rows, G = kept.get(s) or (None, None)
        if G is None:
            W = factors.contract_weight(group, c, P, Q, precise)
        else:
            flat = _chunks_contracted(c, G, precise).view(-1, Q)
            W = flat if rows is None else flat.new_zeros(P, Q).index_copy_(0, rows, flat)
        grads[s] = W.view(params[s].shape)
    for b, group in _by_slot(factor, "bias").items():
        grads[b] = factors.contract_bias(group, c, precise)
    if explicit is not None:
        G = explicit.G
        flat = (c.to(G.device, torch.float64) @ G.double()).to(explicit.dtype) if _exact(G) \
            else c.to(G) @ G
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
        maps = [u.smap for u in group]
        steps = all(m.inner == 1 and (m.layout == "second" or m.trivial) for m in maps)
        smap = SampleMap(torch.cat([m.ids for m in maps]), first.smap.n, first.smap.inner,
                         "second" if steps else None, sum(m.T for m in maps) if steps else 0)
        delta = U if all(u.delta is u.U for u in group) else V if all(
            u.delta is u.V for u in group) else torch.cat([u.delta for u in group])
        merged.append(FactorUse(U, V, delta, smap, first.weight, first.bias))
    return merged


@dataclass
class _Explicit:
    """A layer's explicit uses, their per-sample gradients summed over the union of their slots."""

    slots: tuple[int, ...]
    G: Tensor                 # (kept in the work dtype once K is formed from it)
    uses: list[ExplicitUse]
    sizes: list[int]          # numel of each slot

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the uses' per-sample gradients, which the layer's gradient comes in."""
        return self.uses[0].G.dtype

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
    if len(uses) > 1 or uses[0].slots != union:
        ex.G = sum(ex.widen(u.G, u.slots) for u in uses)
    return ex


def _weight_kernel(uses, n, shape, dt, budget, route):
    """``K`` of one weight by the cheaper exact route, and ``(rows, [G chunks])`` when ``G``
    fits the budget (kept for the contraction)."""
    P, Q = shape
    rows = factors.weight_rows(uses, P)
    R = P if rows is None else rows.numel()
    gram_cost = sum(u.smap.rows * w.smap.rows * ((P if not (u.indexed or w.indexed) else 1) + Q)
                    for u in uses for w in uses)
    mat_cost = sum(u.smap.rows * (1 if u.indexed else P) * Q for u in uses) + n * n * R * Q
    if route == "gram" or (route == "auto" and gram_cost < mat_cost):
        return factors.gram_kernel(uses, n, dt, budget), None
    ref = uses[0].V
    keep = n * R * Q <= budget             # G fits the budget: kept, in chunks, to contract
    chunk = _row_step(n, R, Q, ref)
    if not keep:
        chunk = min(chunk, max(1, budget // max(1, n * Q)))
    K = torch.zeros(n, n, dtype=dt, device=ref.device)
    kept = []
    for _, G in factors.materialised_gradients(uses, n, P, Q, rows, chunk):
        Gf = G.reshape(n, -1).to(dt)
        K += Gf @ Gf.T
        if keep:
            kept.append(G.reshape(n, -1))
    return K, (rows, kept) if keep else None
