"""Stable-Baselines3: ISOPOPPO, ISOPOA2C and ISOPORecurrentPPO.

* In ``reinforce`` mode one ``train()`` equals the stock algorithm's on the same rollout (float64,
  so that the comparison is tight), for discrete and continuous actions, images, dict
  observations, several epochs with clipping, and as a user runs it (float32 ``learn``).
* In ``ntk`` mode the policy-gradient step equals the float64 brute force
  (``reference_gradients``) on the per-sample terms the integration documents: one sample per
  row for PPO, one per sequence for RecurrentPPO (its terms ``−Σ_t A_t/a · v_t log π_t``).
* Each class learns end to end for a few hundred steps, logs ISOPO's figures, saves and loads.
"""
import copy
import math

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
gym = pytest.importorskip("gymnasium")

from stable_baselines3 import A2C, PPO  # noqa: E402
from stable_baselines3.common.logger import configure  # noqa: E402

from torch_isopo import surrogate_weights  # noqa: E402
from torch_isopo.integrations.sb3 import ISOPOA2C, ISOPOPPO  # noqa: E402
from torch_isopo.reference import reference_gradients  # noqa: E402

try:
    from sb3_contrib import RecurrentPPO

    from torch_isopo.integrations.sb3 import ISOPORecurrentPPO
except ImportError:
    RecurrentPPO = ISOPORecurrentPPO = None
needs_contrib = pytest.mark.skipif(RecurrentPPO is None, reason="needs sb3-contrib")


class Frames(gym.Env):
    """36×36 grey images (NatureCNN's smallest), optionally with a vector beside them (a dict);
    reward 1 when the action says whether the image is bright. Episodes of 8 steps."""

    def __init__(self, dict_obs: bool = False):
        image = gym.spaces.Box(0, 255, (36, 36, 1), np.uint8)
        vector = gym.spaces.Box(-1, 1, (3,), np.float32)
        self.observation_space = gym.spaces.Dict({"image": image, "vector": vector}) \
            if dict_obs else image
        self.action_space = gym.spaces.Discrete(2)
        self.dict_obs = dict_obs

    def _obs(self):
        self.image = self.np_random.integers(0, 256, (36, 36, 1), dtype=np.uint8)
        if not self.dict_obs:
            return self.image
        return {"image": self.image, "vector": self.np_random.uniform(-1, 1, 3).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == int(self.image.mean() > 127.5))
        self.t += 1
        return self._obs(), reward, False, self.t >= 8, {}


def _envs(name):
    return {"frames": Frames, "frames-dict": lambda: Frames(True)}.get(name, name)


def _env(name, n_envs):
    from stable_baselines3.common.env_util import make_vec_env
    return make_vec_env(_envs(name), n_envs=n_envs, seed=0)


def collected(cls, policy, env, n_envs=1, **kw):
    """A model built as a user would, with one rollout collected (its train() skipped)."""
    model = cls(policy, _env(env, n_envs), seed=0, device="cpu", **kw)
    model.train = lambda: None
    model.learn(model.n_steps * n_envs)
    del model.train
    model.set_logger(configure(None, []))
    return model


def to_float64(model):
    """The policy, its rollout and its features in float64 (SB3 casts observations to float32:
    a pre-hook casts them back)."""
    policy = model.policy.double()
    extractors = {id(m): m for m in (policy.features_extractor, policy.pi_features_extractor,
                                     policy.vf_features_extractor) if m is not None}

    def cast(module, args):
        return tuple({k: v.double() for k, v in a.items()} if isinstance(a, dict) else a.double()
                     for a in args)
    for m in extractors.values():
        m.register_forward_pre_hook(cast)
    buf = model.rollout_buffer
    for k, v in vars(buf).items():
        if isinstance(v, np.ndarray) and v.dtype == np.float32:
            setattr(buf, k, v.astype(np.float64))
    return model


def trained(model, seed=1):
    np.random.seed(seed)
    torch.manual_seed(seed)
    model.train()
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


CASES = {   # name: (stock, ISOPO, policy, env, n_envs, kwargs)
    "ppo-discrete": (PPO, ISOPOPPO, "MlpPolicy", "CartPole-v1", 1, dict(
        n_steps=64, batch_size=32, n_epochs=1)),
    "ppo-discrete-epochs": (PPO, ISOPOPPO, "MlpPolicy", "CartPole-v1", 2, dict(
        n_steps=32, batch_size=16, n_epochs=4, clip_range=0.05, clip_range_vf=0.1, ent_coef=0.01,
        learning_rate=3e-3)),
    "ppo-continuous-epochs": (PPO, ISOPOPPO, "MlpPolicy", "Pendulum-v1", 1, dict(
        n_steps=64, batch_size=16, n_epochs=3, clip_range=0.05, ent_coef=0.01, learning_rate=3e-3)),
    "ppo-gsde": (PPO, ISOPOPPO, "MlpPolicy", "Pendulum-v1", 1, dict(
        n_steps=32, batch_size=16, n_epochs=2, use_sde=True)),
    "ppo-target-kl": (PPO, ISOPOPPO, "MlpPolicy", "CartPole-v1", 1, dict(
        n_steps=64, batch_size=16, n_epochs=5, learning_rate=3e-2, target_kl=1e-3)),
    "ppo-cnn": (PPO, ISOPOPPO, "CnnPolicy", "frames", 1, dict(
        n_steps=16, batch_size=8, n_epochs=2)),
    "ppo-dict": (PPO, ISOPOPPO, "MultiInputPolicy", "frames-dict", 1, dict(
        n_steps=16, batch_size=8, n_epochs=2)),
    "a2c-discrete": (A2C, ISOPOA2C, "MlpPolicy", "CartPole-v1", 2, dict(n_steps=8)),
    "a2c-continuous": (A2C, ISOPOA2C, "MlpPolicy", "Pendulum-v1", 2, dict(
        n_steps=8, normalize_advantage=True, ent_coef=0.01)),
}
if RecurrentPPO is not None:
    CASES.update({
        "recurrent-discrete": (RecurrentPPO, ISOPORecurrentPPO, "MlpLstmPolicy", "CartPole-v1", 2,
                               dict(n_steps=32, batch_size=40, n_epochs=2, clip_range=0.05,
                                    learning_rate=3e-3, ent_coef=0.01)),
        "recurrent-continuous": (RecurrentPPO, ISOPORecurrentPPO, "MlpLstmPolicy", "Pendulum-v1", 1,
                                 dict(n_steps=32, batch_size=16, n_epochs=2,
                                      policy_kwargs=dict(shared_lstm=True,
                                                         enable_critic_lstm=False))),
    })


@pytest.mark.parametrize("case", list(CASES))
def test_reinforce_train_equals_stock(case):
    """Same seed, same rollout, one train(): the same parameters as stock SB3 (float64)."""
    stock_cls, cls, policy, env, n_envs, kw = CASES[case]
    stock = collected(stock_cls, policy, env, n_envs, **kw)
    ours = collected(cls, policy, env, n_envs, isopo_mode="reinforce", **kw)
    for name in ("observations", "actions", "advantages", "log_probs"):
        a, b = getattr(stock.rollout_buffer, name), getattr(ours.rollout_buffer, name)
        a, b = (a, b) if isinstance(a, dict) else ({0: a}, {0: b})
        assert all(np.array_equal(a[k], b[k]) for k in a)
    before = {k: v.double() for k, v in stock.policy.state_dict().items()}
    want, got = trained(to_float64(stock)), trained(to_float64(ours))
    moved = 0
    for k in want:
        step = (want[k] - before[k]).norm()
        assert (got[k] - want[k]).norm() <= 1e-9 * max(step, 1e-12) + 1e-12, k
        moved += bool(step > 0)
    assert moved >= 4
    logs = ours.logger.name_to_value
    for key in ("train/value_loss", "train/explained_variance"):
        assert logs[key] == pytest.approx(stock.logger.name_to_value[key], rel=1e-9)
    if cls is not ISOPOA2C:
        for key in ("train/clip_fraction", "train/approx_kl", "train/policy_gradient_loss"):
            assert logs[key] == pytest.approx(stock.logger.name_to_value[key], rel=1e-6, abs=1e-12)
    assert "isopo/c_ratio" not in logs                     # reinforce: nothing to report
    if case == "ppo-target-kl":
        assert logs["train/n_updates"] < kw["n_epochs"]     # stopped early, as stock did
    if "epochs" in case:
        assert logs["train/clip_fraction"] > 0             # the clip was exercised


def test_float32_learn_equals_stock():
    """The user's view: swap the class name, same seed, ``learn`` one rollout and train on it."""
    kw = dict(n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu")
    stock = PPO("MlpPolicy", "Pendulum-v1", **kw)
    before = copy.deepcopy(stock.policy.state_dict())
    stock.learn(64)
    ours = ISOPOPPO("MlpPolicy", "Pendulum-v1", isopo_mode="reinforce", **kw)
    ours.learn(64)
    assert np.array_equal(stock.rollout_buffer.actions, ours.rollout_buffer.actions)
    for (k, p), q in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        step = (p - before[k]).norm()
        assert (p - q).norm() <= 1e-3 * step + 1e-9, k


# -- ntk against the brute force ----------------------------------------------------------------
def _sample_terms(model, data, actions):
    """The per-sample advantage-free terms and advantages, written out from SB3's losses."""
    policy = model.policy
    if isinstance(model, ISOPOPPO | ISOPOA2C):
        A = data.advantages
        if model.normalize_advantage and len(A) > 1:
            A = (A - A.mean()) / (A.std() + 1e-8)
        _, logp, _ = policy.evaluate_actions(data.observations, actions)   # stock's forward
        v = 1.0 if isinstance(model, ISOPOA2C) else surrogate_weights(logp, data.old_log_prob, A)
        return -v * logp / len(A), A, None
    mask = data.mask > 1e-8
    A = data.advantages
    A = (A - A[mask].mean()) / (A[mask].std() + 1e-8) * mask
    n_seq = data.lstm_states.pi[0].shape[1]
    a = A.view(n_seq, -1).norm(dim=1)
    seq = torch.arange(n_seq).repeat_interleave(len(A) // n_seq)
    # stock SB3's forward: the LSTM step by step with its resets
    _, logp, _ = policy.evaluate_actions(data.observations, actions, data.lstm_states,
                                         data.episode_starts)
    v = surrogate_weights(logp, data.old_log_prob, A, mask.double())
    rows = -(A / a[seq]) * v * logp / mask.sum()
    return torch.zeros(n_seq, dtype=rows.dtype).index_add(0, seq, rows), a, seq


BRUTE = {   # name: (ISOPO class, policy, env, n_envs, kwargs); one minibatch, one epoch
    "ppo-discrete": (ISOPOPPO, "MlpPolicy", "CartPole-v1", 1, dict(n_steps=24)),
    "ppo-continuous": (ISOPOPPO, "MlpPolicy", "Pendulum-v1", 1, dict(n_steps=24)),
    "ppo-cnn": (ISOPOPPO, "CnnPolicy", "frames", 1, dict(n_steps=12)),
    "a2c-continuous": (ISOPOA2C, "MlpPolicy", "Pendulum-v1", 2, dict(n_steps=8)),
}
if RecurrentPPO is not None:
    BRUTE["recurrent"] = (ISOPORecurrentPPO, "MlpLstmPolicy", "CartPole-v1", 2, dict(n_steps=24))


@pytest.mark.parametrize("case,mode,damping", [(c, "ntk", d) for c in BRUTE for d in (0.3, 3.0)]
                         + [("ppo-discrete", "fisher", 1.0)])
def test_policy_gradient_equals_brute_force(case, mode, damping):
    """With SGD at lr 1, no value or entropy term and no clipping, the step of train() is minus
    ISOPO's gradient of the documented per-sample terms (float64 brute force)."""
    cls, policy, env, n_envs, kw = BRUTE[case]
    if cls is not ISOPOA2C:
        kw = dict(kw, batch_size=kw["n_steps"] * n_envs, n_epochs=1)
    model = collected(cls, policy, env, n_envs, isopo_mode=mode, isopo_damping=damping,
                      isopo_ema=None, isopo_fisher_probes=None, learning_rate=1.0, vf_coef=0.0,
                      ent_coef=0.0, max_grad_norm=math.inf,
                      policy_kwargs=dict(optimizer_class=torch.optim.SGD, optimizer_kwargs={}),
                      **kw)
    to_float64(model)
    ref = copy.deepcopy(model.policy)          # a plain policy: ISOPO stays with the model
    before = {k: v.clone() for k, v in ref.named_parameters()}
    np.random.seed(1)
    data = next(iter(model.rollout_buffer.get(kw.get("batch_size"))))
    actions = data.actions.long().flatten() if model.action_space.__class__.__name__ == "Discrete" \
        else data.actions
    ref_model = copy.copy(model)
    ref_model.policy = ref
    _, A, seg = _sample_terms(ref_model, data, actions)
    want, _ = reference_gradients(ref, lambda: _sample_terms(ref_model, data, actions)[0], A,
                                  mode, damping, seg)
    trained(model)
    checked = 0
    for (name, p), q in zip(model.policy.named_parameters(), ref.parameters()):
        g = want[q]
        step = before[name] - p.detach()
        assert (step - g).norm() <= 1e-7 * g.norm() + 1e-12, f"{name}"
        checked += bool(g.norm() > 0)
    assert checked >= 4


# -- end to end ---------------------------------------------------------------------------------
END_TO_END = [(ISOPOPPO, "MlpPolicy", "Pendulum-v1", dict(n_steps=64, batch_size=32, n_epochs=2)),
              (ISOPOA2C, "MlpPolicy", "CartPole-v1", dict(n_steps=16))]
if RecurrentPPO is not None:
    END_TO_END.append((ISOPORecurrentPPO, "MlpLstmPolicy", "CartPole-v1",
                       dict(n_steps=32, batch_size=64, n_epochs=2)))


@pytest.mark.parametrize("cls,policy,env,kw", END_TO_END,
                         ids=[f"{c.__name__}-{p}" for c, p, _, _ in END_TO_END])
def test_learns_end_to_end_and_round_trips(cls, policy, env, kw, tmp_path):
    model = cls(policy, _env(env, 2), seed=0, device="cpu", isopo_mode="ntk", isopo_damping=0.5,
                **kw)
    model.set_logger(configure(None, []))
    before = copy.deepcopy(model.policy.state_dict())
    model.learn(256)
    logs = model.logger.name_to_value
    assert 0 < logs["isopo/c_ratio"] < 1 and logs["isopo/rho"] > 0 and logs["isopo/cond"] >= 1
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    stats = model.isopo.state_dict()["isopo"]["m"]
    assert stats and all(v > 0 for v in stats.values())
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", env=_env(env, 2), device="cpu")
    assert loaded.isopo.optimizer is loaded.policy.optimizer and loaded.isopo.model is loaded.policy
    assert (loaded.isopo.mode, loaded.isopo.damping) == ("ntk", 0.5)
    assert loaded.isopo.state_dict()["isopo"]["m"] == stats
    for k, v in model.policy.state_dict().items():
        assert torch.equal(v, loaded.policy.state_dict()[k])
    loaded.learn(2 * model.n_steps, reset_num_timesteps=False)


def test_loads_a_stock_checkpoint(tmp_path):
    """``ISOPOPPO.load`` of a stock PPO file: the policy and its optimizer's state, fresh
    statistics."""
    stock = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0, device="cpu")
    stock.learn(32)
    stock.save(tmp_path / "stock")
    model = ISOPOPPO.load(tmp_path / "stock", env=_env("CartPole-v1", 1), device="cpu")
    assert model.isopo.mode == "ntk" and model.isopo.state_dict()["isopo"]["m"] == {}
    for k, v in stock.policy.state_dict().items():
        assert torch.equal(v, model.policy.state_dict()[k])
    assert model.policy.optimizer.state_dict()["state"]
    model.learn(64)


@pytest.mark.parametrize("cls,policy,env,kw", [
    (ISOPOPPO, "MlpPolicy", "Pendulum-v1", dict(target_kl=1e-9)),     # stops at its 1st minibatch
    (ISOPOA2C, "MlpPolicy", "CartPole-v1", {}),
    *([(ISOPORecurrentPPO, "MlpLstmPolicy", "CartPole-v1", {})] if RecurrentPPO else [])])
def test_a_trained_model_is_freed(cls, policy, env, kw):
    """No graph of ISOPO's layers outlives train() (SB3's distribution object keeps the last
    forward's tensors): a deleted model is collected, its policy with it."""
    import gc
    import weakref
    model = cls(policy, env, n_steps=16, seed=0, device="cpu", **kw)
    model.learn(32)
    ref = weakref.ref(model.policy)
    del model
    gc.collect()
    assert ref() is None


def test_settings_reach_isopo_and_are_checked():
    model = ISOPOPPO("MlpPolicy", "CartPole-v1", n_steps=16, device="cpu", isopo_mode="fisher",
                     isopo_damping=0.5, isopo_ema=None, isopo_fisher_probes=8)
    isopo = model.isopo
    assert (isopo.mode, isopo.damping, isopo.ema, isopo.fisher_probes) == ("fisher", 0.5, None, 8)
    assert isinstance(isopo.optimizer, torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown mode"):
        ISOPOPPO("MlpPolicy", "CartPole-v1", device="cpu", isopo_mode="natural")
    with pytest.raises(ValueError, match="damping"):
        ISOPOA2C("MlpPolicy", "CartPole-v1", device="cpu", isopo_damping=0.0)


@needs_contrib
def test_recurrent_sequence_with_an_inner_episode_start_is_refused():
    model = collected(ISOPORecurrentPPO, "MlpLstmPolicy", "CartPole-v1", 1, n_steps=16,
                      batch_size=16)
    data = next(iter(model.rollout_buffer.get(16)))
    starts = data.episode_starts.clone()
    starts[-1] = 1.0
    with pytest.raises(ValueError, match="starts an episode after its first step"):
        model._minibatch(data._replace(episode_starts=starts), data.actions.long().flatten())
