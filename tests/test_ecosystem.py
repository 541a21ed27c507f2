"""ISOPO inside the tools users already train with: accelerate, the Hugging Face ``Trainer``
(through ``ISOPO.factory``), PEFT LoRA and mixture-of-experts models."""
import copy

import pytest
import torch
from torch import nn

from conftest import assert_matches_reference
from models import VOCAB, SeqMixer, lm_losses, qwen3
from torch_isopo import ISOPO

accelerate = pytest.importorskip("accelerate")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _batch(g: torch.Generator, n: int = 3, L: int = 6):
    ids = torch.randint(3, VOCAB, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[-1, L - 2:] = 0
    ids[-1, L - 2:] = 0
    return ids, mask, torch.randn(n, generator=g)


def _max_rel_err(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).norm() / q.norm().clamp_min(1e-30))
               for p, q in zip(a.parameters(), b.parameters()))


# -- accelerate -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_accelerate_prepare_scheduler_and_accumulation(mode):
    from accelerate import Accelerator
    g = torch.Generator().manual_seed(0)
    microbatches = [_batch(g) for _ in range(4)]

    def isopo_with_scheduler(model):
        opt = ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-2), mode=mode)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)

    torch.manual_seed(0)
    model = SeqMixer()
    manual = copy.deepcopy(model)

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    prepared, opt, sched = accelerator.prepare(model, *isopo_with_scheduler(model))
    isopo = opt.optimizer
    for k, (ids, mask, A) in enumerate(microbatches):
        with accelerator.accumulate(prepared):
            with isopo.microbatch(A):
                accelerator.backward(lm_losses(prepared, ids, mask).sum())
            opt.step()
            sched.step()
            opt.zero_grad()
        if k == 0:   # nothing moves inside an accumulation window
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), manual.parameters()))
    assert isopo.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 2)
    assert all(d["microbatches"] == 2 for d in isopo.diagnostics.values())

    # the same microbatches, accumulated by hand: each loss over the number of microbatches
    ref_opt, ref_sched = isopo_with_scheduler(manual)
    for start in (0, 2):
        for ids, mask, A in microbatches[start:start + 2]:
            with ref_opt.microbatch(A):
                (lm_losses(manual, ids, mask).sum() / 2).backward()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    assert _max_rel_err(model, manual) < 1e-6


# -- Hugging Face Trainer, optimizer built by ISOPO.factory ------------------------------------

def _trainer_class():
    from transformers import Trainer

    class ISOPOTrainer(Trainer):
        """A Trainer whose batches carry one advantage per sequence.

        Forward and backward of a training step run inside ISOPO's microbatch; the loss is the
        advantage-free token-mean negative log-likelihood (ISOPO applies the advantages).
        """

        def training_step(self, model, inputs, num_items_in_batch=None):
            opt = self.optimizer
            while not isinstance(opt, ISOPO):          # unwrap accelerate's wrapper
                opt = opt.optimizer
            inputs = dict(inputs)
            self.seen.append({k: v.clone() for k, v in inputs.items()})
            with opt.microbatch(inputs.pop("advantages")):
                return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return lm_losses(model, inputs["input_ids"], inputs["attention_mask"]).sum()

    return ISOPOTrainer


def test_trainer_optimizer_from_factory(tmp_path):
    from transformers import TrainingArguments
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        ids, mask, A = _batch(g, n=4)
        rows += [{"input_ids": i, "attention_mask": m, "advantages": a}
                 for i, m, a in zip(ids, mask, A)]
    torch.manual_seed(0)
    model = qwen3()
    manual = copy.deepcopy(model)
    isopo_kwargs = dict(mode="ntk", damping=0.5)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=1.0, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=rows,
        data_collator=lambda batch: {k: torch.stack([r[k] for r in batch]) for k in batch[0]},
        optimizer_cls_and_kwargs=(ISOPO.factory(model, torch.optim.AdamW, **isopo_kwargs),
                                  {"lr": 1e-3}))
    trainer.seen = []
    trainer.train()
    isopo = trainer.optimizer.optimizer
    assert isinstance(isopo, ISOPO) and isopo.mode == "ntk" and isopo.model is model
    assert len(trainer.seen) == 2

    # the same batches by hand: ISOPO around AdamW, clipping, constant learning rate
    opt = ISOPO(manual, torch.optim.AdamW(manual.parameters(), lr=1e-3, weight_decay=0.0),
                **isopo_kwargs)
    for batch in trainer.seen:
        with opt.microbatch(batch["advantages"]):
            lm_losses(manual, batch["input_ids"], batch["attention_mask"]).sum().backward()
        torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert _max_rel_err(model, manual) < 1e-5


def test_factory_checks_its_arguments():
    model = SeqMixer()
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        ISOPO.factory(model, torch.optim.AdamW, lr=1e-3)
    cls = ISOPO.factory(model, torch.optim.SGD, mode="fisher")
    assert issubclass(cls, ISOPO)
    with pytest.raises(ValueError, match="not parameters of the model"):
        cls(SeqMixer().parameters(), lr=0.1)
    opt = cls([{"params": [p]} for p in model.parameters()], lr=0.1)
    assert opt.mode == "fisher" and len(opt.param_groups) == len(list(model.parameters()))
    for bad, match in (({"mode": "nope"}, "unknown mode"), ({"damping": -1}, "damping"),
                       ({"ema": 2.0}, "ema")):
        with pytest.raises(ValueError, match=match):       # when the factory is made
            ISOPO.factory(model, torch.optim.AdamW, **bad)


# -- PEFT LoRA --------------------------------------------------------------------------------

def test_dora_is_refused_when_building():
    """peft's DoRA runs the LoRA factors on an identity matrix for its magnitude: refused with
    the fix, before anything is attached."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(qwen3().double(), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"peft's DoRA.*use_dora=False"):
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_lora_adapters_get_exact_isopo_gradient(mode):
    peft = pytest.importorskip("peft")
    base = qwen3().double()
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False))                      # random B: every adapter gets a gradient
    g = torch.Generator().manual_seed(1)
    ids, mask, _ = _batch(g)
    A = torch.randn(3, generator=g, dtype=torch.float64)
    # frozen parameters get no gradient (checked inside)
    m, opt = assert_matches_reference(model, lambda mm: lm_losses(mm, ids, mask), A, mode)

    # the frozen base costs nothing: its modules are not layers and keep their own forward
    names = [n for layer in opt.layers for n in layer.param_names]
    assert names and all(".lora_" in n for n in names)
    assert {id(p) for layer in opt.layers for p in layer.params} == {
        id(p) for p in m.parameters() if p.requires_grad}
    for name, module in m.named_modules():
        if ".lora_" not in name and "forward" in module.__dict__:
            raise AssertionError(f"frozen module {name} was patched")


# -- mixture of experts -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_moe_block_over_all_tokens_with_segments(mode):
    """A Hugging Face MoE block maps all tokens to their outputs: with one sample id per token
    (``segments``) the experts are a black-box layer with exact per-sample gradients."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    if not hasattr(modeling_qwen3_moe, "Qwen3MoeExperts"):
        pytest.skip("this transformers runs Qwen3-MoE experts on gathered rows")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager", experts_implementation="eager")).double()
    ids, mask, _ = _batch(torch.Generator().manual_seed(2))
    seg = torch.arange(3).repeat_interleave(ids.shape[1])
    A = torch.randn(3, dtype=torch.float64)
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), A, mode, segments=seg)


class GatheredExperts(nn.Module):
    """Experts that run on the rows routed to them: their rows are a subset of the tokens."""

    def __init__(self, d=8, experts=2):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, h):
        flat = h.reshape(-1, h.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == e).flatten()
            out = out.index_add(0, rows, expert(flat[rows]))
        return out.view_as(h)


def test_moe_experts_on_gathered_rows_are_refused():
    model = nn.Sequential(nn.Embedding(VOCAB, 8), GatheredExperts(), nn.Linear(8, VOCAB))
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids = torch.randint(0, VOCAB, (3, 5))
    with pytest.raises(ValueError, match=r"module '1\.router' input: the input has 15 rows"):
        with opt.microbatch(torch.randn(3)):
            model(ids)
    seg = torch.arange(3).repeat_interleave(5)       # one sample id per token: the router passes
    with pytest.raises(ValueError, match=r"module '1\.experts\.\d' input: segments has 15 "):
        with opt.microbatch(torch.randn(3), seg):
            model(ids)
