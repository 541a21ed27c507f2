"""The Python code blocks of README.md and docs/*.md run as written, on CPU.

Every ```` ```python ```` block carries a marker, an HTML comment on the line just above its
fence (invisible when rendered):

* ``<!-- snippet: run -->``: run it as it is, in a fresh namespace.
* ``<!-- snippet: run with=NAME -->``: run it after the prelude ``PRELUDES[NAME]`` below, which
  defines what the fragment takes from its context (``model``, ``batch``, ``opt``, …).
* ``needs=mod1,mod2`` (with ``run``): skip unless those modules import.
* ``<!-- snippet: skip REASON -->``: never run (a signature, code that needs a GPU cluster).

A block without a marker fails the test, so each new block is either run or skipped on purpose.
Blocks run in a temporary working directory (``output_dir="out"`` lands there); a prelude's
``teardown`` code runs after its block.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^(?P<marker>[ \t]*<!--\s*snippet:(?P<spec>[^>]*?)-->[ \t]*\n)?"
                   r"(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)

# -- preludes: what the fragments take from their context -----------------------------------
LM = """
import torch
from torch import nn
from types import SimpleNamespace
from torch_isopo import ISOPO

class TinyLM(nn.Module):
    def __init__(self, vocab=16, d=8):
        super().__init__()
        self.tok, self.norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.tok(ids).cumsum(1)))

def token_logprobs(model, batch):
    logits = model(batch.ids[:, :-1])
    return logits.log_softmax(-1).gather(-1, batch.ids[:, 1:, None]).squeeze(-1)

def make_batch(n=4, L=6):
    ids = torch.randint(0, 16, (n, L))
    mask = torch.ones(n, L - 1)
    mask[0, -2:] = 0                                   # padding
    batch = SimpleNamespace(ids=ids, mask=mask, advantages=torch.randn(n))
    with torch.no_grad():
        batch.old_logp = token_logprobs(model, batch)
    return batch

torch.manual_seed(0)
model = TinyLM()
batches = [make_batch() for _ in range(2)]
batch = batches[0]
advantages, mask, lr = batch.advantages, batch.mask, 1e-3
"""
STEPPED = LM + """
opt = ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-3), mode="ntk")
with opt.microbatch(batch.advantages):
    (-(token_logprobs(model, batch) * batch.mask).sum() / batch.mask.sum()).backward()
opt.step()
opt.zero_grad()
"""
RECIPES = STEPPED + """
import copy
reference = copy.deepcopy(model).requires_grad_(False)
logp, beta = token_logprobs, 0.1

def kl_to_reference(model, batch):
    p = model(batch.ids).log_softmax(-1)
    return (p.exp() * (p - reference(batch.ids).log_softmax(-1))).sum(-1).mean()

def minibatches(batch):
    half = len(batch.advantages) // 2
    return [SimpleNamespace(ids=batch.ids[s], mask=batch.mask[s], old_logp=batch.old_logp[s],
                            advantages=batch.advantages[s])
            for s in (slice(None, half), slice(half, None))]

epochs, isopo, ckpt, rank = 2, opt, ".", 0
"""
HF = """
import torch
from torch_isopo import ISOPO
from models import qwen3
model = qwen3()
base = model
def hf_losses(model, mb):
    logits = model(input_ids=mb.ids).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, mb.ids[:, 1:, None]).squeeze(-1)
    return -logp.sum() / logp.numel()
"""
DISTRIBUTED = """
import os
import torch.distributed as dist
from types import SimpleNamespace
dist.init_process_group("gloo", init_method=f"file://{os.path.abspath('store')}", rank=0,
                        world_size=1)
local_rank = 0

class Rollouts:
    def __init__(self):
        self.mbs = [SimpleNamespace(ids=torch.randint(3, 32, (3, 6)), advantages=torch.randn(3))
                    for _ in range(2)]
    def microbatches(self):
        return self.mbs

local_batches = [Rollouts()]
loss = hf_losses
"""
ACCELERATE = HF + """
from types import SimpleNamespace
from accelerate import Accelerator
microbatches = [SimpleNamespace(ids=torch.randint(3, 32, (3, 6)), advantages=torch.randn(3))
                for _ in range(2)]
loss, seed = hf_losses, 0
"""
TRAINER = HF + """
rows = [{"input_ids": torch.randint(3, 32, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
         "advantages": torch.randn(())} for _ in range(4)]
"""
TRL = """
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import Qwen3Config, Qwen3ForCausalLM
WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                              unk_token="<unk>", padding_side="left")
tiny = Qwen3ForCausalLM(Qwen3Config(
    vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, bos_token_id=None))
with torch.no_grad():      # short completions (P(eos) about 0.4 per token) keep the run fast
    tiny.model.embed_tokens.weight[:, 0] = 10.0
    tiny.lm_head.weight[1, 0] = 0.75
tiny.save_pretrained("Qwen/Qwen3-0.6B")              # the hub id resolves to this local folder
tok.save_pretrained("Qwen/Qwen3-0.6B")
dataset = Dataset.from_dict({"prompt": ["w1 w2 w3"]})

def my_reward(completions, **kwargs):
    return [c.count("w7") + 0.1 * len(c.split()) for c in completions]
"""
PPO = """
import torch
from torch import nn
from torch.distributions import Normal
from torch_isopo import ISOPO

class Actor(nn.Module):
    def __init__(self):
        super().__init__()
        self.actor_mean = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        self.actor_logstd = nn.Parameter(torch.zeros(1, 1))
    def dist(self, x):
        mean = self.actor_mean(x)
        return Normal(mean, self.actor_logstd.expand_as(mean).exp())

class Agent(nn.Module):                       # CleanRL's, with a trunk shared by actor and critic
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 16), nn.Tanh())
        self.actor_mean, self.critic = nn.Linear(16, 1), nn.Linear(16, 1)
        self.actor_logstd = nn.Parameter(torch.zeros(1, 1))
    def actor_dist(self, x):
        mean = self.actor_mean(self.trunk(x))
        return Normal(mean, self.actor_logstd.expand_as(mean).exp())
    def get_value(self, x):
        return self.critic(self.trunk(x))
    def get_action_and_value(self, x, action):
        d = self.actor_dist(x)
        return action, d.log_prob(action).sum(1), d.entropy().sum(1), self.get_value(x)

torch.manual_seed(0)
actor, agent = Actor(), Agent()
critic = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
b_obs, b_actions = torch.randn(64, 3), torch.randn(64, 1)
with torch.no_grad():
    b_logprobs = actor.dist(b_obs).log_prob(b_actions).sum(1)
b_advantages, b_returns = torch.randn(64), torch.randn(64)
update_epochs, minibatch_size, clip_coef, vf_coef, max_grad_norm = 2, 16, 0.2, 0.5, 0.5
idx = torch.arange(16)
mb_adv = b_advantages[idx]
from torch_isopo import surrogate_weights
"""
RULES = """
import torch
from torch import nn

class Affine(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
    def forward(self, x):
        return x * self.scale + self.shift
"""
PRELUDES = {
    "lm": (LM, ""),
    "stepped": (STEPPED, ""),
    "recipes": (RECIPES, ""),
    "hf": (HF, ""),
    "ddp": (HF + DISTRIBUTED, ""),
    "accelerate": (ACCELERATE, "from accelerate.state import AcceleratorState, GradientState\n"
                               "AcceleratorState._reset_state(True)\nGradientState._reset_state()"),
    "trainer": (TRAINER, ""),
    "trl": (TRL, ""),
    "rules": (RULES, ""),
    "ppo": (PPO, ""),
}


def blocks():
    for path in FILES:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))       # lines before the code
            yield pytest.param(path, line, m.group("spec"), textwrap.dedent(m.group("code")),
                               id=f"{path.relative_to(ROOT)}:{line}")


def parse(spec: str | None) -> dict:
    words = (spec or "").split()
    out = {"action": words[0] if words else None}
    out.update(w.split("=", 1) for w in words[1:] if "=" in w)
    return out


@pytest.mark.parametrize("path, line, spec, code", list(blocks()))
def test_snippet(path, line, spec, code, tmp_path, monkeypatch):
    where = f"{path.relative_to(ROOT)}:{line + 1}"
    marker = parse(spec)
    assert marker["action"] in ("run", "skip"), (
        f"{where}: put <!-- snippet: run -->, <!-- snippet: run with=PRELUDE --> or "
        "<!-- snippet: skip REASON --> on the line above the ```python fence "
        "(tests/test_snippets.py)")
    if marker["action"] == "skip":
        pytest.skip(f"marked skip: {spec.split(None, 1)[1:] or ''}")
    for module in filter(None, marker.get("needs", "").split(",")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    prelude, teardown = PRELUDES[marker["with"]] if "with" in marker else ("", "")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if marker.get("with") in SEPARATE:
        return _run_separately(prelude, code, line, path, tmp_path)
    namespace = {"__name__": "__snippet__"}
    exec(compile(prelude, f"<prelude {marker.get('with')}>", "exec"), namespace)
    try:
        # padded so that tracebacks give the line number in the Markdown file
        exec(compile("\n" * line + code, str(path), "exec"), namespace)
    finally:
        exec(compile(teardown, "<teardown>", "exec"), namespace)
        # a loss left in the namespace keeps its graph, whose ISOPO nodes reach the model and its
        # class, whose methods reach the namespace: a cycle through C++ that gc cannot break
        namespace.clear()


# snippets run in a process of their own, left with os._exit: destroying a gloo process group
# can deadlock on the GIL with its worker threads (pytorch/pytorch#190489)
SEPARATE = {"ddp"}


def _run_separately(prelude: str, code: str, line: int, path: Path, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(prelude + f"\nexec(compile({chr(10) * line + code!r}, {str(path)!r}, "
                      "'exec'))\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_file_is_scanned():
    found = {p.name for p, *_ in (b.values for b in blocks())}
    assert {"README.md", "api.md", "faq.md", "distributed.md", "integrations.md"} <= found
