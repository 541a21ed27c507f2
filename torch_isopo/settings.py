"""What one microbatch needs to know of the optimizer's settings, and their checks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    """The optimizer's settings as one microbatch sees them."""

    mode: str
    damping: float
    fisher_probes: int | None
    route: str
    budget_bytes: int
    probe_seed: int | None  # fisher: each layer draws its probes from a generator seeded with
                            # this plus its index, so results do not depend on the finishing
                            # order; drawn at the microbatch's first backward (None until then)


MODES = ("ntk", "fisher", "reinforce")


def _number(value, name: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be a finite number, got {value!r}") from None


def check_settings(mode, damping, ema, fisher_probes, route, grad_scaler, gates,
                   generator=None, memory_budget=1) -> None:
    """The optimizer's arguments, each checked with a message that says what is allowed."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    damping = _number(damping, "damping")
    if not math.isfinite(damping) or damping < 0 or (mode == "ntk" and damping == 0):
        raise ValueError(f"damping must be {'> 0' if mode == 'ntk' else '>= 0'} and finite for "
                         f"mode {mode!r}, got {damping}")
    if ema is not None and not 0.0 <= _number(ema, "ema") < 1.0:
        raise ValueError(f"ema must be None or in [0, 1), got {ema}")
    if isinstance(memory_budget, bool) or _number(memory_budget, "memory_budget", int) < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got "
                         f"{memory_budget!r}")
    if fisher_probes is not None and (not isinstance(fisher_probes, int) or isinstance(
            fisher_probes, bool) or fisher_probes < 1):
        raise ValueError(f"fisher_probes must be None or a positive int, got {fisher_probes!r}")
    if route not in ("auto", "gram", "materialise"):
        raise ValueError(f"unknown route {route!r}; choose 'auto', 'gram' or 'materialise'")
    if gates not in ("auto", "layer", "model"):
        raise ValueError(f"unknown gates {gates!r}; choose 'auto', 'layer' or 'model'")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (torch.Generator().manual_seed(s)) "
                        f"or None, got {type(generator).__name__}")
