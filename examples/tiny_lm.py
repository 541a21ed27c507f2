"""A tiny transformer learns to reverse digit strings by RL: ISOPO against REINFORCE.

    python examples/tiny_lm.py            # ISOPO (ntk) and REINFORCE, 3 seeds each: ~1 min on CPU
    python examples/tiny_lm.py --methods fisher ntk reinforce --steps 150 --out curves.png

Every step samples ``group`` completions for each of ``prompts`` random prompts ``d1 … dk |``.
A completion's reward is the fraction of its k positions that match the reversed digits; the
advantages are normalised within each prompt's group (GRPO style). ISOPO receives the
advantage-free log-likelihood loss and applies the advantages itself; REINFORCE is plain
PyTorch with the advantages in the loss. Both take one AdamW step per batch; the loop is
``rl.train``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl import Batch, compare, group_advantages

SEP = 10          # the token between prompt and completion; tokens 0-9 are digits
VOCAB = 11


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Token and position embeddings, a few blocks, a final norm and an untied head."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, max_len: int = 32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class ReverseTask:
    """Reverse a string of ``length`` random digits; reward = fraction of correct positions."""

    name, target, unit = "digit reversal", 0.9, "completions"

    def __init__(self, length: int = 5, prompts: int = 16, group: int = 8):
        self.length, self.prompts, self.group = length, prompts, group
        self.batch_size = prompts * group

    def policy(self) -> nn.Module:
        return TinyLM(max_len=2 * self.length + 1)

    @torch.no_grad()
    def collect(self, model: nn.Module, gen: torch.Generator) -> Batch:
        k = self.length
        digits = torch.randint(0, 10, (self.prompts, k), generator=gen)
        digits = digits.repeat_interleave(self.group, 0)
        ids = torch.cat([digits, torch.full((len(digits), 1), SEP)], 1)
        old = []
        for _ in range(k):                        # sample one token at a time
            logp = model(ids)[:, -1].log_softmax(-1)
            ids = torch.cat([ids, torch.multinomial(logp.exp(), 1, generator=gen)], 1)
            old.append(logp)
        rewards = (ids[:, k + 1:] == digits.flip(1)).float().mean(1)
        n = len(ids)
        return Batch(ids, ids[:, k + 1:].reshape(-1), torch.arange(n).repeat_interleave(k),
                     torch.stack(old, 1).reshape(n * k, -1), rewards,
                     group_advantages(rewards, self.group), None)

    def logprobs(self, model: nn.Module, batch: Batch, idx: Tensor | None = None):
        """Log-probs ``(R,)`` of the taken actions and ``(R, V)`` of all actions, for the rows
        of the samples ``idx`` (sorted; all by default) in batch order."""
        ids = batch.inputs if idx is None else batch.inputs[idx]
        logp = model(ids[:, :-1])[:, self.length:].log_softmax(-1).reshape(-1, VOCAB)
        return logp.gather(1, ids[:, self.length + 1:].reshape(-1, 1)).squeeze(1), logp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ntk", "reinforce"],
                   choices=["ntk", "fisher", "reinforce"])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--length", type=int, default=5, help="digits per prompt")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0, 1, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="tiny_lm.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = ReverseTask(args.length, args.prompts, args.group)
    return compare(task, args.methods, args.steps, args.lr, args.seeds, args.out)


if __name__ == "__main__":
    main()
