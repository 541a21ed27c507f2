"""Fisher probe positions: which positions a layer's ``fisher`` estimate uses, and the products
``⟨g_t, G_i⟩``, ``‖g_t‖²`` at them (docs/math.md, fisher)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import factors
from .settings import Settings


def generator(cfg: Settings, key: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.probe_seed + key)


def draw(candidates: list[Tensor], k: int | None, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
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


def fisher_products(factor, explicit, n, dt, budget, cfg, key):
    """``⟨g_t, G_i⟩`` (probes × n) and ``‖g_t‖²`` over the layer's probe positions: the tokens of
    its factor uses, then the pieces of its explicit uses, drawn together."""
    euses = [] if explicit is None else explicit.uses
    candidates = factors.fisher_candidates(factor) + [u.candidates for u in euses]
    probes = draw(candidates, cfg.fisher_probes, generator(cfg, key))
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


def sample_pieces(K: Tensor, cfg: Settings, key: int):
    """Fisher products when each sample is one position: ``⟨G_t, G_i⟩ = K_ti`` for probe samples
    ``t`` drawn among those with a non-zero gradient."""
    (idx, w), = draw([torch.diagonal(K) > 0], cfg.fisher_probes, generator(cfg, key))
    w = w.to(K.dtype)
    return K[idx] * w[:, None], torch.diagonal(K)[idx] * w
