"""Learning benchmark: ISOPO (fisher, ntk; one step or inside GRPO epochs) against REINFORCE,
GRPO and CISPO.

    python benchmarks/learning.py                # the runs not saved yet (all: 372), 2 workers
    python benchmarks/learning.py --retime       # re-run the table rows' runs in one session
    python benchmarks/learning.py --report       # rebuild docs/benchmarks.md from saved results
    python benchmarks/learning.py --quick        # 3 steps of every method (smoke test)

Tasks are the examples' ``ReverseTask`` (tiny transformer, GRPO group advantages) and
``CartPoleTask`` (MLP policy, one advantage per episode). Every method gets the same samples
per step and the same number of steps, for every learning rate and seed:

* REINFORCE: one AdamW step on ``−Σ A·log π`` (token mean), plain autograd.
* GRPO-k: k epochs over 4 minibatches of the batch, PPO ratio clipping (ε = 0.2).
* CISPO: 1 epoch over 4 minibatches, ``−sg(min(r, 1 + 0.28))·A·log π`` (no lower clip).
* ISOPO fisher / ntk: one AdamW step on the ISOPO gradient (default damping 1, ema 0.9).
* GRPO-k + ISOPO ntk: GRPO-k's epochs and minibatches, each step an ISOPO step on the
  advantage-free clipped surrogate (``surrogate_weights``); in ``reinforce`` mode it is GRPO-k.

Per step it records samples, wall-clock and CPU seconds (sampling + update), the batch's
mean reward and the KL(π_before ‖ π_after) of the update, averaged over the batch's action rows.
Each finished run is appended to ``benchmarks/results/learning.jsonl`` with the repository commit
it ran at; a rerun skips the runs already there (``--fresh`` starts over). CPU seconds measured
in different sessions need not compare (load, machine), so ``--retime`` re-runs the runs behind
the tables in one session (``learning_retimed.jsonl``), and the report takes its times from
there. The report goes to ``docs/benchmarks.md`` (between its results markers) and
``docs/img/``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from cartpole import CartPoleTask  # noqa: E402
from rl import final_reward as final, first_reach, smooth  # noqa: E402
from tiny_lm import ReverseTask  # noqa: E402

from torch_isopo import ISOPO, surrogate_weights  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "learning.jsonl"
DOC, IMG = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img"
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]   # every method, every task
METHODS = {
    "REINFORCE": dict(kind="reinforce"),
    "GRPO-1": dict(kind="grpo", epochs=1),
    "GRPO-2": dict(kind="grpo", epochs=2),
    "GRPO-4": dict(kind="grpo", epochs=4),
    "CISPO": dict(kind="cispo", epochs=1),
    "ISOPO fisher": dict(kind="isopo", mode="fisher"),
    "ISOPO ntk": dict(kind="isopo", mode="ntk"),
    "GRPO-1 + ISOPO ntk": dict(kind="grpo", epochs=1, mode="ntk"),
    "GRPO-2 + ISOPO ntk": dict(kind="grpo", epochs=2, mode="ntk"),
    "GRPO-4 + ISOPO ntk": dict(kind="grpo", epochs=4, mode="ntk"),
}
ABLATION = {   # damping, on the reverse task at ABLATION_LR
    "ISOPO ntk, damping 0.1": dict(kind="isopo", mode="ntk", damping=0.1),
    "ISOPO ntk, damping 10": dict(kind="isopo", mode="ntk", damping=10.0),
    "ISOPO fisher, damping 0": dict(kind="isopo", mode="fisher", damping=0.0),
    "ISOPO fisher, damping 10": dict(kind="isopo", mode="fisher", damping=10.0),
}
ABLATION_LR = 3e-3
TASKS = {"reverse": dict(make=ReverseTask, steps=80), "cartpole": dict(make=CartPoleTask, steps=60)}
SEEDS = [0, 1, 2]
MINIBATCHES, CLIP, CISPO_HIGH = 4, 0.2, 0.28


def surrogate_step(model, opt, task, batch, kind, epochs, gen):
    """GRPO or CISPO: ``epochs`` passes over shuffled minibatches, one AdamW step each. With
    ISOPO, each step backpropagates the advantage-free surrogate inside a microbatch."""
    n = len(batch.rewards)
    old = batch.old_logp.gather(1, batch.actions[:, None]).squeeze(1)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).chunk(MINIBATCHES):
            idx = idx.sort().values
            rows = torch.isin(batch.sample, idx)
            A = batch.advantages[batch.sample[rows]]
            if isinstance(opt, ISOPO):
                segments = (None if batch.segments is None
                            else torch.searchsorted(idx, batch.segments[rows]))
                with opt.microbatch(batch.advantages[idx], segments=segments):
                    logp, _ = task.logprobs(model, batch, idx)
                    v = surrogate_weights(logp, old[rows], A, eps_low=CLIP)
                    (-(v * logp).mean()).backward()
                opt.step()
                opt.zero_grad()
                continue
            logp, _ = task.logprobs(model, batch, idx)
            ratio = (logp - old[rows]).exp()
            if kind == "grpo":
                obj = torch.min(ratio * A, ratio.clamp(1 - CLIP, 1 + CLIP) * A)
            else:
                obj = ratio.detach().clamp(max=1 + CISPO_HIGH) * A * logp
            (-obj.mean()).backward()
            opt.step()
            opt.zero_grad()


def run(task_name: str, method: str, lr: float, seed: int, steps: int | None = None) -> dict:
    """Train one fresh policy; its per-step history."""
    torch.set_num_threads(1)
    spec = {**METHODS, **ABLATION}[method]
    task = TASKS[task_name]["make"]()
    steps = steps or TASKS[task_name]["steps"]
    torch.manual_seed(seed)
    gen, shuffle = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    model = task.policy()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if "mode" in spec:
        opt = ISOPO(model, opt, mode=spec["mode"], damping=spec.get("damping", 1.0))
    hist = {k: [] for k in ("samples", "seconds", "cpu", "reward", "kl")}
    samples = seconds = cpu = 0.0
    for _ in range(steps):
        wall, proc = time.perf_counter(), time.process_time()
        batch = task.collect(model, gen)
        if spec["kind"] == "reinforce":
            logp, _ = task.logprobs(model, batch)
            (-(batch.advantages[batch.sample] * logp).mean()).backward()
            opt.step()
            opt.zero_grad()
        elif spec["kind"] == "isopo":
            with opt.microbatch(batch.advantages, segments=batch.segments):
                logp, _ = task.logprobs(model, batch)
                (-logp.mean()).backward()
            opt.step()
            opt.zero_grad()
        else:
            surrogate_step(model, opt, task, batch, spec["kind"], spec["epochs"], shuffle)
        seconds += time.perf_counter() - wall
        cpu += time.process_time() - proc
        samples += len(batch.rewards)
        with torch.no_grad():
            _, new = task.logprobs(model, batch)
            kl = (batch.old_logp.exp() * (batch.old_logp - new)).sum(-1).mean().item()
        for k, v in zip(hist, (int(samples), round(seconds, 3), round(cpu, 3),
                               round(batch.rewards.mean().item(), 5), float(f"{kl:.4g}"))):
            hist[k].append(v)
    return dict(task=task_name, method=method, lr=lr, seed=seed, **hist)


def _run(job):
    return run(*job)


def library_commit() -> str:
    """The repository commit the runs measure (``+`` when the work tree has changes)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain") else "")
    except OSError:
        return "unknown"


def jobs(quick: bool) -> list[tuple]:
    """(task, method, lr, seed, steps) of every run; ``quick``: 3 steps, one lr and seed."""
    steps, lrs, seeds = (3, [ABLATION_LR], SEEDS[:1]) if quick else (None, LRS, SEEDS)
    out = [(t, m, lr, s, steps) for t in TASKS for m in METHODS for lr in lrs for s in seeds]
    out += [("reverse", m, ABLATION_LR, s, steps) for m in ABLATION for s in seeds]
    # the most expensive first, so that the workers finish together
    return sorted(out, key=lambda j: -(j[0] == "cartpole") - METHODS.get(j[1], {}).get("epochs", 1))


def retime_jobs(runs: list[dict]) -> list[tuple]:
    """The runs of every table row (each method at its best learning rate, the damping rows),
    seed by seed, so that each method's runs spread over the session."""
    groups = group(runs)
    rows = [(t, m, best_lr(groups, t, m)) for t in TASKS for m in METHODS]
    rows += [("reverse", m, ABLATION_LR) for m in ["ISOPO ntk", "ISOPO fisher", *ABLATION]]
    rows = list(dict.fromkeys(rows))
    return [(t, m, lr, s, None) for s in SEEDS for t, m, lr in rows]


def collect_runs(args, path: Path, todo: list[tuple]) -> list[dict]:
    """Run the jobs of ``todo`` not yet in ``path``, appending each result; all of its runs."""
    if args.fresh and path.exists():
        path.unlink()
    done = [json.loads(line) for line in path.open()] if path.exists() else []
    have = {(r["task"], r["method"], r["lr"], r["seed"]) for r in done}
    todo = [j for j in todo if j[:4] not in have]
    print(f"{len(done)} runs saved, {len(todo)} to do, {args.workers} workers", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, commit = time.time(), library_commit()
    with mp.get_context("spawn").Pool(args.workers) as pool, path.open("a") as f:
        for i, r in enumerate(pool.imap_unordered(_run, todo), 1):
            r["commit"] = commit
            f.write(json.dumps(r) + "\n")
            f.flush()
            done.append(r)
            print(f"[{i}/{len(todo)} {time.time() - start:6.0f}s] {r['task']:8s} "
                  f"{r['method']:24s} lr={r['lr']:g} seed={r['seed']} "
                  f"final={final(r):.3f} cpu={r['cpu'][-1]:.0f}s", flush=True)
    return done


# -- summary -------------------------------------------------------------------------------------

def with_retimed_clocks(runs: list[dict], retimed: list[dict]) -> list[dict]:
    """Each run with its repeat from the re-timing session, if any, as ``clock``: time columns
    and reward-vs-compute curves read the repeat (its own rewards and clocks), so that every
    time in a table was measured in one session."""
    again = {(r["task"], r["method"], r["lr"], r["seed"]): r for r in retimed}
    return [{**r, "clock": again[k]} if (k := (r["task"], r["method"], r["lr"], r["seed"])) in again
            else r for r in runs]


def reproduces(a: dict, r: dict) -> bool:
    """Whether run ``a`` repeats run ``r`` step for step (up to float32 reduction order)."""
    return (max(abs(x - y) for x, y in zip(a["reward"], r["reward"])) <= 1e-4
            and all(math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-6)
                    for x, y in zip(a["kl"], r["kl"])))


def target_of(task: str) -> float:
    return TASKS[task]["make"].target


def group(runs: list[dict]) -> dict:
    out = {}
    for r in runs:
        out.setdefault((r["task"], r["method"], r["lr"]), []).append(r)
    return out


def best_lr(groups: dict, task: str, method: str) -> float:
    """The learning rate with the highest mean final reward (ties: fewer samples to target)."""
    def score(lr):
        rs = groups[(task, method, lr)]
        t = [first_reach(r, target_of(task), "samples") for r in rs]
        return (round(statistics.fmean(map(final, rs)), 3),
                -statistics.fmean(x if x == x else 1e12 for x in t))
    lrs = [lr for (t, m, lr) in groups if t == task and m == method]
    return max(lrs, key=score)


def fmt_reach(values: list[float], digits: int) -> str:
    hit = [v for v in values if v == v]
    if not hit:
        return f"— (0/{len(values)})"
    mean = f"{statistics.fmean(hit):.{digits}f}"
    return mean if len(hit) == len(values) else f"{mean} ({len(hit)}/{len(values)})"


def mean_sd(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def cells(groups: dict, task: str, method: str, lr: float, tgt: float) -> list[str]:
    """Final reward, samples / wall / CPU seconds to target and KL of one configuration (times
    from the runs' re-timing repeats, where there are any)."""
    rs = groups[(task, method, lr)]
    timed = [r.get("clock", r) for r in rs]
    return [mean_sd([final(r) for r in rs], 3 if tgt < 10 else 1),
            fmt_reach([first_reach(r, tgt, "samples") for r in rs], 0),
            fmt_reach([first_reach(r, tgt, "seconds") for r in timed], 1),
            fmt_reach([first_reach(r, tgt, "cpu") for r in timed], 1),
            f"{statistics.fmean(r['cpu'][-1] / len(r['cpu']) for r in timed):.2f}",
            f"{statistics.fmean(statistics.fmean(r['kl']) for r in rs):.2g}"]


def summary(runs: list[dict]) -> str:
    groups = group(runs)
    lines = []
    head = ("| method | lr | final reward | {unit} to target | wall s to target | CPU s to target "
            "| CPU s / step | KL per update |\n|---|---|---|---|---|---|---|---|")
    for task, cfg in TASKS.items():
        make, tgt = cfg["make"], target_of(task)
        lines += [f"### {make.name}", "",
                  f"{cfg['steps']} steps of {make().batch_size} {make.unit}; target {tgt:g} "
                  f"(5-step mean of the batch reward). Each method at its best learning rate; "
                  f"mean ± sd over {len(SEEDS)} seeds, or the mean over the seeds that reached "
                  f"the target (k/{len(SEEDS)}).", "", head.format(unit=make.unit)]
        for m in METHODS:
            if not any(t == task and mm == m for t, mm, _ in groups):
                continue
            lr = best_lr(groups, task, m)
            lines.append(f"| {m} | {lr:g} | " + " | ".join(cells(groups, task, m, lr, tgt)) + " |")
        lines += ["", "Final reward at every learning rate (mean over seeds):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |",
                  "|---|" + "---|" * len(LRS)]
        for m in METHODS:
            row = [statistics.fmean(map(final, groups[(task, m, lr)]))
                   if (task, m, lr) in groups else math.nan for lr in LRS]
            lines.append(f"| {m} | " + " | ".join(
                f"{v:.3f}" if tgt < 10 else f"{v:.1f}" for v in row) + " |")
        if task == "reverse":
            lines += ["", f"Damping, at lr {ABLATION_LR:g}:", "", head.format(unit=make.unit)]
            for m in ["ISOPO ntk", "ISOPO fisher", *ABLATION]:
                if (task, m, ABLATION_LR) not in groups:
                    continue
                lines.append(f"| {m} | {ABLATION_LR:g} | "
                             + " | ".join(cells(groups, task, m, ABLATION_LR, tgt)) + " |")
        lines += ["", f"![{make.name}](img/learning_{task}.png)", ""]
        lines += epochs_table(groups, task) + [
            "", f"![{make.name}: GRPO-k and ISOPO inside its epochs]"
            f"(img/learning_{task}_epochs.png)", ""]
    return "\n".join(lines)


def epochs_table(groups: dict, task: str) -> list[str]:
    """GRPO-k against GRPO-k + ISOPO ntk at the same learning rates (each one's best)."""
    make, tgt = TASKS[task]["make"], target_of(task)
    lines = ["GRPO-k and ISOPO inside GRPO-k's epochs at the same learning rate (the best of "
             "either; mean over seeds):", "",
             f"| k | lr | GRPO-k final | + ISOPO final | GRPO-k {make.unit} to target "
             f"| + ISOPO {make.unit} to target | GRPO-k KL | + ISOPO KL |",
             "|---|---|---|---|---|---|---|---|"]
    for k in (1, 2, 4):
        pair = [f"GRPO-{k}", f"GRPO-{k} + ISOPO ntk"]
        if not all((task, m, lr) in groups for m in pair for lr in LRS):
            continue
        for lr in sorted({best_lr(groups, task, m) for m in pair}):
            rs = [groups[(task, m, lr)] for m in pair]
            digits = 3 if tgt < 10 else 1
            lines.append(" | ".join(
                [f"| {k}", f"{lr:g}"]
                + [f"{statistics.fmean(map(final, r)):.{digits}f}" for r in rs]
                + [fmt_reach([first_reach(x, tgt, "samples") for x in r], 0) for r in rs]
                + [f"{statistics.fmean(statistics.fmean(x['kl']) for x in r):.2g}" for r in rs])
                + " |")
    return lines


EPOCHS = ["GRPO-1", "GRPO-2", "GRPO-4", "GRPO-1 + ISOPO ntk", "GRPO-2 + ISOPO ntk",
          "GRPO-4 + ISOPO ntk", "ISOPO ntk"]


def plots(runs: list[dict]) -> None:
    """Per task: every one-step and GRPO/CISPO method (``learning_<task>.png``), and GRPO-k
    against ISOPO inside GRPO-k's epochs (``learning_<task>_epochs.png``)."""
    one_step = [m for m in METHODS if "+" not in m]
    for task in TASKS:
        figure(runs, task, {m: dict(color=f"C{i}") for i, m in enumerate(one_step)},
               f"learning_{task}.png")
        styles = {m: dict(color=f"C{i % 3}", ls="-" if "+" not in m else "--")
                  for i, m in enumerate(EPOCHS[:-1])}
        styles["ISOPO ntk"] = dict(color="grey", ls=":")
        figure(runs, task, styles, f"learning_{task}_epochs.png")


def figure(runs: list[dict], task: str, styles: dict, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group(runs)
    IMG.mkdir(parents=True, exist_ok=True)
    make = TASKS[task]["make"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    axes = axes.ravel()
    for m, style in styles.items():
        if not all((task, m, lr) in groups for lr in LRS):
            continue
        lr = best_lr(groups, task, m)
        rs = groups[(task, m, lr)]
        R = np.array([smooth(r["reward"]) for r in rs])
        x = np.array(rs[0]["samples"])
        axes[0].plot(x, R.mean(0), label=f"{m} (lr {lr:g})", **style)
        axes[0].fill_between(x, R.min(0), R.max(0), color=style["color"], alpha=0.1)
        timed = [r.get("clock", r) for r in rs]
        axes[1].plot(np.array([r["cpu"] for r in timed]).mean(0),
                     np.array([smooth(r["reward"]) for r in timed]).mean(0), **style)
        kl = np.array([smooth(r["kl"]) for r in rs]).mean(0)
        axes[2].plot(np.arange(1, len(kl) + 1), kl, **style)
        finals = [statistics.fmean(map(final, groups[(task, m, lr)])) for lr in LRS]
        axes[3].plot(LRS, finals, marker="o", **style)
    axes[0].set(xlabel=make.unit, ylabel="reward (5-step mean)",
                title=f"{make.name}: best lr, mean and range of {len(SEEDS)} seeds")
    axes[1].set(xlabel="CPU seconds (sampling + update)", title="reward vs compute")
    axes[2].set(xlabel="step", ylabel="KL(before ‖ after)", yscale="log", title="KL per update")
    axes[3].set(xlabel="learning rate", ylabel="final reward", xscale="log",
                title="learning-rate sweep")
    for ax in axes[:2]:
        ax.axhline(make.target, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / name, dpi=80)
    plt.close(fig)


def clocks(runs: list[dict]) -> str:
    """Where the time columns come from."""
    repeated = [r for r in runs if "clock" in r]
    if not repeated:
        return "Times as measured by each run."
    commits = sorted({r["clock"]["commit"] for r in repeated})
    same = sum(reproduces(r["clock"], r) for r in repeated)
    return (f"Wall-clock and CPU seconds (tables and reward-vs-compute plots) come from "
            f"`python benchmarks/learning.py --retime`, which re-runs every table row's runs in "
            f"one session (library at commit {', '.join(commits)}), reading time to target on "
            f"each re-run's own reward curve; {same} of its {len(repeated)} re-runs repeat their "
            f"saved run step for step.")


def write_doc(runs: list[dict], command: str) -> None:
    body = f"Produced by `{command}`. {clocks(runs)}\n\n" + summary(runs)
    empty = f"# Learning benchmark\n\n{MARKERS[0]}\n{MARKERS[1]}\n"
    text = DOC.read_text() if DOC.exists() else empty
    head, rest = text.split(MARKERS[0])
    DOC.write_text(f"{head}{MARKERS[0]}\n{body}\n{MARKERS[1]}{rest.split(MARKERS[1])[1]}")
    plots(runs)
    print(f"wrote {DOC} and {IMG}/learning_*.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    p.add_argument("--retime", action="store_true",
                   help="repeat every method's best-lr runs in one session, for its clocks")
    p.add_argument("--quick", action="store_true", help="3 steps per run, no report")
    p.add_argument("--fresh", action="store_true", help="discard saved results")
    args = p.parse_args(argv)
    if args.quick:
        args.results = os.path.join(tempfile.mkdtemp(), "quick.jsonl")
    path = Path(args.results)
    retimed_path = path.with_name(path.stem + "_retimed.jsonl")
    if args.report or args.retime:
        runs = [json.loads(line) for line in path.open()]
    else:
        runs = collect_runs(args, path, jobs(args.quick))
    wanted = {j[:4] for j in jobs(args.quick)}
    runs = [r for r in runs if (r["task"], r["method"], r["lr"], r["seed"]) in wanted]
    if args.retime:
        args.fresh = False
        collect_runs(args, retimed_path, retime_jobs(runs))
    if retimed_path.exists():
        runs = with_retimed_clocks(runs, [json.loads(line) for line in retimed_path.open()])
    if not args.quick:
        write_doc(runs, "python benchmarks/learning.py")


if __name__ == "__main__":
    main()
