"""ISOPO inside PPO/GRPO epochs: the clipped surrogate without its advantages.

PPO-style trainers take several optimizer steps per batch on the clipped objective

    J = Σ_t w_t · min(r_t A, clip(r_t, 1 − ε_low, 1 + ε_high) A),   r_t = π(y_t) / π_old(y_t),

with ``w_t`` the aggregation weights (token mean, per-sequence mean, …). Its gradient for sample
``i`` is ``A_i Σ_t w_t m_t r_t ∇log π_t``, where ``m_t`` says that the clip does not bind:
``r_t ≤ 1 + ε_high`` when ``A_i ≥ 0``, ``r_t ≥ 1 − ε_low`` when ``A_i < 0``. So

    L = −Σ_t w_t v_t log π_t,   v_t = m_t · sg(r_t),

is an advantage-free loss whose per-sample gradients, scaled by ``A_i``, add up to ``∇J``. Run it
inside ``opt.microbatch(A)`` at every inner step and ISOPO applies the advantages layer by layer;
in ``reinforce`` mode the step is exactly PPO's. Only the sign of ``A`` enters ``v``.

CISPO (``kind="cispo"``) descends ``−Σ_t w_t sg(min(r_t, 1 + ε_high)) A log π_t``: no mask,
``v_t = sg(min(r_t, 1 + ε_high))``.

At the sequence level (GSPO, ``level="sequence"``) one ratio per sequence replaces the token
ratios: the geometric mean ``s_i = exp(mean_t (log π_t − log π_old,t))`` over the sequence's
tokens, clipped and masked as above. Since ``∇s_i = s_i · mean_t ∇log π_t``, the weights
``v_t = m_i · sg(s_i)`` give the exact gradient when ``w_t`` is the same for all tokens of a
sequence, as in every usual aggregation (``mean_t`` and ``w_t`` cancel each other's length).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["surrogate_weights"]


def surrogate_weights(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                      mask: Tensor | None = None, *, eps_low: float = 0.2,
                      eps_high: float | None = None, level: str = "token",
                      kind: str = "clip") -> Tensor:
    """The detached weights ``v`` of the advantage-free clipped surrogate (see the module doc).

    Args:
        logp: log-probs of the taken actions under the current policy, ``(B, T)`` (sequences
            of tokens) or ``(R,)`` (one action per row). Only their values are used.
        old_logp: the same under the policy that sampled them (π_old), same shape.
        advantages: ``(B,)``, one per sequence, or the shape of ``logp``. Only their signs
            matter (``A ≥ 0`` counts as positive).
        mask: 1 for real tokens, 0 for padding, the shape of ``logp``; padding gets weight 0
            and is left out of sequence ratios.
        eps_low, eps_high: the clip range ``[1 − eps_low, 1 + eps_high]``; ``eps_high``
            defaults to ``eps_low``. ``kind="cispo"`` uses only ``eps_high``.
        level: ``"token"`` ratios, or ``"sequence"`` (GSPO: one geometric-mean ratio per row
            of a 2-D ``logp``; needs one advantage per sequence).
        kind: ``"clip"`` (PPO/GRPO) or ``"cispo"``.

    Returns:
        ``v``, the shape of ``logp``, without gradient. Backpropagate
        ``−(w · v · logp).sum()`` (``w`` your aggregation weights) inside
        ``opt.microbatch(advantages)``.
    """
    if kind not in ("clip", "cispo"):
        raise ValueError(f"kind must be 'clip' or 'cispo', got {kind!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp has shape {tuple(old_logp.shape)}, logp {tuple(logp.shape)}")
    eps_high = eps_low if eps_high is None else eps_high
    logp, old_logp = logp.detach(), old_logp.detach().to(logp.dtype)
    mask = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    if mask.shape != logp.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, logp {tuple(logp.shape)}")
    A = advantages.detach()
    per_sequence = logp.dim() == 2 and A.shape == logp.shape[:1]
    if not per_sequence and A.shape != logp.shape:
        raise ValueError(f"advantages of shape {tuple(A.shape)} do not fit logp of shape "
                         f"{tuple(logp.shape)}: give one per sequence (dim 0) or one per token")
    if per_sequence:
        A = A[:, None]
    log_ratio = (logp - old_logp) * mask
    if level == "sequence":
        if logp.dim() != 2 or not per_sequence:
            raise ValueError("sequence-level ratios need (B, T) log-probs and one advantage per "
                             "sequence, shape (B,)")
        log_ratio = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    ratio = log_ratio.exp()
    if kind == "cispo":
        v = ratio.clamp(max=1 + eps_high)
    else:
        inside = torch.where(A >= 0, ratio <= 1 + eps_high, ratio >= 1 - eps_low)
        v = ratio * inside
    return v.expand_as(logp) * mask
