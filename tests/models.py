"""Tiny random-init policies and their per-sample advantage-free losses, for the tests."""
from __future__ import annotations

import logging

import torch
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 32


class MLPPolicy(nn.Module):
    """A discrete-action MLP policy: one state per row (2-D layer inputs)."""

    def __init__(self, obs=5, hidden=8, actions=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs, hidden), nn.Tanh(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, actions))

    def forward(self, x):
        return self.net(x)


class Scale(nn.Module):
    """A module with its own parameter and no dedicated rule (generic path)."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain + torch.tanh(x).mean(-1, keepdim=True) * self.gain.sum()


class SeqMixer(nn.Module):
    """A sequence model whose positions interact within a sequence: embedding, a causal
    cumulative mixer, a generic module, RMSNorm and an untied head."""

    def __init__(self, vocab=VOCAB, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.scale = Scale(d)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, segments=None):
        ids = input_ids
        h = self.emb(ids)
        h = torch.tanh(self.mix(h))
        if segments is None:
            h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        else:  # packed (1, N): mix only within a segment
            seg = segments.view(1, -1)
            same = (seg[0][:, None] == seg[0][None, :]) & torch.ones(seg.numel(), seg.numel(), dtype=torch.bool).tril()
            w = same.to(h.dtype)
            h = (w @ h[0] / w.sum(1, keepdim=True))[None]
        return self.head(self.norm(self.scale(h)))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2,
                                      n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                      bos_token_id=1, eos_token_id=2, attn_implementation="eager"))


def _decoder(name: str, **kw):
    """A tiny Hugging Face decoder ``{name}ForCausalLM`` with the shared test shape."""
    import transformers
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager", **kw)
    return getattr(transformers, f"{name}ForCausalLM")(config)


def qwen3():
    return _decoder("Qwen3", head_dim=8, tie_word_embeddings=True)


def gemma():
    """Gemma: a scaled word embedding (its own forward) tied to the head, (1 + w) RMS norms."""
    return _decoder("Gemma", head_dim=8, tie_word_embeddings=True)


def llama(checkpointing=False):
    m = _decoder("Llama", tie_word_embeddings=False)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    return m


def lm_losses(model, ids, mask, **kw):
    """Per-sequence terms of the token-mean loss ``-(logp · mask).sum() / mask.sum()``."""
    out = model(input_ids=ids, attention_mask=mask, **kw) if mask is not None else model(input_ids=ids, **kw)
    logits = out.logits if hasattr(out, "logits") else out
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = torch.ones_like(logp) if mask is None else mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum(1) / m.sum()


def packed_losses(model, ids, seg, **kw):
    """Per-segment terms for a packed ``(1, N)`` batch (targets: next token within a segment)."""
    logits = model(ids, **kw)
    logits = logits.logits if hasattr(logits, "logits") else logits
    logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    same = (seg[1:] == seg[:-1]).to(logp.dtype)
    n = int(seg.max()) + 1
    return -torch.zeros(n, dtype=logp.dtype).index_add(0, seg[:-1], logp * same) / same.sum()


class NanoGPT(torch.nn.Module):
    """nanoGPT's model, shrunk: learned positions ``wpe(pos)``, a fused qkv projection,
    ``scaled_dot_product_attention``, GELU MLP, pre-LayerNorm blocks, ``lm_head`` tied to ``wte``.
    ``shared_positions`` builds positions as nanoGPT does, ``torch.arange(t)`` without a batch
    axis; otherwise ``torch.arange(t)[None]``."""

    def __init__(self, vocab=VOCAB, d=8, heads=2, layers=2, block=16, shared_positions=False):
        super().__init__()
        from torch import nn
        self.heads, self.shared_positions = heads, shared_positions
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(d), "c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d),
            "ln_2": nn.LayerNorm(d), "c_fc": nn.Linear(d, 4 * d), "mlp_proj": nn.Linear(4 * d, d)})
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids):
        import torch.nn.functional as F
        idx = input_ids
        b, t = idx.shape
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos if self.shared_positions else pos[None])
        for blk in self.blocks:
            h = blk["ln_1"](x)
            q, k, v = blk["c_attn"](h).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["c_proj"](y.transpose(1, 2).contiguous().view(b, t, -1))
            x = x + blk["mlp_proj"](F.gelu(blk["c_fc"](blk["ln_2"](x))))
        return self.lm_head(self.ln_f(x))
