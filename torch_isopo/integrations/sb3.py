"""ISOPO in Stable-Baselines3: change the algorithm's class name, keep the script.

Example::

    from torch_isopo.integrations.sb3 import ISOPOPPO    # was: from stable_baselines3 import PPO

    model = ISOPOPPO("MlpPolicy", "CartPole-v1", isopo_mode="ntk", seed=0)
    model.learn(50_000)

``ISOPOPPO``, ``ISOPOA2C`` and, with sb3-contrib, ``ISOPORecurrentPPO`` take their algorithm's
arguments plus ``isopo_mode``, ``isopo_damping``, ``isopo_ema`` and ``isopo_fisher_probes`` (the
arguments of :class:`~torch_isopo.ISOPO`). ``model.isopo`` is ISOPO around the policy's optimizer
(its ``diagnostics``; its statistics are saved and loaded with the model, and a checkpoint of the
stock algorithm loads too). ``train()`` is the algorithm's own, with each minibatch's loss taken
apart:

* the policy-gradient term runs inside ``isopo.microbatch``, without its advantages: A2C's
  ``−log π``, PPO's clipped surrogate as ``−v · log π`` with ``v = surrogate_weights(...)``
  (the ratio where the clip does not bind, 0 where it does), so every epoch is an ISOPO step;
* the value loss and the entropy bonus come from a second, plain forward and add their plain
  gradients;
* then SB3's advantage normalisation (per minibatch), ``max_grad_norm`` clipping and optimizer
  step, unchanged.

In ``reinforce`` mode a ``train()`` call is the stock algorithm's.

Samples. PPO and A2C: one sample per row of the minibatch (a step, with its advantage).
RecurrentPPO: one sample per sequence of the minibatch (a step's gradient through the LSTM holds
those of the later steps, so steps cannot be samples). A sequence's steps keep their own
advantages ``A_t``: its term is ``−Σ_t (A_t / a) v_t log π_t`` and its ISOPO advantage is
``a = sqrt(Σ_t A_t²)``, so ``a`` times the term is the sequence's part of RecurrentPPO's loss, and
a one-step sequence is ISOPO on the step (``a = |A|``; ISOPO is odd in the sign it moves into the
term). The policy's LSTM then runs once over the sequences, time-major ``(T, n)`` (the episode
resets SB3 applies step by step happen only at a sequence's first step, so they are applied to its
initial state), and ``segments`` gives every row its sequence.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..optimizer import ISOPO
from ..surrogate import surrogate_weights

SUPPORTED_SB3 = ">=2.9,<2.10"
"""The Stable-Baselines3 (and sb3-contrib) releases this integration is tested with."""
_SUPPORTED = (2, 9)

try:
    import stable_baselines3
    from gymnasium import spaces
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.save_util import load_from_zip_file
    from stable_baselines3.common.utils import explained_variance
except ImportError as error:
    raise ImportError(f"torch_isopo.integrations.sb3 needs Stable-Baselines3 {SUPPORTED_SB3} "
                      f"(pip install -e '.[sb3]'): {error}") from error
try:
    import sb3_contrib
    from sb3_contrib import RecurrentPPO
except ImportError:
    sb3_contrib = RecurrentPPO = None

for _package in (stable_baselines3, sb3_contrib):
    if _package is not None and tuple(map(int, _package.__version__.split(".")[:2])) != _SUPPORTED:
        warnings.warn(f"torch_isopo.integrations.sb3 is tested with {_package.__name__} "
                      f"{SUPPORTED_SB3}, not {_package.__version__}; compare isopo_mode="
                      "'reinforce' with the stock algorithm before relying on it")

__all__ = ["ISOPOPPO", "ISOPOA2C", "ISOPORecurrentPPO", "SUPPORTED_SB3"]


class _Statistics:
    """ISOPO's own state (the moving averages of ``m``, the probe stream) as SB3 saves and loads
    a state dict; the inner optimizer's is SB3's ``policy.optimizer``."""

    def __init__(self, isopo: ISOPO):
        self.isopo = isopo

    def state_dict(self) -> dict:
        return self.isopo.state_dict()["isopo"]

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.isopo.load_state_dict({**self.isopo.optimizer.state_dict(), "isopo": state})


class _ISOPO:
    """What the algorithms share: ISOPO's settings, the wrapped optimizer, the step and the logs."""

    def __init__(self, *args, isopo_mode: str = "ntk", isopo_damping: float = 1.0,
                 isopo_ema: float | None = 0.9, isopo_fisher_probes: int | None = 250, **kwargs):
        self.isopo_mode, self.isopo_damping = isopo_mode, isopo_damping
        self.isopo_ema, self.isopo_fisher_probes = isopo_ema, isopo_fisher_probes
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        self.isopo = ISOPO(self.policy, self.policy.optimizer, mode=self.isopo_mode,
                           damping=self.isopo_damping, ema=self.isopo_ema,
                           fisher_probes=self.isopo_fisher_probes,
                           generator=torch.Generator().manual_seed(self.seed or 0))

    # -- saving and loading: ISOPO's statistics travel beside the policy's optimizer ----------
    @property
    def isopo_statistics(self) -> _Statistics:
        return _Statistics(self.isopo)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "isopo"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()
        return [*state_dicts, "isopo_statistics"], variables

    def set_parameters(self, load_path_or_dict, exact_match: bool = True, device="auto") -> None:
        """Also loads a checkpoint of the stock algorithm (ISOPO's statistics start afresh)."""
        params = load_path_or_dict
        if not isinstance(params, dict):
            _, params, _ = load_from_zip_file(params, device=device, load_data=False)
        if "isopo_statistics" not in params:
            params = {**params, "isopo_statistics": self.isopo_statistics.state_dict()}
        super().set_parameters(params, exact_match=exact_match, device=device)

    def _isopo_step(self, plain_loss: torch.Tensor) -> None:
        """Add the plain gradients, clip as SB3 does, step."""
        plain_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.isopo.step()

    def _log_isopo(self) -> None:
        """ISOPO's figures of the last step of the train() call (computed when read): the
        mean over layers of ``rho`` and ``‖c‖/‖A‖``, and the largest condition number of a
        layer's kernel."""
        layers = self.isopo.diagnostics.values()
        if layers:
            self.logger.record("isopo/rho", float(np.mean([f["rho"] for f in layers])))
            self.logger.record("isopo/c_ratio", float(np.mean([f["c_ratio"] for f in layers])))
            self.logger.record("isopo/cond", float(max(f["cond"] for f in layers)))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if mask is None else x[mask].mean()


class _PPOTrain(_ISOPO):
    """PPO's ``train()`` with the policy-gradient term inside an ISOPO microbatch (each epoch's
    minibatch an ISOPO step on the advantage-free clipped surrogate).

    The algorithm's ``_minibatch(rollout_data, actions)`` says what the loop needs: ``mask``
    (None, or a bool per row), the normalised ``advantages`` (per row), ``evaluate()`` (SB3's
    values, log-probs and entropy), ``log_prob()`` (the actor alone), and the microbatch:
    ``sample_advantages``, ``segments`` and the ``weights`` of the advantage-free term per row.
    """

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)
        entropy_losses, pg_losses, value_losses, clip_fractions = [], [], [], []
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()
                mb = self._minibatch(rollout_data, actions)
                mask, advantages = mb["mask"], mb["advantages"]

                # the policy-gradient term: ISOPO applies the advantages
                self.isopo.zero_grad()
                with self.isopo.microbatch(mb["sample_advantages"], mb["segments"]):
                    log_prob = mb["log_prob"]()
                    with torch.no_grad():
                        log_ratio = log_prob - rollout_data.old_log_prob
                        ratio = torch.exp(log_ratio)
                        policy_loss = -_masked_mean(torch.min(
                            advantages * ratio,
                            advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)), mask)
                        pg_losses.append(policy_loss.item())
                        clip_fractions.append(_masked_mean(
                            ((ratio - 1).abs() > clip_range).float(), mask).item())
                        approx_kl_div = _masked_mean(torch.exp(log_ratio) - 1 - log_ratio,
                                                     mask).cpu().numpy()
                        approx_kl_divs.append(approx_kl_div)
                    stop = self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl
                    if not stop:
                        v = surrogate_weights(log_prob, rollout_data.old_log_prob, advantages,
                                              None if mask is None else mask.to(log_prob.dtype),
                                              eps_low=clip_range)
                        (-(mb["weights"] * v * log_prob).sum()).backward()
                del log_prob

                # value loss and entropy bonus: a plain forward, plain gradients. It runs last:
                # SB3's distribution object keeps the last forward's tensors, and a graph of
                # ISOPO's layers kept there would hold the policy in a cycle through autograd
                values, plain_log_prob, entropy = mb["evaluate"]()
                values = values.flatten()
                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + torch.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
                value_loss = _masked_mean((rollout_data.returns - values_pred) ** 2, mask)
                value_losses.append(value_loss.item())
                entropy_loss = -_masked_mean(-plain_log_prob if entropy is None else entropy, mask)
                entropy_losses.append(entropy_loss.item())
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                if stop:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: "
                              f"{approx_kl_div:.2f}")
                    break
                self._isopo_step(self.ent_coef * entropy_loss + self.vf_coef * value_loss)
            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(),
                                           self.rollout_buffer.returns.flatten())
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        self._log_isopo()


class ISOPOPPO(_PPOTrain, PPO):
    """Stable-Baselines3's ``PPO`` whose policy-gradient steps are ISOPO steps (see the module
    docstring); one sample per row of a minibatch."""

    def _minibatch(self, rollout_data, actions) -> dict:
        advantages = rollout_data.advantages
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        obs = rollout_data.observations
        return dict(
            mask=None, advantages=advantages, sample_advantages=advantages, segments=None,
            weights=1.0 / len(advantages),
            evaluate=lambda: self.policy.evaluate_actions(obs, actions),
            log_prob=lambda: self.policy.get_distribution(obs).log_prob(actions))


class ISOPOA2C(_ISOPO, A2C):
    """Stable-Baselines3's ``A2C`` whose policy-gradient step is an ISOPO step on the whole
    rollout, one sample per row."""

    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            obs = rollout_data.observations
            advantages = rollout_data.advantages
            if self.normalize_advantage:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

            self.isopo.zero_grad()
            with self.isopo.microbatch(advantages):
                log_prob = self.policy.get_distribution(obs).log_prob(actions)
                (-log_prob.mean()).backward()
            policy_loss = -(advantages * log_prob.detach()).mean()
            del log_prob

            # plain forward last: SB3's distribution object keeps its tensors (see _PPOTrain)
            values, plain_log_prob, entropy = self.policy.evaluate_actions(obs, actions)
            values = values.flatten()
            value_loss = F.mse_loss(rollout_data.returns, values)
            entropy_loss = -torch.mean(-plain_log_prob if entropy is None else entropy)
            self._isopo_step(self.ent_coef * entropy_loss + self.vf_coef * value_loss)

        explained_var = explained_variance(self.rollout_buffer.values.flatten(),
                                           self.rollout_buffer.returns.flatten())
        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self._log_isopo()


def sequence_samples(advantages: torch.Tensor, mask: torch.Tensor, n_seq: int):
    """One sample per sequence of ``n_seq`` padded sequences, rows sequence-major:
    ``(a, segments, weights)`` with ``a_b = sqrt(Σ_t A_t²)`` over the sequence's real steps,
    each row's sequence id, and each row's weight ``A_t / a_b / (real steps)`` (0 for padding
    and for a sequence whose advantages are all 0)."""
    A = advantages * mask
    a = A.view(n_seq, -1).pow(2).sum(1).sqrt()
    segments = torch.arange(n_seq, device=A.device).repeat_interleave(mask.numel() // n_seq)
    scale = a[segments]
    weights = torch.where(scale > 0, A / torch.where(scale > 0, scale, 1.0), 0.0)
    return a, segments, weights / mask.sum()


if RecurrentPPO is not None:
    class ISOPORecurrentPPO(_PPOTrain, RecurrentPPO):
        """sb3-contrib's ``RecurrentPPO`` whose policy-gradient steps are ISOPO steps, one sample
        per sequence of a minibatch (see the module docstring)."""

        def _minibatch(self, rollout_data, actions) -> dict:
            mask = rollout_data.mask > 1e-8
            advantages = rollout_data.advantages
            if self.normalize_advantage:
                real = advantages[mask]
                advantages = (advantages - real.mean()) / (real.std() + 1e-8)
            obs, states = rollout_data.observations, rollout_data.lstm_states
            starts = rollout_data.episode_starts
            n_seq = states.pi[0].shape[1]
            steps = starts.view(n_seq, -1)
            if bool((steps[:, 1:] != 0).any()):
                raise ValueError(
                    "ISOPORecurrentPPO: a minibatch sequence starts an episode after its first "
                    "step; its steps would belong to two episodes. The rollout buffer must cut "
                    "sequences at episode starts, as sb3-contrib's RecurrentRolloutBuffer does")
            # SB3 resets the state at an episode start; here only at a sequence's first step
            keep = (1.0 - steps[:, :1]).view(1, n_seq, 1)
            pi_states = tuple(keep * s for s in states.pi)
            a, segments, weights = sequence_samples(advantages, mask, n_seq)
            return dict(
                mask=mask, advantages=advantages, sample_advantages=a, segments=segments,
                weights=weights,
                evaluate=lambda: self.policy.evaluate_actions(obs, actions, states, starts),
                log_prob=lambda: self.policy.get_distribution(
                    obs, pi_states, torch.zeros_like(starts))[0].log_prob(actions))
else:
    def __getattr__(name: str):
        if name == "ISOPORecurrentPPO":
            raise ImportError("ISOPORecurrentPPO needs sb3-contrib "
                              f"{SUPPORTED_SB3} (pip install -e '.[sb3]')")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
