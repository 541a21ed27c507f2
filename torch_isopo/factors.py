"""Per-sample gradient algebra for layers whose per-row gradient pieces are outer products.

A linear layer's gradient is a sum over rows r of pieces ``U_r ⊗ V_r`` in the weight's own
layout (rows × cols), plus a bias piece ``δ_r``. For ``nn.Linear`` ``U = Δ`` (output gradients)
and ``V = a`` (inputs); for Hugging Face ``Conv1D`` ``U = a`` and ``V = Δ``; for ``nn.Embedding``
``U`` is the one-hot token id (stored as an index) and ``V = Δ``. Everything ISOPO needs is
expressed with these factors (docs/performance.md, "Cost per linear layer"):

* ``K = Sᵀ((UUᵀ) ⊙ (VVᵀ))S`` (token Gram route), or ``K = G Gᵀ`` with the per-sample gradients
  ``G_i = Σ_{r∈i} U_r V_rᵀ`` materialised in chunks over weight rows (materialise route);
* the Fisher probe products ``⟨g_t, G_i⟩`` and norms ``‖g_t‖²``;
* the final gradient ``Σ_i c_i G_i = (U ⊙ Sc)ᵀ V``: one GEMM, the one autograd would have done.

Several uses of one weight (a tied embedding / ``lm_head``) add their pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _compat
from .samples import SampleMap


@dataclass
class FactorUse:
    """One use (one forward call) of a weight, as seen by its backward.

    ``weight`` and ``bias`` are the layer's parameter slots the use contributes to (None when
    that parameter is frozen or absent); uses of one slot share their pieces' inner products.
    """

    U: Tensor            # (rows, P) dense, or (rows,) long index into the P weight rows
    V: Tensor            # (rows, Q) dense
    delta: Tensor        # (rows, p) the output gradients: the bias pieces (U or V itself)
    smap: SampleMap
    weight: int | None
    bias: int | None

    @property
    def indexed(self) -> bool:
        return self.U.dim() == 1


def work_dtype(t: Tensor) -> torch.dtype:
    """Grams and solves run in float64 for float64 inputs, else in float32, also under autocast."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_CAST_ELEMS = 1 << 24   # at most this many elements of a factor are upcast at once
_LOW = (torch.float16, torch.bfloat16)


def scale_dtype(t: Tensor, precise: bool = True) -> torch.dtype:
    """The dtype a factor like ``t`` is scaled by ``c`` in: its own, float32 for a 16-bit one
    when ``precise``. ``Σ c_i G_i`` cancels most of its terms when the damping is small, and a
    16-bit ``c`` (or scaled factor) would carry 2^-9 of each term into the result; ``reinforce``
    (``c = A``) scales in the factor's dtype, as autograd does."""
    return torch.float32 if precise and t.dtype in _LOW else t.dtype


def mm_scaled(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y`` (2-D) where one factor was scaled by ``c`` in ``scale_dtype`` and the other is
    16-bit: the scaled one split into its 16-bit rounding and the rounding of the remainder, two
    16-bit products added in float32. No term loses more than 2^-17 of itself; the products'
    own float32 sums come back in float32 on a GPU (``mm(out_dtype=)``), rounded to 16 bits
    elsewhere (an error of the result's own 16-bit rounding), without a float32 copy of the
    other factor. Equal dtypes: one product.

    float16 ends at 65504 and its smallest number is 2^-24: a scaled factor can pass either
    where the product does not (``fisher``'s ``c_i`` of a sample of tiny gradient; a sample of
    small advantage beside a large one). On a GPU the scaled factor is brought to a largest
    entry of 2^14 by a power of two (exact) and the float32 result scaled back; elsewhere,
    where the products would come back in float16, the product is taken in float32, the
    float16 factor upcast in pieces."""
    if X.dtype == Y.dtype:
        return X @ Y
    wide_left = X.dtype not in _LOW
    wide, low = (X, Y.dtype) if wide_left else (Y, X.dtype)
    scale = None
    if low == torch.float16:
        if not _compat.has_mm_to(Y if wide_left else X):
            return _mm_float32(X, Y)
        top = torch.frexp(wide.detach().abs().amax()).exponent
        scale = torch.ldexp(torch.ones((), device=wide.device), top - 14)
        wide = wide / scale
    hi = wide.to(low)
    out = None
    for part in (hi, (wide - hi.to(wide.dtype)).to(low)):
        a, b = (part, Y) if wide_left else (X, part)
        prod = _compat.mm_to(a, b, torch.float32)
        prod = (a @ b).float() if prod is None else prod
        out = prod if out is None else out.add_(prod)
    return out if scale is None else out.mul_(scale)


def _mm_float32(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y`` in float32, a 16-bit factor upcast in pieces along the inner dimension."""
    inner = X.shape[1]
    step = max(1, _CAST_ELEMS // max(X.shape[0], Y.shape[1], 1))
    out = None
    for k in range(0, inner, step):
        part = X[:, k:k + step].float() @ Y[k:k + step].float()
        out = part if out is None else out.add_(part)
    return out if out is not None else X.new_zeros(X.shape[0], Y.shape[1], dtype=torch.float32)


def side_dots(X: Tensor, Y: Tensor, dtype: torch.dtype) -> Tensor:
    """Inner products between rows of two factors of one side; a 1-D factor is one-hot."""
    if X.dtype == dtype and Y.dtype == dtype:          # (an index factor is never float)
        return torch.mm(X, Y.T)
    if X.dim() == 1 and Y.dim() == 1:
        return (X[:, None] == Y[None, :]).to(dtype)
    if X.dim() == 1:
        return Y.index_select(1, X).T.to(dtype)
    if Y.dim() == 1:
        return X.index_select(1, Y).to(dtype)
    fast = _compat.mm_to(X, Y.T, dtype)
    if fast is not None:
        return fast
    X = X.to(dtype)
    step = max(1, _CAST_ELEMS // Y.shape[1])
    if Y.dtype == dtype or step >= Y.shape[0]:
        return X @ Y.to(dtype).T
    out = X.new_empty(X.shape[0], Y.shape[0])   # cast a low-precision Y in pieces, never whole
    for j in range(0, Y.shape[0], step):
        out[:, j:j + step] = X @ Y[j:j + step].to(dtype).T
    return out


def piece_dots(u: FactorUse, rows: slice | Tensor, w: FactorUse, dtype: torch.dtype,
               bias: bool = True) -> Tensor:
    """``⟨piece_r of u, piece_s of w⟩`` for the selected rows r of u and all rows s of w
    (weight and, with ``bias``, bias parts)."""
    out = 0
    if u.weight is not None and u.weight == w.weight:
        out = side_dots(u.U[rows], w.U, dtype) * side_dots(u.V[rows], w.V, dtype)
    if bias and u.bias is not None and u.bias == w.bias:
        out = out + side_dots(u.delta[rows], w.delta, dtype)
    return out


def _row_blocks(rows: int, other: int, budget_elems: int):
    step = max(1, budget_elems // max(other, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def gram_kernel(uses: list[FactorUse], n: int, dtype: torch.dtype, budget_elems: int) -> Tensor:
    """``K`` of one weight by the token Gram route, in row blocks (no N×N matrix is whole)."""
    K = torch.zeros(n, n, dtype=dtype, device=uses[0].V.device)
    for u in uses:
        for w in uses:
            for blk in _row_blocks(u.smap.rows, w.smap.rows, budget_elems):
                M = piece_dots(u, blk, w, dtype, bias=False)
                if isinstance(M, Tensor):
                    M = w.smap.reduce(M, 1)
                    K.index_add_(0, u.smap.ids[blk], M)
    return K


def weight_rows(uses: list[FactorUse], P: int) -> Tensor | None:
    """Rows of the weight that any use touches: all of them (``None``) unless every use is an
    embedding lookup, whose gradient lives on the looked-up rows only."""
    if any(not u.indexed for u in uses):
        return None
    return torch.unique(torch.cat([u.U for u in uses]))


def materialised_gradients(uses: list[FactorUse], n: int, P: int, Q: int, rows: Tensor | None,
                           chunk: int):
    """Yield ``(row_slice, G)`` with the per-sample gradients ``G (n, rc, Q)`` of one weight, for
    each chunk of ``chunk`` active weight rows, summed over uses (in the activations' dtype)."""
    R = P if rows is None else rows.numel()
    dense = [(u, u.smap.padded(u.U), u.smap.padded(u.V)) for u in uses if not u.indexed]
    indexed = [u for u in uses if u.indexed]
    local = [(u, torch.arange(P, device=u.U.device) if rows is None else
              torch.searchsorted(rows, u.U)) for u in indexed]
    ref = uses[0].V
    for start in range(0, R, chunk):
        stop = min(start + chunk, R)
        G = None
        for u, Up, Vp in dense:
            part = torch.bmm(Up[:, :, start:stop].transpose(1, 2), Vp)
            G = part if G is None else G.add_(part)
        if G is None:
            G = ref.new_zeros(n, stop - start, Q)
        for u, pos in local:             # rows outside the chunk add zeros: no host sync
            r = (pos if rows is not None else u.U) - start       # row within the chunk
            V = u.V.to(G.dtype)
            if start > 0 or stop < R:
                V = V * ((r >= 0) & (r < stop - start)).to(G.dtype)[:, None]
                r = r.clamp(0, stop - start - 1)
            G.view(-1, Q).index_add_(0, u.smap.ids * (stop - start) + r, V)
        yield slice(start, stop), G


def bias_gradients(uses: list[FactorUse], n: int, dtype: torch.dtype) -> Tensor:
    """Per-sample gradients ``(n, p)`` of one bias: the Δ rows summed per sample."""
    return sum(u.smap.reduce(u.delta.to(dtype), 0) for u in uses)


def contract_weight(uses: list[FactorUse], c: Tensor, P: int, Q: int,
                    precise: bool = True) -> Tensor:
    """``Σ_i c_i G_i`` of one weight: per use one GEMM with Δ scaled by ``c``."""
    W = None
    for u in uses:
        scale = c.to(scale_dtype(u.V, precise))[u.smap.ids][:, None]
        if u.indexed:
            part = u.V.new_zeros(P, Q, dtype=scale.dtype).index_add_(0, u.U, u.V * scale)
        elif u.U.shape[1] <= u.V.shape[1]:     # scale the narrower factor (no big copy)
            part = mm_scaled((u.U * scale).T, u.V)
        else:
            part = mm_scaled(u.U.T, u.V * scale)
        W = part if W is None else W + part
    return W


def contract_bias(uses: list[FactorUse], c: Tensor, precise: bool = True) -> Tensor:
    """``Σ_i c_i G_i`` of one bias."""
    return sum((u.delta * c.to(scale_dtype(u.delta, precise))[u.smap.ids][:, None]).sum(0)
               for u in uses)


def fisher_candidates(uses: list[FactorUse]) -> list[Tensor]:
    """Per use, which tokens have a non-zero output gradient: the candidate probe positions."""
    return [u.delta.reshape(u.smap.tokens, -1).abs().sum(1) > 0 for u in uses]


def fisher_products(uses: list[FactorUse], probes: list[tuple[Tensor, Tensor]], n: int,
                    dtype: torch.dtype, budget_elems: int) -> tuple[Tensor, Tensor]:
    """``⟨g_t, G_i⟩`` (probes × n) and ``‖g_t‖²`` for the probe tokens of every use, each probe
    row scaled by its 0/1 weight (a probe slot that drew no candidate weighs 0).

    A token's piece is the sum of its ``inner`` rows (attention heads belong to their token).
    """
    dots, norms = [], []
    for u, (toks, weight) in zip(uses, probes):
        if toks.numel() == 0:
            continue
        h = u.smap.inner
        rows = (toks[:, None] * h + torch.arange(h, device=toks.device)).reshape(-1)
        D = torch.zeros(toks.numel(), n, dtype=dtype, device=toks.device)
        for blk in _row_blocks(rows.numel(), sum(w.smap.rows for w in uses), budget_elems):
            sel = rows[blk]
            part = 0
            for w in uses:
                M = piece_dots(u, sel, w, dtype)
                if isinstance(M, Tensor):
                    part = part + w.smap.reduce(M, 1)
            D.index_add_(0, torch.arange(blk.start, blk.stop, device=toks.device) // h, part)
        weight = weight.to(dtype)
        dots.append(D * weight[:, None])
        norms.append(token_norms(u, rows.view(-1, h), dtype) * weight)
    if not dots:
        ref = uses[0].V
        return ref.new_zeros(0, n, dtype=dtype), ref.new_zeros(0, dtype=dtype)
    return torch.cat(dots), torch.cat(norms)


def _self_dots(X: Tensor, dtype: torch.dtype) -> Tensor:
    """Row inner products within each group: ``X`` is (k, h, F) dense or (k, h) index."""
    if X.dim() == 2:
        return (X[:, :, None] == X[:, None, :]).to(dtype)
    X = X.to(dtype)
    return torch.bmm(X, X.transpose(1, 2))


def token_norms(u: FactorUse, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``‖g_t‖²`` for tokens given as a (k, h) table of their rows."""
    out = 0
    if u.weight is not None:
        out = (_self_dots(u.U[rows], dtype) * _self_dots(u.V[rows], dtype)).sum((1, 2))
    if u.bias is not None:
        out = out + _self_dots(u.delta[rows], dtype).sum((1, 2))
    return out
