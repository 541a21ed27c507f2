"""Plot ISOPO's diagnostics from TensorBoard logs written by ``torch_isopo.log_diagnostics``.

    python tools/plot_diagnostics.py runs/ntk-seed0 --out diagnostics.png

One panel per figure (``rho``, ``c_ratio``, ``cond``, ``m``), one line per layer, against the
logged step; ``charts/episodic_return``, when logged, gets a panel of its own. ``cond`` is
infinite where the layer's kernel is singular; those points are left out and counted in the
legend.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict


def read_scalars(logdir: str, prefix: str = "isopo") -> tuple[dict, list]:
    """``({figure: {layer: (steps, values)}}, [(step, return)])`` from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    figures: dict = defaultdict(dict)
    returns = []
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        series = ([p.step for p in points], [p.value for p in points])
        if tag.startswith(prefix + "/"):
            layer, figure = tag[len(prefix) + 1:].rsplit("/", 1)
            figures[figure][layer] = series
        elif tag == "charts/episodic_return":
            returns = list(zip(*series))
    return dict(figures), returns


def plot(logdir: str, out: str, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, returns = read_scalars(logdir)
    panels = [f for f in ("rho", "c_ratio", "cond", "m") if f in figures]
    if not panels:
        raise SystemExit(f"no isopo/<layer>/<figure> scalars in {logdir}")
    count = len(panels) + bool(returns)
    fig, axes = plt.subplots(1, count, figsize=(3.1 * count, 3.0), sharex=True)
    for ax, figure in zip(axes, panels):
        for i, (layer, (steps, values)) in enumerate(sorted(figures[figure].items())):
            finite = [(x, y) for x, y in zip(steps, values) if math.isfinite(y)]
            label = layer
            if figure == "cond" and len(finite) < len(values):      # K singular at those steps
                label += f" (inf {1 - len(finite) / len(values):.0%})"
            style = dict(ls="", marker=".", ms=3) if figure == "cond" else dict(lw=1)
            ax.plot(*(zip(*finite) if finite else ([], [])), color=f"C{i}", label=label, **style)
        ax.set(title=figure, xlabel="optimizer step")
        if figure in ("rho", "cond", "m"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if figure == "cond":
            ax.legend(fontsize=6)
    axes[0].legend(fontsize=7, title="layer", title_fontsize=7)
    if returns:
        axes[-1].plot(*zip(*returns), color="k", lw=1)
        axes[-1].set(title="episode return", xlabel="optimizer step")
        axes[-1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir")
    p.add_argument("--out", default="diagnostics.png")
    p.add_argument("--title")
    args = p.parse_args(argv)
    plot(args.logdir, args.out, args.title)


if __name__ == "__main__":
    main()
