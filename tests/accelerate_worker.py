"""What each process runs under ``accelerate launch`` in ``test_scaleout.py``.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_worker.py OUT trl
    accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 2 \\
        tests/accelerate_worker.py OUT fsdp2

(with ``ACCELERATE_USE_CPU=true`` on a machine without GPUs). Each rank saves what it saw and
what it computed to ``OUT/<scenario>_rank<r>.pt``; the test recomputes it in one process.
The pieces both sides need (models, configs, data) live here too.
"""
from __future__ import annotations

import copy
import os
import sys

import torch

STEPS = 3                      # optimizer steps per run
MODES = ("ntk", "fisher")
FISHER_PROBES = 6              # fewer than the completion tokens: the probe draws matter

# -- TRL -----------------------------------------------------------------------------------------

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


def trl_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def trl_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None))


def trl_prompts():
    from datasets import Dataset
    return Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w3"]})


def reward(completions, **kwargs):
    return [c.count("w7") + 0.1 * len(c.split()) for c in completions]


def trl_config(mode: str, output_dir: str):
    """Per process two microbatches of 4 completions (one prompt's group) per step; no clipping
    (it would hide a wrongly scaled gradient), a constant learning rate, the default loss
    (``dapo``); an eos bias varies the completion lengths."""
    from torch_isopo.integrations.trl import ISOPOGRPOConfig
    return ISOPOGRPOConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", bf16=False, save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=4, num_generations=4,
        gradient_accumulation_steps=2, max_completion_length=6, max_steps=STEPS,
        learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0,
        generation_kwargs={"sequence_bias": [[[1], 2.5]]}, isopo_mode=mode,
        isopo_fisher_probes=FISHER_PROBES)


def _cpu(inputs: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for k, v in inputs.items()}


def _recording_trainer():
    from transformers import TrainerCallback

    from torch_isopo.integrations.trl import ISOPOGRPOTrainer

    class Recording(ISOPOGRPOTrainer):
        """Keeps every training microbatch as the loss saw it (after generation and scoring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.microbatches, self.grads = [], []
            self.add_callback(_Gradients(self))

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self.model.training:
                self.microbatches.append(_cpu(inputs))
            return inputs

    class _Gradients(TrainerCallback):
        """The gradients the optimizer is about to step on: after the all-reduce."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.trainer.grads.append(_full_grads(model))

    return Recording


def _full_grads(model) -> dict:
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):              # FSDP2: a sharded DTensor (collective)
            g = g.full_tensor()
        out[n] = g.detach().cpu().double().clone()
    return out


def _full_weights(model) -> dict:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().cpu().double().clone()
    return out


def run_trl(out: str, scenario: str) -> dict:
    results = {}
    for mode in MODES:
        trainer = _recording_trainer()(
            model=trl_model(), reward_funcs=reward, args=trl_config(mode, os.path.join(out, "trl")),
            train_dataset=trl_prompts(), processing_class=trl_tokenizer())
        trainer.train()
        isopo = trainer.isopo.state_dict()["isopo"]
        results[mode] = {
            "microbatches": trainer.microbatches, "grads": trainer.grads,
            "weights": _full_weights(trainer.model), "m": isopo["m"],
            "generator": isopo["generator"], "seed": trainer.isopo.generator.initial_seed(),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_class": type(trainer.model_wrapped).__name__,
        }
    return results


def main(out: str, scenario: str) -> None:
    from accelerate import PartialState
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = run_trl(out, scenario)
    rank = PartialState().process_index
    torch.save(results, os.path.join(out, f"{scenario}_rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
