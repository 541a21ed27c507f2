"""Recurrent layers: ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells.

At every step the gates' pre-activations are ``x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh`` (GRU:
the hidden part of the new gate is scaled by the reset gate). Per-sample gradients of the weights
are therefore sums of outer products of the gates' gradients ``δ_t`` with ``x_t`` and ``h_{t-1}``.
The input projection of all steps runs at once through ``TapFn``, an identity whose backward
receives every ``δ_t``; the recurrence runs with the weights detached (autograd still carries
``δ`` back through ``h``), so one op per layer and direction hands all factors to the gate. A
cell called in the user's loop computes both products of its step in one op, ``CellFn``, whose
backward hands both weights' factors to the gate. A module (all layers and directions) or a cell
is one layer; each sample is one ``fisher`` position.
Supported as PyTorch has them: ``batch_first``, several layers with dropout, bidirectional,
``proj_size``, a given ``hx``, packed sequences, unbatched inputs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..factors import FactorUse
from ..gate import own_op
from ..samples import SampleMap, entry_ids
from . import Rule, register
from .linear import LinearFn, LinearUse, autocast_dtype


def _kind(m) -> str:
    if isinstance(m, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(m, (nn.GRU, nn.GRUCell)):
        return "gru"
    return "rnn_" + m.nonlinearity


@dataclass
class TapUse:
    record: object
    smap: object
    x: Tensor                  # (rows, in) inputs of the steps
    h: Tensor | None = None    # (rows, hidden) states the steps read, set after the recurrence
    r: Tensor | None = None    # GRU: the reset gates, set after the recurrence
    slots: tuple = (None, None, None, None)   # W_ih, b_ih, W_hh, b_hh


@own_op
class TapFn(Function):
    """Identity on the input projections of the gates; its backward receives every step's gate
    gradient and hands the factors of all four parameters to the gate."""

    @staticmethod
    def forward(ctx, gi, use, *gated):
        ctx.use = use
        return gi.view_as(gi)

    @staticmethod
    def backward(ctx, dgi):
        use = ctx.use
        d = dgi.reshape(-1, dgi.shape[-1])
        w_ih, b_ih, w_hh, b_hh = use.slots
        if w_ih is not None or b_ih is not None:
            use.record.add(FactorUse(d, use.x, d, use.smap, w_ih, b_ih))
        if w_hh is not None or b_hh is not None:
            dh = d
            if use.r is not None:                # the hidden new-gate part was scaled by r
                third = d.shape[1] // 3
                dh = torch.cat([d[:, :2 * third], d[:, 2 * third:] * use.r], 1)
            use.record.add(FactorUse(dh, use.h, dh, use.smap, w_hh, b_hh))
        return (dgi, None, *([None] * (len(ctx.needs_input_grad) - 2)))


def _stepper(kind, gi, w_hh, b_hh):
    """``step(t, h, c) → (h', c', reset gate)`` over the input projections ``gi (T, N, G)``: the
    hidden bias folded into them once, each step's hidden product added by one ``addmm``."""
    if kind == "gru":                      # the new gate's hidden part is scaled: kept apart
        k = gi.shape[-1] // 3
        rz = gi[..., :2 * k] if b_hh is None else gi[..., :2 * k] + b_hh[:2 * k]
        gi_n, w_rz, w_n = gi[..., 2 * k:], w_hh[:2 * k].T, w_hh[2 * k:]
        b_n = None if b_hh is None else b_hh[2 * k:]
        return lambda t, h, c: _gru(torch.addmm(rz[t], h, w_rz), gi_n[t],
                                    F.linear(h, w_n, b_n), h)
    pre, w = (gi if b_hh is None else gi + b_hh), w_hh.T
    return lambda t, h, c: _step(kind, torch.addmm(pre[t], h, w), h, c)


def _step(kind, gates, h, c):
    """One LSTM or RNN step from its gates' pre-activations (input and hidden parts summed):
    ``(h', c', None)``."""
    if kind == "lstm":                     # one sigmoid over all gates (g's part unused)
        i, f, _, o = torch.sigmoid(gates).chunk(4, -1)
        k = gates.shape[-1] // 4
        c = torch.addcmul(f * c, i, torch.tanh(gates[..., 2 * k:3 * k]))
        return o * torch.tanh(c), c, None
    return (torch.tanh(gates) if kind == "rnn_tanh" else torch.relu(gates)), None, None


def _gru(rz, gi_n, gh_n, h):
    """A GRU step from the reset and update gates' pre-activations ``rz`` and the new gate's
    input and hidden parts."""
    r, z = torch.sigmoid(rz).chunk(2, -1)
    n = torch.tanh(torch.addcmul(gi_n, r, gh_n))
    return torch.lerp(n, h, z), None, r


@dataclass
class CellUse:
    record: object
    smap: object
    slots: tuple           # W_ih, b_ih, W_hh, b_hh
    split: bool            # GRU: the hidden part returned apart (the reset gate scales it)


@own_op
class CellFn(Function):
    """A cell's gate pre-activations ``x W_ihᵀ + b_ih`` and ``h W_hhᵀ + b_hh`` (summed, or apart
    for a GRU), in one op whose backward hands both weights' factors to the gate."""

    @staticmethod
    def forward(ctx, x, h, w_ih, b_ih, w_hh, b_hh, use):
        gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)     # (autocast: cast before)
        ctx.save_for_backward(x, h, w_ih, w_hh)
        ctx.use = use
        if use.split:
            return gi, gh
        return gi.add_(gh)

    @staticmethod
    def backward(ctx, dgi, dgh=None):
        x, h, w_ih, w_hh = ctx.saved_tensors
        use = ctx.use
        dgh = dgi if not use.split else dgh
        s0, s1, s2, s3 = use.slots
        if s0 is not None or s1 is not None:
            use.record.add(FactorUse(dgi, x, dgi, use.smap, s0, s1))
        if s2 is not None or s3 is not None:
            use.record.add(FactorUse(dgh, h, dgh, use.smap, s2, s3))
        dx = dgi @ w_ih if ctx.needs_input_grad[0] else None
        dh = dgh @ w_hh if ctx.needs_input_grad[1] else None
        return dx, dh, None, None, None, None, None


class _Params:
    """The module's parameters by name: gated when trainable, else as they are."""

    def __init__(self, entry, gated, dtype=None):
        self.entry, self.gated, self.m, self.dtype = entry, gated, entry.module, dtype

    def get(self, name):
        s = self.entry.slot(name)
        t = self.entry.tensor(name, self.gated)
        if t is None:
            return None, None
        return (t if self.dtype is None else t.to(self.dtype)), s


def _direction(p: _Params, record, smap_of, kind, x, h, c, sfx, reverse, lengths):
    """One layer and direction over ``x (T, N, in)``: ``(outputs (T, N, out), h_T, c_T)``."""
    T, N = x.shape[:2]
    (w_ih, s0), (b_ih, s1) = p.get("weight_ih" + sfx), p.get("bias_ih" + sfx)
    (w_hh, s2), (b_hh, s3) = p.get("weight_hh" + sfx), p.get("bias_hh" + sfx)
    detached = lambda t: None if t is None else t.detach()  # noqa: E731
    gi = F.linear(x, w_ih.detach(), detached(b_ih))
    smap = smap_of(N, T)
    use = TapUse(record, smap, x.detach().reshape(T * N, -1), slots=(s0, s1, s2, s3))
    trainable = [t for t, s in ((w_ih, s0), (b_ih, s1), (w_hh, s2), (b_hh, s3)) if s is not None]
    gi = TapFn.apply(gi, use, *trainable)
    w_hr, s4 = p.get("weight_hr" + sfx)
    if w_hr is not None:         # the projection's rows at each step: the entries' samples
        step_map = smap_of(N, 1) if smap.layout is not None else \
            SampleMap(entry_ids(smap.ids, N, T, False), smap.n, 1, None, 0)
    outs, hs, rs = [None] * T, [None] * T, [None] * T
    step = _stepper(kind, gi, w_hh.detach(), detached(b_hh))
    for t in (reversed(range(T)) if reverse else range(T)):
        hs[t] = h
        h_new, c_new, rs[t] = step(t, h, c)
        if w_hr is not None:
            h_new = LinearFn.apply(h_new, w_hr, None, LinearUse(record, step_map, False, s4, None))
        if lengths is None:
            h, c, outs[t] = h_new, c_new, h_new
        else:
            on = (t < lengths)[:, None]
            h, outs[t] = torch.where(on, h_new, h), torch.where(on, h_new, torch.zeros_like(h_new))
            c = None if c is None else torch.where(on, c_new, c)
    use.h = torch.stack(hs).detach().reshape(T * N, -1)
    if kind == "gru":
        use.r = torch.stack(rs).detach().reshape(T * N, -1)
    return torch.stack(outs), h, c


class _Recurrent(Rule):
    factor = True
    pieces = "samples"

    @staticmethod
    def inputs(entry, args, kwargs):
        m = entry.module
        if not kwargs and len(args) <= 2:           # (input, hx) as the module takes them
            return m, args[0], args[1] if len(args) == 2 else None, _kind(m)
        sig = entry.cache.get("signature")
        if sig is None:
            sig = entry.cache["signature"] = inspect.signature(type(m).forward)
        a = sig.bind(m, *args, **kwargs).arguments
        return m, a["input"], a.get("hx"), _kind(m)


def _maps(mb, entry, device):
    """Sample maps of ``N`` batch entries of ``L`` steps, time-major. All steps of an entry
    belong to one sample: the state carries each step into the later ones."""
    def smap_of(N, L):
        where = f"module '{entry.name}' input"
        smap = mb.batch_map(N, L, where, device, entry_major=False)
        if L > 1 and smap.layout is None and entry_ids(smap.ids, N, L, False) is None:
            raise ValueError(
                f"ISOPO: {where}: segments give the steps of one sequence to different "
                "samples; the state carries every step into the later ones, so a step's "
                "gradient holds those of the later steps' samples and cannot be credited to "
                "one. Give all steps of a sequence the same sample id (one sample per "
                "sequence)")
        return smap
    return smap_of


@register(nn.RNN, nn.GRU, nn.LSTM)
class RecurrentRule(_Recurrent):
    name = "recurrent"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m, x, hx, kind = self.inputs(entry, args, kwargs)
        packed = isinstance(x, PackedSequence)
        unbatched = not packed and x.dim() == 2
        lengths = source = None
        if packed:
            source = x
            x, lengths = pad_packed_sequence(x)
            lengths = lengths.to(x.device)
        elif unbatched:
            x, hx = x.unsqueeze(1), _batch_axis(hx, kind, 1)
        elif m.batch_first:
            x = x.transpose(0, 1)
        if not packed:
            mb.note_rows(x, 1)
        packed_as = None if source is None else (lengths, source)
        out, h_n, c_n = _in_autocast_dtype(x, lambda dtype: _run(
            mb, layer, entry, m, kind, _cast(x, dtype), _cast(hx, dtype), packed_as, dtype))
        if packed:
            out = _repack(out, source)
        elif unbatched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif m.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if kind == "lstm" else h_n)


def _in_autocast_dtype(x: Tensor, run):
    """``run(dtype)``: under autocast, what autocast would run (the whole recurrence in its
    dtype, ``run`` casting to it); else ``run(None)``."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return run(None)
    with torch.autocast(x.device.type, enabled=False):
        return run(dtype)


def _cast(state, dtype):
    """A tensor, or a tuple of them (an LSTM's state; None entries kept), in ``dtype`` (None: as
    it is)."""
    if state is None or dtype is None:
        return state
    if isinstance(state, tuple):
        return tuple(None if t is None else t.to(dtype) for t in state)
    return state.to(dtype)


def _run(mb, layer, entry, m, kind, x, hx, packed, dtype):
    """All layers and directions; ``packed`` is ``(lengths, the PackedSequence)`` or None; with
    ``dtype`` the parameters are cast to it (autocast)."""
    T, N = x.shape[:2]
    lengths = None if packed is None else packed[0]
    D = 2 if m.bidirectional else 1
    out_size = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    if hx is None:
        h0 = x.new_zeros(m.num_layers * D, N, out_size)
        c0 = x.new_zeros(m.num_layers * D, N, m.hidden_size) if kind == "lstm" else None
    else:
        h0, c0 = hx if kind == "lstm" else (hx, None)
    record, gated = mb.gate(layer)
    p = _Params(entry, gated, dtype)
    smap_of = _maps(mb, entry, x.device)
    hs, cs, inp = [], [], x
    for k in range(m.num_layers):
        outs = []
        for d in range(D):
            i = k * D + d
            o, h, c = _direction(p, record, smap_of, kind, inp, h0[i],
                                 None if c0 is None else c0[i], f"_l{k}" + ("_reverse" * d),
                                 d == 1, lengths)
            outs.append(o)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, -1) if D > 1 else outs[0]
        if k < m.num_layers - 1 and m.dropout and m.training:
            inp = _dropout(inp, m.dropout, None if packed is None else packed[1])
    return inp, torch.stack(hs), (torch.stack(cs) if kind == "lstm" else None)


def _packed_rows(source: PackedSequence):
    """``(t, entry)`` of every row of ``source.data``."""
    order = source.sorted_indices
    for t, b in enumerate(source.batch_sizes.tolist()):
        yield t, (order[:b] if order is not None else torch.arange(b))


def _repack(out: Tensor, source: PackedSequence) -> PackedSequence:
    """``out (T, N, ·)`` in the packed layout of ``source`` (same batch sizes and orders)."""
    data = torch.cat([out[t, rows] for t, rows in _packed_rows(source)])
    return PackedSequence(data, source.batch_sizes, source.sorted_indices,
                          source.unsorted_indices)


def _dropout(x: Tensor, p: float, source: PackedSequence | None) -> Tensor:
    """Dropout between layers, drawn over the rows PyTorch draws it over (the packed data of a
    packed input)."""
    if source is None:
        return F.dropout(x, p, True)
    data = F.dropout(_repack(x, source).data, p, True)
    out, start = torch.zeros_like(x), 0
    for t, rows in _packed_rows(source):
        out[t, rows] = data[start:start + rows.numel()]
        start += rows.numel()
    return out


@register(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
class CellRule(_Recurrent):
    """One step of a recurrent cell, called in the user's own loop over time."""

    name = "recurrent_cell"

    def forward(self, mb, layer, entry, orig, args, kwargs):
        m, x, hx, kind = self.inputs(entry, args, kwargs)
        _check_state(entry.name, kind, x, hx, m.hidden_size)
        single = x.dim() == 1
        if single:
            x, hx = x[None], _batch_axis(hx, kind, 0)
        if hx is None:
            h = x.new_zeros(x.shape[0], m.hidden_size)
            c = h if kind == "lstm" else None
        else:
            h, c = hx if kind == "lstm" else (hx, None)
        record, gated = mb.gate(layer)
        out = _in_autocast_dtype(x, lambda dtype: _cell(
            mb, entry, kind, record, _Params(entry, gated, dtype), *_cast((x, h, c), dtype)))
        return _batch_axis(out, kind, 0, add=False) if single else out


def _check_state(name: str, kind: str, x: Tensor, hx, hidden: int) -> None:
    """The cell's state as PyTorch requires it (an LSTM's as ``(h, c)``), each of the input's
    batch and the cell's hidden size."""
    if hx is None:
        return
    if kind == "lstm" and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise TypeError(f"ISOPO: module '{name}' (LSTMCell) takes its state as a tuple (h, c)")
    want = (*x.shape[:-1], hidden)
    for t in (hx if kind == "lstm" else (hx,)):
        if not isinstance(t, Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise RuntimeError(f"ISOPO: module '{name}': the state has shape {got}, but an input "
                               f"of shape {tuple(x.shape)} needs {want}")


def _cell(mb, entry, kind, record, p: _Params, x, h, c):
    """One step of a cell: ``h'``, or ``(h', c')`` for an LSTM."""
    (w_ih, s0), (b_ih, s1) = p.get("weight_ih"), p.get("bias_ih")
    (w_hh, s2), (b_hh, s3) = p.get("weight_hh"), p.get("bias_hh")
    smap = mb.batch_map(x.shape[0], 1, f"module '{entry.name}' input", x.device)
    use = CellUse(record, smap, (s0, s1, s2, s3), kind == "gru")
    pre = CellFn.apply(x, h, w_ih, b_ih, w_hh, b_hh, use)
    if use.split:                          # GRU: the reset gate scales the new gate's hidden part
        (gi, gh), k = pre, pre[0].shape[-1] // 3
        return _gru(gi[..., :2 * k] + gh[..., :2 * k], gi[..., 2 * k:], gh[..., 2 * k:], h)[0]
    h_new, c_new, _ = _step(kind, pre, h, c)
    return (h_new, c_new) if kind == "lstm" else h_new


def _batch_axis(state, kind: str, dim: int, add: bool = True):
    """A state (a tensor, or an LSTM's ``(h, c)``) with a batch axis of one added at ``dim`` (an
    unbatched input), or removed again."""
    if state is None:
        return None
    step = (lambda t: t.unsqueeze(dim)) if add else (lambda t: t.squeeze(dim))
    return tuple(step(t) for t in state) if kind == "lstm" else step(state)
