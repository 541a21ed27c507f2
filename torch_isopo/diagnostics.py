"""Send ``opt.diagnostics`` to TensorBoard, Weights & Biases or any logger, one scalar per layer
and figure."""
from __future__ import annotations

from .optimizer import ISOPO

FIGURES = ("rho", "c_ratio", "cond", "m")


def log_diagnostics(opt, writer=None, step: int | None = None, *, prefix: str = "isopo",
                    figures=FIGURES) -> dict[str, float]:
    """Write the last ``step()``'s per-layer figures as ``<prefix>/<layer>/<figure>`` scalars.

    Args:
        opt: the ``ISOPO`` optimizer, or a wrapper around it with ``.optimizer`` (accelerate's).
        writer: a TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``),
            a W&B run or the ``wandb`` module (anything with ``log(dict, step=...)``), or
            ``None`` to only return the scalars.
        step: the global step to log them at.
        figures: which of ``opt.diagnostics``' figures to write.

    Returns the ``{tag: value}`` written (empty in ``reinforce`` mode, which has no figures).
    """
    while not isinstance(opt, ISOPO):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            raise TypeError(f"log_diagnostics needs an ISOPO optimizer, got {type(opt).__name__}")
        opt = inner
    scalars = {f"{prefix}/{layer}/{key}": float(values[key])
               for layer, values in opt.diagnostics.items() for key in figures}
    if writer is None or not scalars:
        return scalars
    if hasattr(writer, "add_scalar"):
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    elif hasattr(writer, "log"):
        writer.log(scalars, step=step)
    else:
        raise TypeError(f"log_diagnostics writes to objects with add_scalar(tag, value, step) "
                        f"(TensorBoard) or log(dict, step=...) (W&B); got {type(writer).__name__}")
    return scalars

