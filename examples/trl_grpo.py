"""GRPO fine-tuning with ISOPO in TRL: a script to adapt.

    python examples/trl_grpo.py                         # tiny random-init Qwen3, offline, CPU
    python examples/trl_grpo.py --model_name_or_path Qwen/Qwen3-0.6B --bf16 \\
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 64 \\
        --learning_rate 1e-6 --max_steps 200 --isopo_mode ntk --isopo_damping 1.0

Several processes, with accelerate (each process trains on its own share of the completions;
the update is the mean of their ISOPO updates, and ISOPO's statistics stay per process)::

    accelerate launch --multi_gpu --num_processes 8 examples/trl_grpo.py \\
        --model_name_or_path Qwen/Qwen3-0.6B --bf16 true            # DDP, one process per GPU
    accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 8 \\
        examples/trl_grpo.py --model_name_or_path Qwen/Qwen3-0.6B --bf16 true      # FSDP2
    accelerate launch --multi_gpu --num_processes 2 examples/trl_grpo.py --use_cpu true
                                                    # two CPU processes (gloo), the tiny model

Without GPUs ``--use_cpu true`` is required: otherwise the processes are independent runs.

Every ``GRPOConfig`` option works on the command line (or in a ``--config`` YAML file), plus
ISOPO's: ``--isopo_mode {ntk,fisher,reinforce}``, ``--isopo_damping``, ``--isopo_ema``,
``--isopo_fisher_probes``. ``--isopo_mode reinforce`` is the plain-gradient baseline to compare
against. TRL logs as usual, with ISOPO's ``isopo/c_ratio`` and ``isopo/cond`` added.

The toy task: echo the prompt's last word; the reward is the share of completion words equal to
it. Replace ``make_dataset`` and ``echo_reward`` with your own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast,
                          Qwen3Config, Qwen3ForCausalLM)
from trl import TrlParser

from torch_isopo.integrations.trl import ISOPOGRPOConfig, ISOPOGRPOTrainer

WORDS = [f"w{i}" for i in range(16)]


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A model path or hub id; a tiny random-init Qwen3 when unset."})
    num_prompts: int = field(default=64, metadata={"help": "Prompts in the toy data set."})


def tiny_model_and_tokenizer():
    """A random-init Qwen3 and a word-level tokenizer, built without any download."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>", padding_side="left")
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    return Qwen3ForCausalLM(config), tokenizer


def make_dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_dict({"prompt": [" ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
                                         for _ in range(n)]})


def echo_reward(prompts, completions, **kwargs) -> list[float]:
    """Share of the completion's words that repeat the prompt's last word."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        words = completion.split()
        rewards.append(words.count(prompt.split()[-1]) / max(len(words), 1))
    return rewards


def main(argv=None) -> ISOPOGRPOTrainer:
    parser = TrlParser((ScriptArguments, ISOPOGRPOConfig))
    parser.set_defaults_with_config(
        output_dir="trl_grpo_isopo", per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, max_steps=20, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", save_strategy="no", bf16=False)
    script, config = parser.parse_args_and_config(argv)
    if script.model_name_or_path is None:
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path, padding_side="left")
    trainer = ISOPOGRPOTrainer(model=model, reward_funcs=echo_reward, args=config,
                               train_dataset=make_dataset(script.num_prompts, config.seed),
                               processing_class=tokenizer)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
