"""The K/ρ/c math: per-layer statistics → new per-sample coefficients ``c`` (docs/math.md).

Pure functions on small tensors, solved and normalised in float64 (``K`` may come in the
gradients' float32); they know nothing about layers or autograd. They run on
the gradients' device and never wait for it (no host sync): the figures for logging stay tensors
until ``step()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Coefficients:
    """``c`` for one layer and microbatch, with the figures worth logging (0-d tensors); or, with
    a leading layer axis, for several layers at once (``split`` them)."""

    c: Tensor
    m: Tensor          # the microbatch's own statistic (tr K / n, or mean ν²)
    rho: Tensor        # damping · m_used
    spectrum: Tensor | list[Tensor]   # K (ntk; G with K = GGᵀ for ``ntk_low_rank``) or ν²
                                      # (fisher), stacked or one per layer: its condition number
                                      # is computed when diagnostics are read

    def layer(self, i: int) -> "Layer":
        return Layer(self, i)


class Layer:
    """Layer ``i`` of coefficients computed in a batch, indexed only when read (for logging)."""

    def __init__(self, batch: Coefficients, i: int):
        self.batch, self.i = batch, i

    c = property(lambda self: self.batch.c[self.i])
    m = property(lambda self: self.batch.m[self.i])
    rho = property(lambda self: self.batch.rho[self.i])
    spectrum = property(lambda self: self.batch.spectrum[self.i])


def _statistic(m: Tensor, damping: float, m_used) -> Tensor:
    """``damping · m``, with ``m_used`` (a float, or one per layer with NaN for "own") instead."""
    if m_used is None:
        return damping * m
    if isinstance(m_used, float):
        return torch.full_like(m, damping * m_used) if m_used == m_used else damping * m
    if all(u == u for u in m_used):      # no NaN: all given
        used = torch.tensor([damping * u for u in m_used], dtype=m.dtype)
        return used.to(m.device, non_blocking=True)
    used = torch.as_tensor(m_used, dtype=m.dtype, device=m.device)
    return damping * torch.where(torch.isnan(used), m, used)


def _safe(rho: Tensor, damping: float, m_used) -> Tensor:
    """``ρ``, with 1 where it is 0: ``ρ = 0`` only for a zero ``K``, where any ``ρ`` gives
    ``c = A``. A ``ρ`` from positive moving averages needs no such step."""
    used = [m_used] if isinstance(m_used, float) else m_used
    if used is not None and all(damping * u > 0 for u in used):      # (NaN > 0 is False)
        return rho
    return rho + (rho == 0)


def ntk_coefficients(K: Tensor, A: Tensor, damping: float, m_used=None) -> Coefficients:
    """``c = ρ (K + ρI)⁻¹ A`` with ``ρ = damping · m`` and ``m = tr(K)/n`` (or ``m_used``);
    ``K`` is ``(n, n)`` or a batch ``(L, n, n)`` of layers solved together.

    ``c`` is invariant to the scale of ``K``. A zero ``K`` (the layer got no gradient) gives
    ``ρ = 0`` and ``c = A``, whose contraction with zero gradients is zero anyway. A non-finite
    ``K`` (overflow) gives a NaN ``c``, so the gradient is NaN and a loss scaler skips the step.
    """
    damped = K.to(torch.float64, copy=True)
    A = A if A.dtype == damped.dtype and A.device == damped.device else A.to(damped)
    diag = torch.diagonal(damped, dim1=-2, dim2=-1)
    m = diag.mean(-1)
    rho = _statistic(m, damping, m_used)
    safe = _safe(rho, damping, m_used)[..., None]
    diag += safe
    # K is symmetric and its transpose is column-major: LAPACK's working copy is a straight one
    solved, _ = torch.linalg.solve_ex(damped.mT, A.expand(K.shape[:-1]))
    return Coefficients(safe * solved, m, rho, K)


def ntk_low_rank(G: Tensor, A: Tensor, damping: float, m_used=None) -> Coefficients:
    """``ntk_coefficients`` for ``K = G Gᵀ`` with ``G`` ``(n, D)``, ``D < n``, in ``D`` dimensions
    and without forming ``K``: ``ρ (K + ρI)⁻¹ = I − G (GᵀG + ρI)⁻¹ Gᵀ`` (Woodbury), so
    ``c = A − G (GᵀG + ρI)⁻¹ GᵀA``. Its spectrum for logging is ``G`` (``condition_number``)."""
    G = G.to(torch.float64)
    A = A if A.dtype == G.dtype and A.device == G.device else A.to(G)
    F = G.T @ G
    diag = F.diagonal()
    m = diag.sum() / A.numel()                 # tr(GGᵀ) = tr(GᵀG)
    rho = _statistic(m, damping, m_used)
    diag += _safe(rho, damping, m_used)
    solved, _ = torch.linalg.solve_ex(F, G.T @ A)
    return Coefficients(torch.addmv(A, G, solved, alpha=-1), m, rho, G)


def fisher_coefficients(nu2: Tensor, A: Tensor, damping: float, m_used=None) -> Coefficients:
    """``c_i = A_i / sqrt(ν_i² + damping · m)`` with ``m`` the mean of ``ν²`` (or ``m_used``);
    ``ν²`` is ``(n,)`` or a batch ``(L, n)`` of layers.

    A sample whose denominator is zero (ν_i = 0 and no damping) contributes nothing: ``c_i = 0``.
    """
    nu2 = nu2.to(torch.float64)
    A = A.to(nu2)
    m = nu2.mean(-1)
    rho = _statistic(m, damping, m_used)
    denom = torch.sqrt(nu2 + rho[..., None])
    zero = denom == 0             # not NaN: overflowed statistics must give a NaN c, not zero
    c = torch.where(zero, torch.zeros_like(denom), A / torch.where(zero, torch.ones_like(denom), denom))
    return Coefficients(c, m, rho, nu2)


def fisher_nu2(dots: Tensor, sq_norms: Tensor) -> Tensor:
    """``ν_i² = Σ_t ⟨g_t, G_i⟩² / Σ_t ‖g_t‖²`` from the probe×sample inner products ``dots``
    (zero when no probe has a non-zero piece; NaN when the products overflowed)."""
    dots, total = dots.to(torch.float64), sq_norms.to(torch.float64).sum()
    nu2 = (dots ** 2).sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    nu2 = torch.where(total != 0, nu2, torch.zeros_like(nu2))
    return torch.where(torch.isinf(nu2) | torch.isinf(total), torch.full_like(nu2, math.nan), nu2)


def condition_number(spectrum: Tensor, mode: str) -> float:
    """For logging: ``λmax/λmin`` of K (inf when singular, also to its rounding: ``λmin`` at most
    ``n·eps·λmax``, as duplicated samples give; 1 for a layer without gradient), or
    ``max ν / min ν`` over samples with ``ν > 0`` (fisher). NaN when the statistics overflowed."""
    eps = torch.finfo(spectrum.dtype).eps if spectrum.is_floating_point() else 0.0
    s = spectrum.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all():
        return math.nan
    if mode == "ntk" and s.shape[0] != s.shape[1]:     # G (n, D) of a layer solved by Woodbury
        s = s @ s.T
    if mode == "ntk":
        ev = torch.linalg.eigvalsh(s).clamp_min(0.0)
        top, low = float(ev[-1]), float(ev[0])
        if top == 0:
            return 1.0
        return top / low if low > top * eps * s.shape[0] else math.inf
    nz = s[s > 0]
    return float(nz.max() / nz.min()) ** 0.5 if nz.numel() else 1.0
