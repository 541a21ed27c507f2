"""ISOPO in TRL's GRPOTrainer: in ``reinforce`` mode every step's gradients equal stock TRL's
(one iteration or several per generation batch), the other modes train offline, settings that
break ISOPO's assumptions are refused, and missing TRL internals are named."""
import copy
import importlib.util
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from torch_isopo import ISOPO  # noqa: E402
import torch_isopo.integrations.trl as integration  # noqa: E402
from torch_isopo.integrations.trl import ISOPOGRPOConfig, ISOPOGRPOTrainer  # noqa: E402

from accelerate_worker import trl_model as qwen3, trl_prompts, trl_tokenizer as tokenizer  # noqa: E402,E501

PROMPTS = trl_prompts()


def reward(completions, **kwargs):
    return [c.count("w7") + 0.1 * len(c.split()) for c in completions]


def config(cls=ISOPOGRPOConfig, **overrides):
    """Two microbatches of 4 completions per step; an eos bias varies the completion lengths."""
    kw = dict(output_dir="unused", use_cpu=True, report_to="none", bf16=False, save_strategy="no",
              disable_tqdm=True, per_device_train_batch_size=4, num_generations=4,
              gradient_accumulation_steps=2, max_completion_length=6, max_steps=1,
              learning_rate=1e-2, max_grad_norm=0.0,
              generation_kwargs={"sequence_bias": [[[1], 2.5]]})
    return cls(**{**kw, **overrides})


class GradientsBeforeStep(TrainerCallback):
    """The gradients of every optimizer step (the last one as ``grads``)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None})
        self.grads = self.steps[-1]


def one_step(trainer_cls, args, model, callback=None, **kwargs):
    grab = callback or GradientsBeforeStep()
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=PROMPTS,
                          processing_class=tokenizer(), callbacks=[grab], **kwargs)
    trainer.train()
    return trainer, grab.grads


def with_simulated_vllm_importance_sampling(cls):
    """``cls`` whose loss applies a vLLM-style importance-sampling correction: random per-token
    ratios in [0.5, 1.5], with TRL's loss taking its vLLM branch (generation stays local)."""
    class Simulated(cls):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            g = torch.Generator().manual_seed(0)
            out["importance_sampling_ratio"] = 0.5 + torch.rand(out["completion_mask"].shape,
                                                                generator=g)
            return out

        def _compute_loss(self, model, inputs):
            self.use_vllm = True
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self.use_vllm = False
    return Simulated


def assert_reinforce_equals_stock(loss_type="dapo", trainer_kwargs=(), simulate_is=False,
                                  **extra):
    """Stock TRL and ISOPO ``reinforce`` from the same model: same completions, same gradients
    at every optimizer step. Returns the stock trainer's logs."""
    base = (with_simulated_vllm_importance_sampling(GRPOTrainer) if simulate_is
            else GRPOTrainer)
    mine = (with_simulated_vllm_importance_sampling(ISOPOGRPOTrainer) if simulate_is
            else ISOPOGRPOTrainer)
    want, got = GradientsBeforeStep(), GradientsBeforeStep()
    stock, _ = one_step(base, config(GRPOConfig, loss_type=loss_type, **extra), qwen3(),
                        want, **dict(trainer_kwargs))
    ours, _ = one_step(mine, config(loss_type=loss_type, isopo_mode="reinforce", **extra),
                       qwen3(), got, **dict(trainer_kwargs))
    for a, b in zip(stock._buffered_inputs, ours._buffered_inputs):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.equal(a["advantages"], b["advantages"])
    lengths = torch.cat([b["completion_mask"].sum(1) for b in ours._buffered_inputs])
    assert len(set(lengths.tolist())) > 1, "the test batch should mix completion lengths"
    advantages = torch.cat([b["advantages"] for b in ours._buffered_inputs])
    assert (advantages < 0).any() and (advantages > 0).any()
    trainable = [n for n, p in ours.model.named_parameters() if p.requires_grad]
    assert len(want.steps) == len(got.steps) == stock.args.max_steps
    for step, (w, g) in enumerate(zip(want.steps, got.steps)):
        assert sorted(w) == sorted(g) == sorted(trainable)
        for name, gw in w.items():
            err = float((g[name] - gw).norm() / gw.norm().clamp_min(1e-12))
            assert err < 1e-5, f"{loss_type}, step {step}: {name} relative error {err:.2e}"
    return stock.state.log_history


@pytest.mark.parametrize("loss_type, extra", [
    ("dapo", {}),
    ("grpo", {"top_entropy_quantile": 0.5}),
    ("bnpo", {"gradient_checkpointing": False}),
    ("dr_grpo", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}),
    ("luspo", {"importance_sampling_level": "sequence"}),
    ("cispo", {"epsilon_high": 0.5}),
    ("sapo", {}),
    ("vespo", {}),
])
def test_reinforce_equals_stock_grpo(loss_type, extra):
    assert_reinforce_equals_stock(loss_type, **extra)


def signs_matter(logs, loss_type):
    """Whether some negative-advantage token was clipped below (what the masks of a positive
    advantage would have kept); sign-independent losses (CISPO) need no check."""
    return loss_type == "cispo" or any(h.get("clip_ratio/low_mean", 0) > 0 for h in logs)


# Several iterations per generation batch: the later ones are off-policy, ratios leave 1 and
# clip (a large learning rate makes sure they do), and the clip masks follow the advantages' signs.
# SGD: rounding differences of a step's gradients (TRL's fused head and the lm_head module
# round differently) stay as small in the next step's parameters; Adam's first, sign-like step
# would magnify them.
OFF_POLICY = dict(learning_rate=0.3, optim="sgd", epsilon=0.05, logging_steps=1)
ITERATED = [
    ("dapo", {}),
    ("grpo", {}),
    ("dr_grpo", {}),
    ("bnpo", {}),
    ("cispo", {"epsilon_high": 1.1}),
    ("dapo", {"importance_sampling_level": "sequence"}),          # GSPO
]


@pytest.mark.parametrize("iterations", [2, 4])
@pytest.mark.parametrize("loss_type, extra", ITERATED,
                         ids=["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "gspo"])
def test_reinforce_equals_stock_grpo_iterations(loss_type, extra, iterations):
    logs = assert_reinforce_equals_stock(loss_type, num_iterations=iterations, max_steps=iterations,
                                         **OFF_POLICY, **extra)
    assert signs_matter(logs, loss_type), "the test should clip below"


@pytest.mark.parametrize("loss_type, extra", [
    ("luspo", {"importance_sampling_level": "sequence"}),
    ("sapo", {}),
    ("vespo", {}),
    ("dapo", {"delta": 1.1}),                              # two-sided clipping
    ("dapo", {"off_policy_mask_threshold": 1e-3}),         # drops off-policy negative sequences
    ("grpo", {"top_entropy_quantile": 0.5, "gradient_checkpointing": False}),
])
def test_reinforce_equals_stock_grpo_off_policy_options(loss_type, extra):
    logs = assert_reinforce_equals_stock(loss_type, num_iterations=2, max_steps=2, **OFF_POLICY,
                                         **extra)
    assert signs_matter(logs, loss_type) or loss_type in ("sapo", "vespo")


def test_reinforce_equals_stock_grpo_generation_batch_outlives_step():
    """steps_per_generation = 2 × gradient_accumulation_steps: TRL keeps π_old for the second
    optimizer step of each generation batch."""
    logs = assert_reinforce_equals_stock(steps_per_generation=4, max_steps=2, **OFF_POLICY)
    assert signs_matter(logs, "dapo")


@pytest.mark.parametrize("loss_type", ["dapo", "vespo"])
def test_reinforce_equals_stock_grpo_importance_sampling(loss_type):
    assert_reinforce_equals_stock(loss_type, simulate_is=True, num_iterations=2, max_steps=2,
                                  **OFF_POLICY)


def test_reinforce_equals_stock_grpo_lora():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    assert_reinforce_equals_stock(trainer_kwargs={"peft_config": lora})


@pytest.mark.parametrize("mode, extra", [("ntk", {}), ("fisher", {"bf16": True}),
                                         ("ntk", {"num_iterations": 2})])
def test_isopo_trains_offline(mode, extra):
    model = qwen3()
    before = copy.deepcopy(model.state_dict())
    trainer, grads = one_step(ISOPOGRPOTrainer, config(isopo_mode=mode, max_steps=3,
                                                       logging_steps=1, **extra), model)
    assert isinstance(trainer.isopo, ISOPO) and trainer.isopo.mode == mode
    assert "isopo" in trainer.optimizer.state_dict()       # checkpoints carry ISOPO's statistics
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    logs = [h for h in trainer.state.log_history if "isopo/c_ratio" in h]
    assert len(logs) == 3
    assert all(math.isfinite(h["loss"]) and h["isopo/c_ratio"] > 0 for h in logs)
    if mode == "ntk":   # c = ρ(K + ρI)⁻¹A shrinks A unless the kernel vanishes
        assert all(h["isopo/c_ratio"] < 1 for h in logs)


def test_wraps_the_given_optimizer_and_schedule():
    model = qwen3()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer, _ = one_step(ISOPOGRPOTrainer, config(lr_scheduler_type="linear"), model,
                          optimizers=(sgd, None))
    assert trainer.isopo.optimizer is sgd
    assert sgd.param_groups[0]["lr"] < 0.1              # the trainer's scheduler reached it

    model = qwen3()
    isopo = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="reinforce")
    trainer, _ = one_step(ISOPOGRPOTrainer, config(), model, optimizers=(isopo, None))
    assert trainer.isopo is isopo

    model = qwen3()
    other = ISOPO(qwen3(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="another model"):
        one_step(ISOPOGRPOTrainer, config(), model, optimizers=(other, None))


@pytest.mark.parametrize("setting, message", [
    ({"beta": 0.04}, "KL term"),
    ({"entropy_coef": 0.01}, "entropy bonus"),
    ({"use_adaptive_entropy": True}, "entropy bonus"),
    ({"cast_lm_head_to_fp32": True}, "cast_lm_head_to_fp32"),
])
def test_refuses_settings_that_break_isopo(setting, message):
    with pytest.raises(ValueError, match=message):
        ISOPOGRPOTrainer(model=qwen3(), reward_funcs=reward, args=config(**setting),
                         train_dataset=PROMPTS, processing_class=tokenizer())


SUPPORTED = re.escape(f"TRL {integration.SUPPORTED_TRL}")


def build(**setting):
    return ISOPOGRPOTrainer(model=qwen3(), reward_funcs=reward, args=config(**setting),
                            train_dataset=PROMPTS, processing_class=tokenizer())


def test_missing_trainer_internals_are_named(monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_compute_loss")
    with pytest.raises(ImportError, match=SUPPORTED + r".*GRPOTrainer\._compute_loss"):
        build()


def test_missing_trainer_state_is_named(monkeypatch):
    init = GRPOTrainer.__init__

    def without_metrics(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self._metrics
    monkeypatch.setattr(GRPOTrainer, "__init__", without_metrics)
    with pytest.raises(ImportError, match=SUPPORTED + r".*GRPOTrainer\(\)\._metrics"):
        build()


def import_afresh(monkeypatch):
    """Execute the integration module again, as a first import would."""
    spec = importlib.util.spec_from_file_location("torch_isopo.integrations.trl_afresh",
                                                  integration.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)    # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_import_names_the_supported_trl(monkeypatch):
    import trl.trainer.utils

    monkeypatch.delattr(trl.trainer.utils, "FusedCausalLMOutput")
    with pytest.raises(ImportError, match=SUPPORTED + ".*FusedCausalLMOutput"):
        import_afresh(monkeypatch)


def test_untested_trl_version_warns(monkeypatch):
    import trl

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_afresh(monkeypatch)                  # the installed TRL is a supported one
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match=SUPPORTED + ", not 1.17.0"):
        import_afresh(monkeypatch)


def test_example_script(tmp_path, monkeypatch):
    path = Path(__file__).parents[1] / "examples" / "trl_grpo.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_example", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)    # its dataclasses look themselves up
    spec.loader.exec_module(example)
    trainer = example.main(["--max_steps", "2", "--output_dir", str(tmp_path),
                            "--max_completion_length", "4", "--disable_tqdm", "true"])
    assert trainer.state.global_step == 2
    assert any("isopo/c_ratio" in h for h in trainer.state.log_history)
