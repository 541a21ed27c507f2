"""ISOPO in TRL's ``GRPOTrainer``: change the trainer class, keep the script.

Example::

    from torch_isopo.integrations.trl import ISOPOGRPOConfig, ISOPOGRPOTrainer

    args = ISOPOGRPOConfig(output_dir="out", isopo_mode="ntk", isopo_damping=1.0)
    trainer = ISOPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)
    trainer.train()

The trainer builds its optimizer as TRL would (``args.optim``, or ``optimizers=(opt, None)``) and
wraps it in :class:`~torch_isopo.ISOPO`. Each microbatch's forward and backward run inside
``isopo.microbatch(advantages)``, and the loss they backpropagate is TRL's own loss for the chosen
``loss_type`` with every advantage set to 1: the advantage-free log-likelihood, with TRL's token
weights (aggregation, masks, importance-sampling corrections). ISOPO then applies the real
advantages, layer by layer.

That is exact because ISOPO trains on-policy. With one iteration per generation batch the ratio
π/π_old is 1 with gradient ∇log π, where every TRL loss type's gradient is the advantage times a
detached weight times ∇log π, the same weight for any advantage. The settings under which that
fails, or which add terms that ISOPO would scale by the advantages, are refused up front.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax_and_entropy

from ..optimizer import ISOPO

__all__ = ["ISOPOGRPOConfig", "ISOPOGRPOTrainer"]


@dataclass
class ISOPOGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ISOPO's settings (see :class:`~torch_isopo.ISOPO`).

    A plain ``GRPOConfig`` works too and gets these defaults.
    """

    isopo_mode: str = field(default="ntk", metadata={
        "help": "ISOPO mode: 'ntk', 'fisher' or 'reinforce' (plain REINFORCE, the A/B baseline)."})
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
    """The settings that break ISOPO's assumptions (on-policy data, an advantage-free loss)."""
    rules = [
        (args.num_iterations != 1,
         f"num_iterations={args.num_iterations}: later iterations reuse the batch off-policy "
         "(importance ratios); ISOPO needs num_iterations=1"),
        (args.gradient_accumulation_steps % args.steps_per_generation != 0,
         f"steps_per_generation={args.steps_per_generation} does not divide "
         f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a generation batch would "
         "outlive an optimizer step and be trained on off-policy"),
        (args.beta != 0.0,
         f"beta={args.beta}: a KL term in the loss would be scaled by the advantages; set beta=0.0"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy,
         "an entropy bonus (entropy_coef, use_adaptive_entropy) in the loss would be scaled by the "
         "advantages; set entropy_coef=0.0 and use_adaptive_entropy=False"),
        (args.off_policy_mask_threshold is not None,
         "off_policy_mask_threshold masks sequences by the sign of their advantage, which the "
         "advantage-free loss does not see; leave it None"),
        (args.delta is not None and args.delta < 1.0,
         f"delta={args.delta} < 1 clips the on-policy ratio itself; use delta >= 1 or None"),
        (args.loss_type == "vespo" and args.use_vllm and args.vllm_importance_sampling_correction,
         "loss_type='vespo' with vLLM importance sampling weighs sequences by the sign of their "
         "advantage; set vllm_importance_sampling_correction=False or pick another loss_type"),
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
    is that of the backpropagated advantage-free objective, a constant (−1 for ``dapo``).
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            _refuse(_refusals(config))
        super().__init__(*args, **kwargs)
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
        advantages = inputs["advantages"]
        self._isopo_scope.enter_context(self.isopo.microbatch(advantages))
        target = self.accelerator.unwrap_model(self.model)
        if is_peft_model(target):
            target = target.get_base_model()
        fused = target.__dict__.get("forward")
        if fused is None:
            raise RuntimeError("expected TRL's fused LM head on the model's forward")
        target.forward = _through_lm_head(fused, self.temperature)
        try:
            return super()._compute_loss(model, {**inputs, "advantages": torch.ones_like(advantages)})
        finally:
            target.forward = fused
