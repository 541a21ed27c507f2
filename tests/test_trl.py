"""ISOPO in TRL's GRPOTrainer: in ``reinforce`` mode one step's gradients equal stock TRL's, the
other modes train offline, and settings that break ISOPO's assumptions are refused."""
import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM,  # noqa: E402
                          TrainerCallback)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from torch_isopo import ISOPO  # noqa: E402
from torch_isopo.integrations.trl import ISOPOGRPOConfig, ISOPOGRPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
PROMPTS = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w3"]})


def tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def qwen3():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None))


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
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(trainer_cls, args, model, **kwargs):
    grab = GradientsBeforeStep()
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=PROMPTS,
                          processing_class=tokenizer(), callbacks=[grab], **kwargs)
    trainer.train()
    return trainer, grab.grads


def assert_reinforce_equals_stock(loss_type="dapo", trainer_kwargs=(), **extra):
    """One step of stock TRL and of ISOPO ``reinforce`` from the same model: same completions,
    same gradients."""
    stock, want = one_step(GRPOTrainer, config(GRPOConfig, loss_type=loss_type, **extra), qwen3(),
                           **dict(trainer_kwargs))
    ours, got = one_step(ISOPOGRPOTrainer, config(loss_type=loss_type, isopo_mode="reinforce",
                                                  **extra), qwen3(), **dict(trainer_kwargs))
    for a, b in zip(stock._buffered_inputs, ours._buffered_inputs):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.equal(a["advantages"], b["advantages"])
    lengths = torch.cat([b["completion_mask"].sum(1) for b in ours._buffered_inputs])
    assert len(set(lengths.tolist())) > 1, "the test batch should mix completion lengths"
    trainable = [n for n, p in ours.model.named_parameters() if p.requires_grad]
    assert sorted(want) == sorted(got) == sorted(trainable)
    for name, g in want.items():
        err = float((got[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-5, f"{loss_type}: {name} relative error {err:.2e}"


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


def test_reinforce_equals_stock_grpo_lora():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    assert_reinforce_equals_stock(trainer_kwargs={"peft_config": lora})


@pytest.mark.parametrize("mode, extra", [("ntk", {}), ("fisher", {"bf16": True})])
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
    ({"num_iterations": 2}, "num_iterations=2"),
    ({"steps_per_generation": 4}, "steps_per_generation=4"),
    ({"beta": 0.04}, "KL term"),
    ({"entropy_coef": 0.01}, "entropy bonus"),
    ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
    ({"delta": 0.9}, "delta=0.9"),
    ({"cast_lm_head_to_fp32": True}, "cast_lm_head_to_fp32"),
])
def test_refuses_settings_that_break_isopo(setting, message):
    with pytest.raises(ValueError, match=message):
        ISOPOGRPOTrainer(model=qwen3(), reward_funcs=reward, args=config(**setting),
                         train_dataset=PROMPTS, processing_class=tokenizer())


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
