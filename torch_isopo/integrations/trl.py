"""ISOPO in TRL's ``GRPOTrainer``: change the trainer class, keep the script.

Example::

    from torch_isopo.integrations.trl import ISOPOGRPOConfig, ISOPOGRPOTrainer

    args = ISOPOGRPOConfig(output_dir="out", isopo_mode="ntk", isopo_damping=1.0)
    trainer = ISOPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()

The trainer builds its optimizer as TRL would (``args.optim``, or ``optimizers=(opt, None)``) and
wraps it in :class:`~torch_isopo.ISOPO`. Each microbatch's forward and backward run inside
``isopo.microbatch(|A|)``, and the loss they backpropagate is TRL's own loss for the chosen
``loss_type`` with each advantage ``A_i`` replaced by its sign ``s_i`` (``+1`` for ``A_i ≥ 0``,
``−1`` below). ISOPO then applies the advantages' sizes, layer by layer.

Why that is exact, for every ``num_iterations``. In every TRL loss type a sample's term depends
on its advantage only through a factor ``A_i`` and through the sign of ``A_i`` (which side of the
clip binds, SAPO's temperature, VESPO's shape, the off-policy mask); ratios, clipping and token
weights do not depend on its size. So the gradient of the term with ``s_i`` is ``G_i = s_i Ĝ_i``,
with ``Ĝ_i`` the advantage-free gradient under the masks of the real advantage, and
``|A_i| G_i = A_i Ĝ_i``: in ``reinforce`` mode the sum is TRL's gradient. For ``ntk`` and
``fisher``, flipping ``G_i`` and the advantage of the same samples (``S = diag(s)``) turns the
kernel into ``K = S K̂ S`` with the same trace, so ``c = ρ(SK̂S + ρI)⁻¹ S A = S ĉ``; Fisher norms
``ν_i`` only see squares and are unchanged, so ``c_i = s_i ĉ_i``. Either way ``Σ_i c_i G_i =
Σ_i ĉ_i Ĝ_i``: the ISOPO step of the advantage-free surrogate with the real masks
(``torch_isopo.surrogate`` describes it). With one iteration the ratios are 1, nothing is
clipped, and this is the on-policy advantage-free log-likelihood. Terms that do not carry the
advantage as a factor (KL, entropy bonus, MoE auxiliary loss) are refused up front.

The integration uses TRL internals (``GRPOTrainer._compute_loss``, its metrics, the fused LM
head's calling convention); it is tested with TRL ``SUPPORTED_TRL`` and raises an ``ImportError``
naming those versions when the internals it uses are missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from packaging.specifiers import SpecifierSet
from transformers import TrainerCallback

from ..optimizer import ISOPO

SUPPORTED_TRL = ">=1.16,<1.17"
"""The TRL releases this integration is tested with."""


def _unsupported(what: str) -> ImportError:
    return ImportError(f"torch_isopo.integrations.trl supports TRL {SUPPORTED_TRL} (pip install "
                       f"'trl{SUPPORTED_TRL}'), and relies on TRL internals; {what}")


try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax_and_entropy
except ImportError as error:
    raise _unsupported(f"importing them failed: {error}") from error

# What the integration reads from TRL beyond the Trainer API.
_TRAINER_METHODS = ("_compute_loss",)
_TRAINER_STATE = ("_metrics", "aux_loss_enabled", "temperature")
_CONFIG_FIELDS = ("beta", "entropy_coef", "use_adaptive_entropy", "cast_lm_head_to_fp32")


def _check_trl(trainer: GRPOTrainer | None = None) -> None:
    """Raise if the TRL internals the integration uses (of ``trainer``, once built) are missing."""
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    missing = [f"GRPOTrainer.{name}" for name in _TRAINER_METHODS
               if not callable(getattr(GRPOTrainer, name, None))]
    missing += [f"GRPOConfig.{name}" for name in _CONFIG_FIELDS if name not in fields]
    if trainer is not None:
        missing += [f"GRPOTrainer().{name}" for name in _TRAINER_STATE
                    if not hasattr(trainer, name)]
    if missing:
        raise _unsupported(f"TRL {trl.__version__} lacks {', '.join(missing)}")


_check_trl()
if trl.__version__ not in SpecifierSet(SUPPORTED_TRL, prereleases=True):
    warnings.warn(f"torch_isopo.integrations.trl is tested with TRL {SUPPORTED_TRL}, not "
                  f"{trl.__version__}; compare isopo_mode='reinforce' with GRPOTrainer before "
                  "relying on it")

__all__ = ["ISOPOGRPOConfig", "ISOPOGRPOTrainer", "SUPPORTED_TRL"]


@dataclass
class ISOPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ISOPO's settings (see :class:`~torch_isopo.ISOPO`).

    A plain ``GRPOConfig`` works too and gets these defaults.
    """

    isopo_mode: str = field(default="ntk", metadata={
        "help": "ISOPO mode: 'ntk', 'fisher' or 'reinforce' (TRL's own gradient, the A/B "
                "baseline)."})
    isopo_damping: float = field(default=1.0, metadata={
        "help": "ISOPO damping (rho / m); > 0 for 'ntk', >= 0 for 'fisher'."})
    isopo_ema: float | None = field(default=0.9, metadata={
        "help": "Moving-average factor of ISOPO's per-layer statistic, or None for per-microbatch."})
    isopo_fisher_probes: int | None = field(default=250, metadata={
        "help": "Probe positions per layer for the 'fisher' mode, or None for all of them."})


def _isopo_settings(args: GRPOConfig) -> dict:
    source = args if isinstance(args, ISOPOGRPOConfig) else ISOPOGRPOConfig
    return {"mode": source.isopo_mode, "damping": source.isopo_damping, "ema": source.isopo_ema,
            "fisher_probes": source.isopo_fisher_probes}


def _refusals(args: GRPOConfig) -> list[str]:
    """The settings that add loss terms without the advantage as a factor (ISOPO would scale
    them by the advantages), or that replace the modules ISOPO runs."""
    rules = [
        (args.beta != 0.0,
         f"beta={args.beta}: the KL term's gradient would be scaled by the advantages; set "
         "beta=0.0"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy,
         "an entropy bonus (entropy_coef, use_adaptive_entropy) would be scaled by the "
         "advantages; set entropy_coef=0.0 and use_adaptive_entropy=False"),
        (args.cast_lm_head_to_fp32,
         "cast_lm_head_to_fp32 replaces lm_head's forward with one ISOPO does not run (ISOPO "
         "computes the head's linear map itself, in the model's dtype); set it to False"),
    ]
    return [message for broken, message in rules if broken]


def _refuse(refused: list[str]) -> None:
    if refused:
        raise ValueError("ISOPO cannot train with these GRPO settings: " + "; ".join(refused))


def _find_isopo(optimizer) -> ISOPO | None:
    """The ISOPO optimizer inside ``optimizer`` (accelerate wraps it), if any."""
    while not isinstance(optimizer, ISOPO):
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return optimizer


def _through_lm_head(fused_forward, temperature: float):
    """A forward that answers TRL's ``fused_lm_head=True`` calls through the ``lm_head`` module.

    TRL's fused head multiplies the hidden states by ``lm_head.weight`` directly, where ISOPO
    cannot attribute the head's gradient to sequences. This one asks the model for the logits of
    the scored positions only and takes TRL's own log-softmax of them.
    """

    @functools.wraps(fused_forward)
    def forward(*args, **kwargs):
        if not kwargs.pop("fused_lm_head", False):
            return fused_forward(*args, **kwargs)
        if kwargs.pop("shift_labels", None) is not None:
            raise NotImplementedError("ISOPO's GRPO loss does not support pre-shifted labels")
        kwargs.pop("num_items_in_batch", None)
        labels = kwargs.pop("labels")[:, 1:]
        scored = (labels != -100).any(0).nonzero()
        keep = labels.size(1) - int(scored[0]) if len(scored) else 1
        kwargs.update(use_cache=False, logits_to_keep=keep + 1)
        logits = fused_forward(*args, **kwargs).logits
        tail = labels[:, -keep:]
        mask = tail != -100
        logps, entropy = selective_log_softmax_and_entropy(
            logits[:, :-1], tail.clamp(min=0), entropy_requires_grad=False,
            temperature=temperature, row_mask=mask)
        pad = logps.new_zeros(labels.size(0), labels.size(1) - keep)
        return FusedCausalLMOutput(log_probs=torch.cat([pad, logps], 1),
                                   entropy=torch.cat([pad, entropy], 1),
                                   label_mask=labels != -100)

    return forward


class _LogDiagnostics(TrainerCallback):
    """Adds ISOPO's per-step figures to TRL's metrics: the mean over layers of ‖c‖/‖A‖ and the
    largest kernel condition number."""

    def __init__(self, trainer: "ISOPOGRPOTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        figures = self.trainer.isopo.diagnostics.values()
        if figures:
            metrics = self.trainer._metrics["train"]
            metrics["isopo/c_ratio"].append(sum(f["c_ratio"] for f in figures) / len(figures))
            metrics["isopo/cond"].append(max(f["cond"] for f in figures))


class ISOPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose updates are ISOPO steps (see the module docstring).

    Takes the arguments of ``GRPOTrainer``; ISOPO's settings come from ``args`` when it is an
    :class:`ISOPOGRPOConfig`. ``optimizers=(opt, None)`` is wrapped in ISOPO, or used as it is
    when ``opt`` already is an ISOPO optimizer around the trainer's model. The logged ``loss``
    is that of the backpropagated objective, TRL's loss with the advantages' signs.
    """

    def __init__(self, *args, **kwargs):
        _check_trl()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            _refuse(_refusals(config))
        super().__init__(*args, **kwargs)
        _check_trl(self)
        if self.aux_loss_enabled:
            _refuse(["the MoE router auxiliary loss would be scaled by the advantages; set "
                     "router_aux_loss_coef=0.0"])
        self.isopo: ISOPO | None = _find_isopo(self.optimizer)
        self._isopo_scope: contextlib.ExitStack | None = None
        self.add_callback(_LogDiagnostics(self))

    def create_optimizer(self, model=None):
        """TRL's optimizer, wrapped in ISOPO (unless it already is one)."""
        model = self.model if model is None else model
        optimizer = super().create_optimizer(model)
        isopo = _find_isopo(optimizer)
        if isopo is None:
            # one probe stream per process: ranks with equal token counts would draw the same
            # positions from equal seeds
            seed = self.args.seed + self.accelerator.process_index
            generator = torch.Generator().manual_seed(seed)
            optimizer = self.optimizer = isopo = ISOPO(model, optimizer, generator=generator,
                                                       **_isopo_settings(self.args))
        elif isopo.model is not model:
            raise ValueError("the ISOPO optimizer passed in `optimizers` was built for another model "
                             "than the trainer's")
        self.isopo = isopo
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir):
        """Also each process's own ISOPO statistics and probe stream, next to its RNG state: the
        optimizer file holds the main process's only, and FSDP's sharded one none at all."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.isopo is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.isopo.state_dict()["isopo"], self._isopo_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else self._isopo_file(checkpoint)
        if self.isopo is not None and path is not None and os.path.isfile(path):
            own = torch.load(path, weights_only=True)
            self.isopo.load_state_dict({**self.isopo.optimizer.state_dict(), "isopo": own})

    def _isopo_file(self, folder: str) -> str:
        return os.path.join(folder, f"isopo_rank{self.accelerator.process_index}.pt")

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The ISOPO microbatch opened by the loss stays open through the backward.
        with contextlib.ExitStack() as scope:
            self._isopo_scope = scope
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._isopo_scope = None

    def _compute_loss(self, model, inputs):
        if not self.model.training:
            return super()._compute_loss(model, inputs)
        if self._isopo_scope is None or self.isopo is None:
            raise RuntimeError("ISOPOGRPOTrainer computes its training loss inside training_step, "
                               "after the optimizer is created")
        # TRL's loss sees only the signs (its masks need them), ISOPO applies the sizes.
        advantages = inputs["advantages"]
        signs = torch.ones_like(advantages).masked_fill(advantages < 0, -1.0)
        self._isopo_scope.enter_context(self.isopo.microbatch(advantages.abs()))
        target = self.accelerator.unwrap_model(self.model)
        if is_peft_model(target):
            target = target.get_base_model()
        fused = target.__dict__.get("forward")
        if fused is None:
            raise _unsupported("expected TRL's fused LM head on the model's forward")
        target.forward = _through_lm_head(fused, self.temperature)
        try:
            return super()._compute_loss(model, {**inputs, "advantages": signs})
        finally:
            target.forward = fused
