"""The ISOPO transforms: per-layer statistics → new per-sample coefficients ``c`` (SPEC §1).

Pure functions on small float64 tensors; they know nothing about layers or autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Coefficients:
    """``c`` for one layer and microbatch, with the figures worth logging."""

    c: Tensor
    m: float          # the microbatch's own statistic (tr K / n, or mean ν²)
    rho: float        # damping · m_used (ntk) or damping · m_used (fisher)
    cond: float       # condition number of K (ntk) or max ν / min ν over samples (fisher)


def _undefined(A: Tensor) -> Coefficients:
    """The layer's per-sample gradients overflowed or hold NaN: ``c`` is NaN, so the written
    gradient is NaN and a loss scaler skips the step, as it would for autograd's own overflow."""
    nan = math.nan
    return Coefficients(torch.full_like(A, nan), nan, nan, nan)


def ntk_coefficients(K: Tensor, A: Tensor, damping: float, m_used: float | None = None) -> Coefficients:
    """``c = ρ (K + ρI)⁻¹ A`` with ``ρ = damping · m`` and ``m = tr(K)/n`` (or ``m_used``).

    ``K`` is symmetric PSD; it is diagonalised once (n×n, float64), which gives the solve and the
    condition number. ``c`` is invariant to the scale of ``K``; a zero ``K`` (the layer got no
    gradient) leaves ``c = A``, whose contraction with zero gradients is zero anyway.
    """
    if not torch.isfinite(K).all():
        return _undefined(A)
    n = A.numel()
    m = float(torch.diagonal(K).sum()) / n
    rho = damping * (m if m_used is None else m_used)
    evals, evecs = torch.linalg.eigh(K)
    evals = evals.clamp_min(0.0)
    top, low = float(evals[-1]), float(evals[0])
    cond = top / low if low > 0 else (math.inf if top > 0 else 1.0)
    if rho <= 0.0:
        return Coefficients(A.clone(), m, rho, cond)
    c = rho * (evecs @ ((evecs.T @ A) / (evals + rho)))
    return Coefficients(c, m, rho, cond)


def fisher_coefficients(nu2: Tensor, A: Tensor, damping: float, m_used: float | None = None) -> Coefficients:
    """``c_i = A_i / sqrt(ν_i² + damping · m)`` with ``m`` the mean of ``ν²`` (or ``m_used``).

    A sample whose denominator is zero (ν_i = 0 and no damping) contributes nothing: ``c_i = 0``.
    """
    if not torch.isfinite(nu2).all():
        return _undefined(A)
    m = float(nu2.mean())
    rho = damping * (m if m_used is None else m_used)
    denom = torch.sqrt(nu2 + rho)
    safe = denom > 0
    c = torch.where(safe, A / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(A))
    nz = nu2[nu2 > 0]
    cond = float(nz.max() / nz.min()) ** 0.5 if nz.numel() else 1.0
    return Coefficients(c, m, rho, cond)


def fisher_nu2(dots: Tensor, sq_norms: Tensor) -> Tensor:
    """``ν_i² = Σ_t ⟨g_t, G_i⟩² / Σ_t ‖g_t‖²`` from the probe×sample inner products ``dots``."""
    total = sq_norms.sum()
    if not (torch.isfinite(total) and torch.isfinite(dots).all()):
        return torch.full((dots.shape[1],), math.nan, dtype=dots.dtype, device=dots.device)
    if total <= 0:
        return torch.zeros(dots.shape[1], dtype=dots.dtype, device=dots.device)
    return (dots ** 2).sum(0) / total
