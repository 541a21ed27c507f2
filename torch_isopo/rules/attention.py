"""``nn.MultiheadAttention`` (and through it ``nn.TransformerEncoderLayer``, ``DecoderLayer`` and
``nn.Transformer``): its projections are linear layers, the attention between them mixes positions
within a sequence only.

The module and its ``out_proj`` form one layer. Its forward is ``F.multi_head_attention_forward``
written out with the in- and out-projections as ``LinearFn`` uses (the packed ``in_proj_weight``
is used whole for self-attention, as row blocks otherwise) and ``bias_k``/``bias_v`` as explicit
per-sample uses; masks, dropout, ``add_zero_attn``, ``need_weights`` and ``batch_first`` behave as
in PyTorch. Each sample is one ``fisher`` position.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from ..finish import ExplicitUse
from ..gate import own_op
from ..samples import SampleMap, entry_ids
from . import Rule, register
from .linear import LinearFn, LinearUse

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _float_mask(mask: Tensor | None, dtype) -> Tensor | None:
    """A boolean mask (True = masked) as an additive float mask; float masks pass unchanged."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"ISOPO: attention masks must be bool or float, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


@own_op
class BatchBiasFn(Function):
    """``bias.repeat(1, N, 1)``: a learned key/value appended to every batch entry; each entry's
    row is its sample's gradient."""

    @staticmethod
    def forward(ctx, bias, N, record, smap, slot):
        ctx.record, ctx.smap, ctx.slot = record, smap, slot
        return bias.repeat(1, N, 1)

    @staticmethod
    def backward(ctx, dy):
        rows = dy.reshape(-1, dy.shape[-1])
        G = ctx.smap.reduce(rows, 0)
        ctx.record.add(ExplicitUse(G, G if ctx.record.wants_pieces else None,
                                   G.abs().sum(1) > 0 if ctx.record.wants_pieces else None,
                                   (ctx.slot,)))
        return None, None, None, None, None


@register(nn.MultiheadAttention)
class AttentionRule(Rule):
    name = "attention"
    factor = True
    whole_subtree = True
    pieces = "samples"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m = entry.module
        a = _SIGNATURE.bind(m, *args, **kwargs)
        a.apply_defaults()
        q, k, v = a.arguments["query"], a.arguments["key"], a.arguments["value"]
        batched = q.dim() == 3
        # the projections run on rows in the caller's layout (no copy), except where dropout
        # draws inside the attention kernel, whose choice of kernel (and so the random mask
        # drawn) depends on the layout: there as PyTorch runs it, sequence first
        turn = m.batch_first and batched and m.training and m.dropout > 0
        if turn:
            q, k, v = _seq_first(q, k, v)
        elif not batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        seq_first = not (m.batch_first and batched) or turn
        mb.note_rows(q, int(seq_first))
        record, gated = mb.gate(layer)
        ctx = _Context(mb, record, gated, entry, q.shape[1 if seq_first else 0], seq_first)
        out, weights = _attend(m, ctx, q, k, v, a.arguments)
        if turn:
            out = out.transpose(1, 0)
        elif not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _seq_first(q, k, v):
    """Transpose to ``(L, N, E)`` keeping which of query, key and value are the same tensor."""
    if k is v:
        if q is k:
            q = k = v = q.transpose(1, 0)
        else:
            q, k = q.transpose(1, 0), k.transpose(1, 0)
            v = k
        return q, k, v
    return q.transpose(1, 0), k.transpose(1, 0), v.transpose(1, 0)


class _Context:
    """What the projections of one call need: the gate, the slots and the rows' samples."""

    def __init__(self, mb, record, gated, entry, N, seq_first):
        self.mb, self.record, self.gated, self.entry, self.N = mb, record, gated, entry, N
        self.m, self.seq_first = entry.module, seq_first

    def slot(self, owner, attr):
        return next((i for o, a, i in self.entry.slots if o is owner and a == attr), None)

    def param(self, owner, attr):
        i = self.slot(owner, attr)
        return self.entry.tensor(attr, self.gated, owner, i), i

    def smap(self, L: int, device):
        return self.mb.batch_map(self.N, L, f"module '{self.entry.name}' input", device,
                                 entry_major=not self.seq_first)

    def length(self, x: Tensor) -> int:
        return x.shape[0 if self.seq_first else 1]

    def linear(self, x, owner, wname, bname, rows=None, bias_rows=None):
        """``LinearFn`` of ``x`` (``(L, N, in)``, or ``(N, L, in)`` batch first) with ``owner``'s
        weight and bias (gated if trainable)."""
        w, ws = self.param(owner, wname)
        b, bs = (None, None) if bname is None else self.param(owner, bname)
        use = LinearUse(self.record, self.smap(self.length(x), x.device), False, ws, bs, rows,
                        bias_rows)
        return LinearFn.apply(x, w, b, use)

    def batch_bias(self, attr, L: int):
        """``bias.repeat(1, N, 1)`` of a learned key or value bias (``(N, 1, E)`` batch first),
        the queries ``L`` rows per entry."""
        b, slot = self.param(self.m, attr)
        if slot is None:
            out = b.repeat(1, self.N, 1)
        else:
            out = BatchBiasFn.apply(b, self.N, self.record, self.entries(L, b.device), slot)
        return out if self.seq_first else out.transpose(0, 1)

    def entries(self, L: int, device) -> SampleMap:
        """One row per batch entry, its sample: ids given per row must be one per entry (samples
        packed in one entry all attend to its one learned key)."""
        seg = self.mb.segments
        if seg is None or seg.numel() == self.N or self.mb.n == 1:
            return self.smap(1, device)
        ids = entry_ids(self.smap(L, device).ids, self.N, L, not self.seq_first)
        if ids is None:
            raise ValueError(
                f"ISOPO: module '{self.entry.name}' (add_bias_kv=True) has samples packed in one "
                "batch entry (segments= ids that differ within an entry): its learned key and "
                "value are one key per entry that all of them attend to, whose gradient cannot be "
                "split by sample. Give each sample a batch entry of its own (padded, segments= "
                "with one id per entry), or set add_bias_kv=False")
        return SampleMap(ids, self.mb.n, 1, None, 0)

    def heads(self, t: Tensor, H: int) -> Tensor:
        """``(N, H, L, hd)``: a projection split into heads."""
        if self.seq_first:
            return t.view(t.shape[0], self.N, H, -1).permute(1, 2, 0, 3)
        return t.view(self.N, t.shape[1], H, -1).transpose(1, 2)

    def merged(self, out: Tensor) -> Tensor:
        """The heads ``(N, H, L, hd)`` side by side again, in the layout of the inputs."""
        N, H, L, hd = out.shape
        if self.seq_first:
            return out.permute(2, 0, 1, 3).reshape(L, N, H * hd)
        return out.transpose(1, 2).reshape(N, L, H * hd)


def _in_projection(m, ctx, q, k, v):
    E = m.embed_dim
    bias = None if m.in_proj_bias is None else "in_proj_bias"
    if not m._qkv_same_embed_dim:
        return [ctx.linear(x, m, name, bias, bias_rows=(i * E, (i + 1) * E))
                for i, (x, name) in enumerate([(q, "q_proj_weight"), (k, "k_proj_weight"),
                                               (v, "v_proj_weight")])]
    if k is v and q is k:
        proj = ctx.linear(q, m, "in_proj_weight", bias)
        proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return proj[0], proj[1], proj[2]
    if k is v:
        qp = ctx.linear(q, m, "in_proj_weight", bias, (0, E), (0, E))
        kv = ctx.linear(k, m, "in_proj_weight", bias, (E, 3 * E), (E, 3 * E))
        kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return qp, kv[0], kv[1]
    return [ctx.linear(x, m, "in_proj_weight", bias, (i * E, (i + 1) * E), (i * E, (i + 1) * E))
            for i, x in enumerate((q, k, v))]


def _attend(m, ctx, query, key, value, a):
    """``F.multi_head_attention_forward`` with the projections as uses, on inputs in the layout
    the module takes them (``(L, N, E)``, or ``(N, L, E)`` batch first): projecting rows in
    memory order needs no copy."""
    N, L, E = ctx.N, ctx.length(query), query.shape[-1]
    H, hd = m.num_heads, E // m.num_heads
    mask, kpm, causal = _masks(a, query.dtype)
    q, k, v = _in_projection(m, ctx, query, key, value)
    if m.bias_k is not None:
        seq = 0 if ctx.seq_first else 1
        k = torch.cat([k, ctx.batch_bias("bias_k", L)], seq)
        v = torch.cat([v, ctx.batch_bias("bias_v", L)], seq)
        mask, kpm = _one_more_key(mask), _one_more_key(kpm)
    q, k, v = ctx.heads(q, H), ctx.heads(k, H), ctx.heads(v, H)
    if m.add_zero_attn:
        zeros = torch.zeros((N, H, 1, hd), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        mask, kpm = _one_more_key(mask), _one_more_key(kpm)
    S = k.shape[2]
    if mask is not None:      # (1 or N·H, L, S) → (1 or N, 1 or H, L, S)
        mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(N, H, L, S)
    if kpm is not None:
        kpm = kpm.view(N, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    _refuse_mixed_samples(ctx, mask, causal, L, ctx.length(key))
    p = m.dropout if m.training else 0.0
    if a["need_weights"]:
        w = torch.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(-2, -1))
        w = F.softmax(w if mask is None else w + mask, dim=-1)
        if p > 0.0:
            w = F.dropout(w, p=p)
        out = ctx.linear(ctx.merged(torch.matmul(w, v)), m.out_proj, "weight", _out_bias(m))
        return out, (w.mean(dim=1) if a["average_attn_weights"] else w)
    out = F.scaled_dot_product_attention(q, k, v, mask, p, causal)
    return ctx.linear(ctx.merged(out), m.out_proj, "weight", _out_bias(m)), None


def _refuse_mixed_samples(ctx, mask, causal: bool, L: int, S: int) -> None:
    """Segments that give the positions of one batch entry to several samples (packed sequences)
    are exact only where the masks keep each position's attention within its own sample."""
    seg = ctx.mb.segments
    if seg is None or seg.numel() != ctx.N * L or L != S:
        return                         # one sample per entry (or a layout batch_map refuses)
    ids = seg.view(ctx.N, L)
    open_ = ids[:, :, None] != ids[:, None, :]            # (N, L, S): across samples
    if causal:
        open_ &= torch.ones(L, S, dtype=torch.bool, device=ids.device).tril()
    if mask is not None:
        open_ &= ~(mask[..., :S] == -math.inf).all(1).to(ids.device)
    if bool(open_.any()):
        raise ValueError(
            f"ISOPO: module '{ctx.entry.name}': segments give the positions of one sequence to "
            "different samples, and the attention lets them see each other: a position's output "
            "then holds other samples' inputs and its gradient cannot be credited to one. Give "
            "each sample its own batch entry, or pass an attn_mask (or key_padding_mask) that "
            "blocks attention between positions of different samples (block-diagonal, as for "
            "packed sequences)")


def _masks(a, dtype):
    """``(attn_mask (1 or N·H, L, S), key_padding_mask (N, S), is_causal)`` as PyTorch uses them."""
    causal, need = a["is_causal"], a["need_weights"]
    kpm = _float_mask(a["key_padding_mask"], dtype)
    if kpm is not None and kpm.dim() == 1:
        kpm = kpm.unsqueeze(0)
    mask = a["attn_mask"]
    if causal and mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint")
    if causal and kpm is None and not need:
        return None, kpm, True
    mask = _float_mask(mask, dtype)
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    return mask, kpm, causal and kpm is None


def _one_more_key(mask):
    return None if mask is None else F.pad(mask, (0, 1))


def _out_bias(m):
    return None if m.out_proj.bias is None else "bias"
