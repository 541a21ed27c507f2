"""The examples and the learning benchmark run end to end, a few steps each."""
import sys
from pathlib import Path

import pytest

for module in ("gymnasium", "matplotlib", "tqdm"):
    pytest.importorskip(module)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]


def test_tiny_lm(tmp_path):
    import tiny_lm

    out = tmp_path / "tiny_lm.png"
    runs = tiny_lm.main(["--steps", "3", "--prompts", "4", "--group", "4", "--seeds", "1",
                         "--out", str(out)])
    assert set(runs) == {"ISOPO ntk", "REINFORCE"}
    assert all(len(h["reward"]) == 3 for hists in runs.values() for h in hists)
    assert out.stat().st_size > 0


def test_cartpole(tmp_path):
    import cartpole

    out = tmp_path / "cartpole.png"
    runs = cartpole.main(["--steps", "3", "--episodes", "4", "--seeds", "2", "--out", str(out)])
    assert set(runs) == {"ISOPO ntk", "REINFORCE"}
    assert out.stat().st_size > 0


def test_sb3_ppo(tmp_path):
    pytest.importorskip("stable_baselines3")
    import sb3_ppo

    out = tmp_path / "sb3_ppo.png"
    runs = sb3_ppo.main(["--steps", "512", "--envs", "2", "--n-steps", "64", "--batch-size", "64",
                         "--seeds", "1", "--lrs", "3e-3", "--out", str(out)])
    assert set(runs) == {"PPO, lr 0.003", "ISOPOPPO ntk, lr 0.003"}
    assert all(h["steps"][-1] == 512 for hists in runs.values() for h in hists)
    assert out.stat().st_size > 0


def test_sb3_train_benchmark():
    pytest.importorskip("sb3_contrib")
    import sb3_train

    r = sb3_train.main(["--rounds", "1", "--n-steps", "8"])
    assert set(r) == {"cnn", "lstm"} and all(v["ratio"]["ntk"] > 0 for v in r.values())


@pytest.mark.parametrize("task", ["reverse", "cartpole"])
def test_benchmark_methods(task):
    import learning

    for method in learning.METHODS:
        r = learning.run(task, method, 1e-3, 0, steps=1)
        assert len(r["reward"]) == len(r["kl"]) == 1
        assert all(kl > -1e-6 for kl in r["kl"]), method


@pytest.mark.parametrize("task", ["reverse", "cartpole"])
def test_benchmark_isopo_in_epochs_reinforce_is_grpo(task, monkeypatch):
    """ISOPO inside GRPO-2's epochs in ``reinforce`` mode reproduces GRPO-2's run."""
    import learning

    monkeypatch.setitem(learning.METHODS, "GRPO-2 + ISOPO reinforce",
                        dict(kind="grpo", epochs=2, mode="reinforce"))
    want = learning.run(task, "GRPO-2", 3e-3, 0, steps=3)
    got = learning.run(task, "GRPO-2 + ISOPO reinforce", 3e-3, 0, steps=3)
    assert got["reward"] == want["reward"]
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-3)
    assert min(want["kl"]) > 0


def test_benchmark_times_come_from_the_retimed_runs():
    import learning

    run = dict(task="reverse", method="GRPO-1", lr=1e-3, seed=0, samples=[128, 256],
               seconds=[5.0, 10.0], cpu=[4.0, 8.0], reward=[0.95, 0.95], kl=[0.1, 0.1])
    again = {**run, "seconds": [1.0, 2.0], "cpu": [0.5, 1.0], "commit": "abc"}
    (r,) = learning.with_retimed_clocks([run], [again])
    assert learning.reproduces(r["clock"], r)
    assert not learning.reproduces({**again, "reward": [0.95, 0.5]}, r)
    cells = learning.cells(learning.group([r]), "reverse", "GRPO-1", 1e-3, 0.9)
    assert cells[1:5] == ["128", "1.0", "0.5", "0.50"]
    assert "1 of its 1 re-runs" in learning.clocks([r])


def test_ppo_continuous(tmp_path):
    pytest.importorskip("tensorboard")
    import ppo_continuous

    sys.path.insert(0, str(ROOT / "tools"))
    import plot_diagnostics

    out, logs = tmp_path / "ppo.png", tmp_path / "runs"
    result = ppo_continuous.main(["--samples", "1024", "--envs", "2", "--steps", "256",
                                  "--minibatch", "128", "--update-epochs", "2", "--critic-epochs",
                                  "1", "--seeds", "2", "--log-every", "2", "--out", str(out),
                                  "--tensorboard", str(logs)])
    assert [row["method"] for row in result["table"]] == ["ISOPO ntk", "PPO-clip"]
    assert all(len(h["return"]) == 2 for hists in result["runs"].values() for h in hists)
    assert out.stat().st_size > 0
    assert sorted(p.name for p in logs.iterdir()) == ["ntk-seed0", "ntk-seed1"]
    figures, returns = plot_diagnostics.read_scalars(str(logs / "ntk-seed0"))
    assert set(figures) == {"rho", "c_ratio", "cond", "m"}
    assert set(figures["cond"]) == {"actor_mean.0", "actor_mean.2", "actor_mean.4", "Agent"}
    assert [len(steps) for steps, _ in figures["m"].values()] == [8] * 4   # 16 steps, every 2nd
    assert len(returns) == 2                       # two updates of 2 x 256 steps: episodes ended
    plot_diagnostics.main([str(logs / "ntk-seed0"), "--out", str(tmp_path / "diag.png")])
    assert (tmp_path / "diag.png").stat().st_size > 0
