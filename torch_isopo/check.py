"""``torch_isopo.check``: does ISOPO compute the right gradients for *your* model and batch?

In the spirit of ``torch.autograd.gradcheck``: the fast path runs on one float64 copy of the model,
the brute force (``torch_isopo.reference``: per-sample ``torch.autograd.grad`` of the per-sample
losses) on another, and every layer's gradients are compared. The fast path knows the samples only
through the layout of each layer's rows (and ``segments``); the brute force knows them through the
per-sample losses. A model that mixes samples in a way ISOPO cannot see (a mean over the batch, a
permutation of rows, a table broadcast against the samples along another axis) therefore shows up
as a layer that disagrees.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import _compat
from .layers import GenericRuleWarning
from .optimizer import ISOPO
from .reference import reference_gradients
from .settings import check_settings


class CheckError(AssertionError):
    """``torch_isopo.check`` found a layer whose ISOPO gradient is not the reference's, or ISOPO
    refused the model; ``.result`` holds the whole ``CheckResult``."""

    def __init__(self, message: str, result: "CheckResult"):
        super().__init__(message)
        self.result = result


@dataclass
class LayerCheck:
    """One layer of ``opt.layers``: its rule, relative error per mode, generic-rule warning."""

    name: str
    rule: str
    params: list[str]
    errors: dict[str, float] = field(default_factory=dict)
    warning: str | None = None
    rtol: float = 1e-6

    @property
    def ok(self) -> bool:
        return all(e <= self.rtol for e in self.errors.values())


@dataclass
class CheckResult:
    """What ``check`` found: one row per layer, the refusals per mode, ``ok`` if all agree."""

    layers: list[LayerCheck]
    modes: tuple[str, ...]
    refusals: dict[str, str]
    damping: float
    rtol: float

    @property
    def ok(self) -> bool:
        return not self.refusals and all(row.ok for row in self.layers)

    def worst(self) -> tuple[LayerCheck, str, float] | None:
        """The layer and mode with the largest error above ``rtol`` (None if there is none)."""
        bad = [(row, mode, e) for row in self.layers for mode, e in row.errors.items()
               if not e <= self.rtol]
        return max(bad, key=lambda t: t[2] if not math.isnan(t[2]) else math.inf, default=None)

    def __str__(self) -> str:
        head = ["layer", "rule", *self.modes]
        body = [[row.name, row.rule, *(_cell(row.errors.get(m), self.rtol, m in self.refusals)
                                      for m in self.modes)] for row in self.layers]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [f"torch_isopo.check: {'ok' if self.ok else 'FAILED'} (relative error against the "
                 f"float64 reference, damping {self.damping:g}, rtol {self.rtol:g}; ! marks a "
                 "disagreement)"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
        lines += [f"warning: {row.warning}" for row in self.layers if row.warning]
        lines += [f"refused in mode {m}: {msg}" for m, msg in self.refusals.items()]
        return "\n".join(lines)


def _cell(err, rtol, refused) -> str:
    if err is None:
        return "refused" if refused else "-"
    return f"{err:.1e}" + ("" if err <= rtol else " !")


def check(model: nn.Module, sample_losses: Callable[[nn.Module], Tensor], advantages=None, *,
          modes: Sequence[str] = ("reinforce", "ntk", "fisher"), damping: float = 0.5,
          segments=None, sample_dim: int = 0, rtol: float = 1e-6,
          dtype: torch.dtype = torch.float64, raise_on_error: bool = True) -> CheckResult:
    """Compare ISOPO's gradients with the brute-force reference on a copy of ``model``.

    Args:
        model: the policy, as you would pass it to ``ISOPO`` (it is copied, never changed).
        sample_losses: ``sample_losses(m)`` runs the forward of module ``m`` (a copy of ``model``)
            on a small batch and returns the per-sample terms of the advantage-free loss, shape
            ``(n,)``: what your loop would ``.sum()`` and backpropagate inside the microbatch.
            Floating-point inputs are cast to ``dtype`` at every module call.
        advantages: ``(n,)``, distinct values; ``None`` draws standard normal ones (seeded).
        modes, damping, segments, sample_dim: as for ``ISOPO`` and ``microbatch``; ISOPO runs
            with ``ema=None`` and every position as a Fisher probe, as the reference does.
        rtol: the largest relative error per layer that counts as agreement.
        dtype: the precision of the copies (float64 leaves only rounding to compare).
        raise_on_error: raise a ``CheckError`` naming the worst layer if anything disagrees.

    Returns a ``CheckResult``: ``ok``, ``layers`` (name, rule, error per mode, warning) and a
    readable table as its ``str``.
    """
    unknown = [m for m in modes if m not in ("reinforce", "ntk", "fisher")]
    if unknown:
        raise ValueError(f"torch_isopo.check: unknown modes {unknown}; use reinforce, ntk, fisher")
    for mode in modes:                  # a bad setting is the check's error, not the model's
        check_settings(mode, damping, None, None, "auto", None, "auto")
    base = _copy(model, dtype)
    n = None if advantages is None else torch.as_tensor(advantages).numel()
    terms = _losses(sample_losses, copy.deepcopy(base), n).detach()   # a plain forward first
    n = terms.numel()
    if not bool(torch.isfinite(terms).all()):
        raise ValueError(
            f"torch_isopo.check: the model's sample terms are not finite in {dtype} without ISOPO "
            "(an attention that takes its softmax in float32 turns float64's most negative mask "
            "value into -inf, so a fully masked row of left padding gives NaN); check in "
            "float32 (dtype=torch.float32, rtol=1e-4) or with another attention implementation")
    if advantages is None:
        advantages = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = torch.as_tensor(advantages, dtype=torch.float64).detach().cpu()
    rows: dict[str, LayerCheck] = {}
    refusals: dict[str, str] = {}
    for mode in modes:
        fast = copy.deepcopy(base)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", GenericRuleWarning)
                trainable = [p for p in fast.parameters() if p.requires_grad]
                opt = ISOPO(fast, torch.optim.SGD(trainable, lr=0.0), mode=mode, damping=damping,
                            ema=None, fisher_probes=None)
            for w in caught:
                if not issubclass(w.category, GenericRuleWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            for layer in opt.layers:
                row = rows.setdefault(layer.name, LayerCheck(layer.name, layer.rule,
                                                             layer.param_names, rtol=rtol))
                row.warning = row.warning or next(
                    (str(w.message) for w in caught if issubclass(w.category, GenericRuleWarning)
                     and f"'{layer.name}'" in str(w.message)), None)
            with opt.microbatch(A.to(_device(fast)), segments, sample_dim=sample_dim):
                _losses(sample_losses, fast, A.numel()).sum().backward()
        except (ValueError, RuntimeError) as e:
            refusals[mode] = str(e)
            continue
        ref = copy.deepcopy(base)        # only what ISOPO accepts is checked against it
        try:
            want, _ = reference_gradients(ref, lambda: _losses(sample_losses, ref, A.numel()), A,
                                          mode, damping, segments, sample_dim)
        except RuntimeError as e:
            raise ValueError(
                f"torch_isopo.check: the brute force could not run on this model ({e}). It "
                "differentiates every layer's output with torch.autograd.grad"
                + (", which reentrant activation checkpointing (use_reentrant=True) does not "
                   "allow: check the model without it (model.gradient_checkpointing_disable(), "
                   "or use_reentrant=False)" if "checkpoint" in str(e) or "reentrant" in str(e)
                   or "no output of layer" in str(e) else
                   " and recomputes each module's call from its inputs")) from e
        want = {name: want.get(p) for name, p in ref.named_parameters() if p.requires_grad}
        got = {name: p.grad for name, p in fast.named_parameters() if p.requires_grad}
        scale = max((float(g.norm()) for g in want.values() if g is not None), default=0.0)
        if scale == 0:
            raise ValueError(
                "torch_isopo.check: no gradient reached any trainable parameter of the model, so "
                "there is nothing to compare. Most likely sample_losses(m) does not run the "
                "forward of the module m it is given (a copy of the model) but of the model "
                "itself; else its terms are constant (detached outputs, every term masked)")
        for layer in opt.layers:
            names = [n.split("=")[0] for n in layer.param_names]
            rows[layer.name].errors[mode] = _error([got[k] for k in names],
                                                   [want[k] for k in names], scale)
    result = CheckResult(list(rows.values()), tuple(modes), refusals, damping, rtol)
    if raise_on_error and not result.ok:
        raise CheckError(_failure(result), result)
    return result


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype`` whose modules cast floating-point inputs to ``dtype``."""
    m = copy.deepcopy(model).to(dtype)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    def pre(module, args, kwargs):     # also inside tuples (an LSTM's state, a PackedSequence)
        leaves, spec = _compat.tree_flatten((args, kwargs))
        return _compat.tree_unflatten([cast(t) for t in leaves], spec)

    for sub in m.modules():
        sub.register_forward_pre_hook(pre, with_kwargs=True)
    return m


def _losses(sample_losses, m: nn.Module, n: int | None = None) -> Tensor:
    """The per-sample terms, from the same random state every time (dropout masks match)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = sample_losses(m)
    if not isinstance(out, Tensor) or out.dim() != 1 or (n is not None and out.numel() != n):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = n if n is not None else "len(advantages)"
        raise ValueError(f"torch_isopo.check: sample_losses(model) must return the per-sample "
                         f"loss terms, shape (n,) with n = {want}; got {shape}")
    return out


def _device(m: nn.Module) -> torch.device:
    return next((p.device for p in m.parameters()), torch.device("cpu"))


def _error(got: list, want: list, scale: float) -> float:
    """Relative error of a layer's gradients; relative to the model's largest gradient where the
    layer's own is (numerically) zero, as for a bias in front of a normalisation."""
    diff = ref = 0.0
    for g, w in zip(got, want):
        w = torch.zeros(()) if w is None else w.detach().double()
        g = torch.zeros_like(w) if g is None else g.detach().double()
        diff += float((g - w).pow(2).sum())
        ref += float(w.pow(2).sum())
    diff, ref = math.sqrt(diff), math.sqrt(ref)
    den = max(ref, 1e-9 * scale)
    return diff / den if den > 0 else (0.0 if diff == 0 else math.inf)


def _failure(result: CheckResult) -> str:
    worst = result.worst()
    if worst is not None:
        row, mode, err = worst
        head = (f"ISOPO's gradient of layer '{row.name}' ({row.rule}) differs from the reference "
                f"in mode {mode}: relative error {err:.2e} > rtol {result.rtol:g}. The per-sample "
                "gradients of this layer are not what the rows of its inputs say: the forward "
                "mixes samples (a mean or normalisation over the batch, rows permuted or shifted "
                "between samples, a table broadcast against the samples along another axis), or "
                "segments/sample_dim do not describe the batch")
    else:
        mode, msg = next(iter(result.refusals.items()))
        head = f"ISOPO refused the model in mode {mode}: {msg}"
    return f"{head}\n\n{result}"
