"""What each process runs under ``accelerate launch`` in ``test_scaleout.py``.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_worker.py OUT ddp
    accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 2 \\
        --mixed_precision no tests/accelerate_worker.py OUT fsdp2

(with ``ACCELERATE_USE_CPU=true`` on a machine without GPUs). Each rank saves what it saw and
what it computed to ``OUT/<engine>_rank<r>.pt``; the test recomputes it in one process.
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


def trl_config(mode: str, output_dir: str, **overrides):
    """Per process two microbatches of 4 completions (one prompt's group) per step; no clipping
    (it would hide a wrongly scaled gradient), a constant learning rate, the default loss
    (``dapo``); an eos bias varies the completion lengths."""
    from torch_isopo.integrations.trl import ISOPOGRPOConfig
    kw = dict(output_dir=output_dir, use_cpu=True, report_to="none", bf16=False,
              save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
              num_generations=4, gradient_accumulation_steps=2, max_completion_length=6,
              max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
              max_grad_norm=0.0, generation_kwargs={"sequence_bias": [[[1], 2.5]]},
              isopo_mode=mode, isopo_fisher_probes=FISHER_PROBES)
    return ISOPOGRPOConfig(**{**kw, **overrides})


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


def _param_dtype(accelerator) -> str:
    """FSDP2's compute dtype of the parameters ("None" without FSDP or mixed precision)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return str(getattr(plugin and plugin.mixed_precision_policy, "param_dtype", None))


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


def run_trl(out: str, runs: dict) -> dict:
    """``runs``: name -> (ISOPO mode, config overrides)."""
    results = {}
    for name, (mode, overrides) in runs.items():
        _reset_accelerate()
        args = trl_config(mode, os.path.join(out, "trl"), **overrides)
        trainer = _recording_trainer()(
            model=trl_model(), reward_funcs=reward, args=args, train_dataset=trl_prompts(),
            processing_class=trl_tokenizer())
        trainer.train()
        isopo = trainer.isopo.state_dict()["isopo"]
        results[name] = {
            "microbatches": trainer.microbatches, "grads": trainer.grads,
            "weights": _full_weights(trainer.model), "m": isopo["m"],
            "generator": isopo["generator"],
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_class": type(trainer.model_wrapped).__name__,
            "param_dtype": _param_dtype(trainer.accelerator),
        }
    return results


def run_resume(out: str) -> dict:
    """A one-step run that saves a checkpoint, then the same run resumed from it: the ISOPO
    state (statistics, probe stream) each process saved and the one it resumed with."""
    from torch_isopo.integrations.trl import ISOPOGRPOTrainer
    args = trl_config("fisher", os.path.join(out, "resume"), max_steps=1, save_strategy="steps",
                      save_steps=1)
    states = []
    for checkpoint in (None, os.path.join(args.output_dir, "checkpoint-1")):
        _reset_accelerate()
        trainer = ISOPOGRPOTrainer(model=trl_model(), reward_funcs=reward, args=args,
                                   train_dataset=trl_prompts(), processing_class=trl_tokenizer())
        trainer.train(resume_from_checkpoint=checkpoint)
        states.append(trainer.isopo.state_dict()["isopo"])
    return {"saved": states[0], "resumed": states[1]}


# -- a plain loop with gradient accumulation ---------------------------------------------------

GA = 2                         # microbatches per optimizer step
LR = 1e-3
ISOPO_OPTIONS = dict(damping=0.5, fisher_probes=FISHER_PROBES)


def microbatch(rank: int, step: int, k: int):
    """Rank-specific data; the ranks hold different numbers of samples."""
    from models import VOCAB
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + k)
    n, L = 2 + rank, 6
    ids = torch.randint(3, VOCAB, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, L - 2:] = 0                            # right padding in one row
    ids[0, L - 2:] = 0
    return ids, mask, torch.randn(n, generator=g, dtype=torch.float64)


def plain_model(dtype=torch.float64):
    from models import qwen3
    torch.manual_seed(0)
    return qwen3().to(dtype)


def isopo_for(model, mode: str, rank: int):
    from torch_isopo import ISOPO
    return ISOPO(model, torch.optim.AdamW(model.parameters(), lr=LR), mode=mode,
                 generator=torch.Generator().manual_seed(rank), **ISOPO_OPTIONS)


def run_plain(mode: str, mixed_precision: str, steps: int) -> dict:
    """The loop of docs/distributed.md: ISOPO built before ``prepare``, ``accumulate``."""
    from accelerate import Accelerator
    from models import lm_losses
    _reset_accelerate()
    accelerator = Accelerator(gradient_accumulation_steps=GA, mixed_precision=mixed_precision)
    rank = accelerator.process_index
    model = plain_model(torch.float64 if mixed_precision == "no" else torch.float32)
    isopo = isopo_for(model, mode, rank)
    model, opt = accelerator.prepare(model, isopo)
    inner = accelerator.unwrap_model(model)        # DDP's parameter names carry "module."
    grads = []
    for step in range(steps):
        for k in range(GA):
            ids, mask, A = microbatch(rank, step, k)
            with accelerator.accumulate(model):
                with isopo.microbatch(A):
                    accelerator.backward(lm_losses(model, ids, mask).sum())
                if accelerator.sync_gradients:
                    grads.append(_full_grads(inner))
                opt.step()
                opt.zero_grad()
    return {"grads": grads, "weights": _full_weights(inner),
            "m": isopo.state_dict()["isopo"]["m"],
            "distributed_type": str(accelerator.distributed_type),
            "model_class": type(model).__name__,
            "fsdp_units": sorted(type(m).__name__ for m in model.modules()
                                 if type(m).__name__.startswith("FSDP")),
            "param_dtype": _param_dtype(accelerator)}


def _reset_accelerate() -> None:
    """A fresh Accelerator (other mixed precision) in the same processes."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()


def fsdp_on_cpu() -> None:
    """accelerate takes its FSDP path only on accelerator devices: on CPU its state quietly
    falls back to DDP (``MULTI_CPU``), whatever the config says. After the state's own set-up,
    switch it to FSDP with the plugin the launcher configured, so that accelerate's FSDP2 code
    (sharding plan, optimizer parameter swap, ``no_sync``, mixed precision) runs on gloo."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def run(out: str, engine: str) -> dict:
    """Everything one launch runs: the trainer and the plain loop (float32 and float64; with
    FSDP2 also bf16), then a checkpoint and a resume."""
    from accelerate.utils import is_bf16_available
    if engine == "fsdp2":
        fsdp_on_cpu()
    trl_runs = {mode: (mode, {}) for mode in MODES}
    plain = {mode: run_plain(mode, "no", STEPS) for mode in MODES}
    if engine == "fsdp2" and is_bf16_available():
        plain["ntk bf16"] = run_plain("ntk", "bf16", 1)
        trl_runs["ntk bf16"] = ("ntk", {"bf16": True, "max_steps": 1})
    return {"plain": plain, "trl": run_trl(out, trl_runs), "resume": run_resume(out)}


def main(out: str, engine: str) -> None:
    import torch.distributed as dist
    with open(os.path.join(out, f"{engine}_{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(os.getpid()))                  # for the test to stop it on a timeout
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = run(out, engine)
    torch.save(results, os.path.join(out, f"{engine}_rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    # leave without destroying the process group at exit: a gloo group's destructor can
    # deadlock on the GIL with its worker threads (pytorch/pytorch#190489)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
