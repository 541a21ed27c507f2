"""The verl recipe of docs/integrations.md, where verl imports: its ``isopo`` policy loss under ISOPO
``reinforce`` gives verl's ``vanilla`` PPO gradient on-policy, and its per-sequence advantages
and segments match the micro-batch."""
import copy
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402

from models import VOCAB, SeqMixer  # noqa: E402
from torch_isopo import ISOPO  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "integrations.md"


@pytest.fixture(scope="module")
def recipe():
    """The namespace of the recipe's code block, run as written in the docs."""
    verl_section = DOC.read_text().split("## verl", 1)[1]
    code = re.search(r"```python\n(.*?)```", verl_section, re.S).group(1)
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def log_probs(model, ids):
    logits = model(ids)[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_isopo_loss_under_reinforce_is_vanilla_ppo(recipe, agg):
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                               "clip_ratio_c": 3.0, "global_batch_info": {}})
    ids = torch.randint(1, VOCAB, (4, 8))
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(7)[None] < lengths[:, None]
    A = torch.tensor([1.0, -0.5, 0.25, -0.75])
    model = SeqMixer()
    reference = copy.deepcopy(model)

    lp = log_probs(reference, ids)
    vanilla, _ = get_policy_loss_fn("vanilla")(lp.detach(), lp, A[:, None].expand_as(lp), mask,
                                               agg, config)
    vanilla.backward()

    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="reinforce")
    with opt.microbatch(A):
        lp = log_probs(model, ids)
        loss, _ = recipe["isopo_policy_loss"](lp.detach(), lp, None, mask, agg, config)
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12))
        assert err < 1e-5, f"{agg}: {name} relative error {err:.2e}"


def test_sequence_advantages(recipe):
    lengths = [3, 1, 2]
    micro_batch = {
        "input_ids": torch.nested.nested_tensor([torch.arange(n + 2) for n in lengths],
                                                layout=torch.jagged),
        "advantages": torch.nested.nested_tensor([torch.full((n,), a) for n, a in
                                                  zip(lengths, [0.5, -1.0, 2.0])],
                                                 layout=torch.jagged),
    }
    advantages, segments = recipe["sequence_advantages"](micro_batch, packed=True)
    assert advantages.tolist() == [0.5, -1.0, 2.0]
    assert segments.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert recipe["sequence_advantages"](micro_batch, packed=False)[1] is None
