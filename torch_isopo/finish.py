"""One layer, one microbatch: the uses its backward collected → the ISOPO gradient.

``layer_gradients`` is what the layer's gate runs once every use of the layer has been
back-propagated (docs/math.md for the modes, docs/performance.md for the routes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import factors
from .coefficients import Coefficients, fisher_coefficients, fisher_nu2, ntk_coefficients
from .factors import FactorUse


@dataclass
class ExplicitUse:
    """One use of a layer whose gradients are formed explicitly (norms, generic modules)."""

    G: Tensor            # (n, D) per-sample gradients of the layer's flattened parameters
    pieces: Tensor | None       # (k, D) Fisher pieces, per token (norms) or per sample
    candidates: Tensor | None   # which pieces are non-zero (both only in fisher mode)


@dataclass(frozen=True)
class Settings:
    """The optimizer's settings as one microbatch sees them."""

    mode: str
    damping: float
    fisher_probes: int | None
    route: str
    budget_bytes: int
    generator: torch.Generator


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


def _coefficients(cfg: Settings, A: Tensor, m_used: float | None, kernel, fisher) -> Coefficients:
    if cfg.mode == "ntk":
        return ntk_coefficients(kernel(), A, cfg.damping, m_used)
    return fisher_coefficients(fisher_nu2(*fisher()), A, cfg.damping, m_used)


def _reinforce(A: Tensor) -> Coefficients:
    zero = A.new_zeros(())
    return Coefficients(A, zero, zero, A)


def finish_factor(uses: list[FactorUse], shape: torch.Size | None, A: Tensor, cfg: Settings,
                  m_used: float | None):
    """Weight and bias gradients of a linear-like layer; ``shape`` is the weight's (P, Q)."""
    n = A.numel()
    ref = uses[0].V
    dt = factors.work_dtype(ref)
    budget = max(1, cfg.budget_bytes * 8 // torch.finfo(dt).bits)
    P, Q = shape if shape is not None else (0, 0)
    kept = None
    if cfg.mode == "reinforce":
        coef = _reinforce(A)
    else:
        def kernel():
            nonlocal kept
            K = torch.zeros(n, n, dtype=dt, device=ref.device)
            if shape is not None and any(u.weight for u in uses):
                KW, kept = _weight_kernel(uses, n, P, Q, dt, budget, cfg.route)
                K += KW
            Gb = factors.bias_gradients(uses, n, dt)
            if Gb is not None:
                K += Gb @ Gb.T
            return K

        def fisher():
            probes = _draw(factors.fisher_candidates(uses), cfg.fisher_probes, cfg.generator)
            return factors.fisher_products(uses, probes, n, dt, budget)

        coef = _coefficients(cfg, A, m_used, kernel, fisher)
    c = coef.c.to(ref.device)
    if kept is not None:
        rows, G = kept
        flat = (c.to(G.dtype) @ G.reshape(n, -1)).view(-1, Q)
        W = flat if rows is None else flat.new_zeros(P, Q).index_copy_(0, rows, flat)
        _, B = factors.contract([_bias_only(u) for u in uses], c, P, Q)
    else:
        W, B = factors.contract(uses, c, P, Q)
    return W, B, coef


def _bias_only(u: FactorUse) -> FactorUse:
    return FactorUse(u.U, u.V, u.delta, u.smap, False, u.bias)


def _weight_kernel(uses, n, P, Q, dt, budget, route):
    """``K`` of the weight by the cheaper exact route, keeping ``G`` when it fits."""
    rows = factors.weight_rows(uses, P)
    R = P if rows is None else rows.numel()
    wuses = [u for u in uses if u.weight]
    gram_cost = sum(u.smap.rows * w.smap.rows * ((P if not (u.indexed or w.indexed) else 1) + Q)
                    for u in wuses for w in wuses)
    mat_cost = sum(u.smap.rows * (1 if u.indexed else P) * Q for u in wuses) + n * n * R * Q
    if route == "gram" or (route == "auto" and gram_cost < mat_cost):
        return factors.gram_kernel(wuses, n, dt, budget), None
    chunk = max(1, budget // max(1, n * Q))
    K = torch.zeros(n, n, dtype=dt, device=uses[0].V.device)
    kept = None
    for sl, G in factors.materialised_gradients(wuses, n, P, Q, rows, chunk):
        Gf = G.reshape(n, -1).to(dt)
        K += Gf @ Gf.T
        if sl.start == 0 and sl.stop == R:
            kept = (rows, G)
    return K, kept


def finish_explicit(uses: list[ExplicitUse], A: Tensor, cfg: Settings, m_used: float | None):
    """Flattened gradient ``Σ c_i G_i`` of a layer with explicit per-sample gradients."""
    G = sum(u.G for u in uses)
    if cfg.mode == "reinforce":
        coef = _reinforce(A)
    else:
        def fisher():
            probes = _draw([u.candidates for u in uses], cfg.fisher_probes, cfg.generator)
            pieces = torch.cat([u.pieces[idx] * w[:, None].to(u.pieces.dtype)
                                for u, (idx, w) in zip(uses, probes)])
            return pieces @ G.T, (pieces ** 2).sum(1)

        coef = _coefficients(cfg, A, m_used, lambda: G @ G.T, fisher)
    return coef.c.to(G) @ G, coef


def layer_gradients(layer, uses: list, params: list[Tensor], A: Tensor, cfg: Settings,
                    m_used: float | None) -> tuple[list[Tensor | None], Coefficients]:
    """The layer's ISOPO gradient per parameter (``None`` where it has none), and its ``c``."""
    if not layer.factor:
        flat, coef = finish_explicit(uses, A, cfg, m_used)
        sizes = [p.numel() for p in params]
        return [g.view_as(p) for g, p in zip(flat.split(sizes), params)], coef
    weight = next((e.weight for e in layer.entries if e.weight is not None), None)
    shape = params[weight].shape if weight is not None else None
    W, B, coef = finish_factor(uses, shape, A, cfg, m_used)
    grads: list[Tensor | None] = [None] * len(params)
    if weight is not None:
        grads[weight] = W
    for e in layer.entries:
        if e.bias is not None:
            grads[e.bias] = B
    return grads, coef
