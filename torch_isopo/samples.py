"""Which sample every row of a layer's input belongs to.

A layer sees a tensor whose leading dims ("token shape") index rows and whose last dim (for
dense layers) holds features. ISOPO needs, for every row, the sample it belongs to and the token
it belongs to (inner dims after the token axis, e.g. attention heads, belong to their token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SampleMap:
    """Rows → samples for one use of a layer.

    ``ids[r]`` is the sample of row r. Rows are grouped in tokens of ``inner`` consecutive rows.
    ``layout`` is ``"first"`` when rows are ``(n, T, inner)`` in memory order (padded batch or
    one row per sample), ``"second"`` for ``(T, n, inner)``, ``None`` for free-form segments.
    """

    ids: Tensor
    n: int
    inner: int
    layout: str | None
    T: int

    @property
    def rows(self) -> int:
        return self.ids.numel()

    @property
    def tokens(self) -> int:
        return self.rows // self.inner

    @property
    def trivial(self) -> bool:
        """One row per sample, in order (an MLP policy's rows)."""
        return self.layout == "first" and self.T == 1 and self.inner == 1

    def padded(self, X: Tensor) -> Tensor:
        """``X`` (rows, F) as (n, T', F) with the rows of sample i in slot i (zeros fill)."""
        F = X.shape[-1]
        if self.layout == "first":
            return X.view(self.n, -1, F)
        if self.layout == "second":
            return X.view(self.T, self.n, self.inner, F).transpose(0, 1).reshape(self.n, -1, F)
        counts = torch.bincount(self.ids, minlength=self.n)
        order = torch.argsort(self.ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(self.rows, device=X.device) - starts[self.ids[order]]
        width = int(counts.max()) if self.rows else 0
        out = X.new_zeros(self.n, max(width, 1), F)
        out[self.ids[order], pos] = X[order]
        return out

    def reduce(self, M: Tensor, dim: int) -> Tensor:
        """Sum the rows of ``M`` along ``dim`` into samples."""
        if self.layout == "first":       # rows of sample i are contiguous
            shape = list(M.shape)
            shape[dim:dim + 1] = [self.n, -1]
            return M.reshape(shape).sum(dim + 1)
        if self.layout == "second" and self.inner == 1:      # rows are (T, n)
            shape = list(M.shape)
            shape[dim:dim + 1] = [self.T, self.n]
            return M.reshape(shape).sum(dim)
        shape = list(M.shape)
        shape[dim] = self.n
        return M.new_zeros(shape).index_add_(dim, self.ids, M)


def sample_map(token_shape: torch.Size, n: int, segments: Tensor | None, sample_dim: int,
               where: str, device: torch.device) -> SampleMap:
    """Build the row → sample map of one layer input, or raise a clear error.

    Rules (docs/layers.md, "Samples"): with ``segments``, one id per token (the first two dims of
    a ≥2-D token shape, sequence-major: ``(B, L)`` also for time-major ``(L, B)`` rows with
    ``sample_dim=1``, as for the layers that know their batch axis; or each row of a 1-D one);
    otherwise a ≥2-D token shape has its samples
    along ``sample_dim`` (0 or 1) and a 1-D token shape has one sample per row. A microbatch of
    one sample owns every row (an unbatched episode ``(T, d)``).
    """
    dims = tuple(token_shape)
    it = "the output" if where.endswith("output") else "the input"
    if n == 1:                            # one sample: every row is its own, whatever the layout
        lead = dims[0] if len(dims) == 1 else dims[sample_dim] if dims else None
        if lead != 1 or segments is not None:
            return one_sample(math.prod(dims), math.prod(dims[2:]) if len(dims) > 2 else 1, device)
    if len(dims) == 0:
        raise ValueError(
            f"ISOPO: {where}: has no rows to map to samples (a 0-d tensor, or one vector of "
            "features that is not computed per sample). Give it a row per sample "
            "(v.expand(n, *v.shape)); a module that returns its parameter as it is should leave "
            "the parameter on its parent module, where ISOPO follows it to the samples; the "
            "samples of a forward per sample (a loop, one vector each) go in one batch, a row "
            "each")
    inner = math.prod(dims[2:]) if len(dims) > 2 else 1
    tokens = math.prod(dims[:2])
    if segments is not None:
        if segments.numel() != tokens:
            raise ValueError(
                f"ISOPO: {where}: segments has {segments.numel()} entries but {it} has {tokens} "
                f"tokens (token shape {dims}); give one sample id per token"
                + (_STEPPED if len(dims) == 1 and segments.numel() % tokens == 0 else ""))
        if len(dims) == 1 and sample_dim == 1:
            raise ValueError(
                f"ISOPO: {where}: {dims[0]} rows with segments in a time-major microbatch "
                "(sample_dim=1): ISOPO cannot tell whether they were flattened from (T, B) "
                "(time-major) or (B, T) (sequence-major), and segments are sequence-major. Give "
                "the module the (T, B, d) tensor itself, which it reads with sample_dim=1")
        ids = segments.to(device).reshape(-1)
        if len(dims) >= 2 and sample_dim == 1:   # sequence-major ids of time-major rows
            ids = ids.view(dims[1], dims[0]).T.reshape(-1)
        if inner > 1:
            ids = ids.repeat_interleave(inner)
        return SampleMap(ids, n, inner, None, 0)
    if len(dims) == 1:
        if dims[0] != n:
            raise ValueError(
                f"ISOPO: {where}: {it} has {dims[0]} rows (one sample each) but {n} advantages "
                "were given. If its rows are parts of samples (episodes, flattened sequences), "
                "pass segments= to say which sample each row belongs to; if it is shared by all "
                "samples (a table of positions from torch.arange(T), say), give it a sample axis "
                + ("of size 1 (torch.arange(T)[None]): the module's output then holds one copy per "
                   "sample along that axis, to be broadcast against the batch (x + wpe(pos[None])), "
                   if sample_dim == 0 else
                   "of size 1 on dim 1 (torch.arange(T)[:, None], sample_dim=1): the module's "
                   "output then holds one copy per sample along that axis, to be broadcast "
                   "against the batch (x + wpe(pos[:, None])), ")
                + "not indexed or reduced along it" + _OTHER_ROWS)
        return SampleMap(torch.arange(n, device=device), n, 1, "first", 1)
    if dims[sample_dim] != n:
        raise ValueError(
            f"ISOPO: {where}: {it} of token shape {dims} has {dims[sample_dim]} samples along dim "
            f"{sample_dim} but {n} advantages were given; pass segments= for packed inputs or "
            + ("sample_dim= for sequence-first inputs; give an input shared by all samples "
               "size 1 on dim 0 (a table of ids built from torch.arange: ids[None])"
               if sample_dim == 0 else
               "give an input shared by all samples size 1 on dim 1 (torch.arange(T)[:, None], "
               "not torch.arange(T)[None])") + _OTHER_ROWS)
    T = dims[1 - sample_dim]
    base = torch.arange(n, device=device)
    if sample_dim == 0:
        ids = base.repeat_interleave(T * inner)
        return SampleMap(ids, n, inner, "first", T)
    ids = base.repeat_interleave(inner).repeat(T)
    return SampleMap(ids, n, inner, "second", T)


def entry_ids(ids: Tensor, N: int, L: int, entry_major: bool = True) -> Tensor | None:
    """One id per batch entry of ``N`` entries of ``L`` rows each (stored ``(N, L)``, or
    ``(L, N)``), or None where the ids differ within an entry."""
    rows = ids.view(N, L) if entry_major else ids.view(L, N).T
    return rows[:, 0].contiguous() if bool((rows == rows[:, :1]).all()) else None


def one_sample(rows: int, inner: int, device) -> SampleMap:
    """A microbatch of one sample: every row is that sample's, whatever the input's layout (an
    episode's ``(T, d)`` observations without a batch axis)."""
    return SampleMap(torch.zeros(rows, dtype=torch.long, device=device), 1, inner, "first",
                     rows // max(inner, 1))


def batch_map(N: int, L: int, n: int, segments: Tensor | None, where: str,
              device: torch.device, entry_major: bool = True, sample_dim: int = 0,
              locations: bool = False) -> SampleMap:
    """Rows → samples for a layer whose batch axis is known (convolutions, attention, recurrent
    layers): ``N`` batch entries of ``L`` rows each, stored ``(N, L)`` (entry-major) or ``(L, N)``.
    Entry b is sample b, or ``segments[b]`` (one id per entry, or one per row). With
    ``locations`` the rows are an input's locations (a convolution's): ids per row that differ
    within one of several entries are refused (they cannot be told from ids meant for other
    rows). In a time-major microbatch one id per entry of a batch-first input is refused: its
    entries may have been flattened from ``(T, B)`` or from ``(B, T)``; ids per location follow
    the entries' order, sequence-major like every layer's."""
    if n == 1 and (N != 1 or segments is not None):     # one sample: every row is its own
        return one_sample(N * L, 1, device)
    if segments is None:
        if N != n:
            raise ValueError(f"ISOPO: {where}: the input has a batch of {N} but {n} advantages "
                             "were given; " + (
                                 "in a time-major microbatch (sample_dim=1) a batch flattened "
                                 "from (T, B) cannot be told from one flattened from (B, T): "
                                 "call the module on each step's (B, ...) batch, one entry per "
                                 "sample" if sample_dim == 1 and entry_major and N % n == 0 else
                                 "pass segments= to say which sample each batch entry belongs "
                                 "to") + _OTHER_ROWS)
        base = torch.arange(n, device=device)
        if entry_major:
            return SampleMap(base.repeat_interleave(L), n, 1, "first", L)
        return SampleMap(base.repeat(L), n, 1, "second", L)
    if segments.numel() == N:
        if entry_major and N > 1 and sample_dim == 1:     # entries maybe flattened from (T, B)
            raise _time_major_entries(where, N)
        seg = segments.to(device)
        return SampleMap(seg.repeat_interleave(L) if entry_major else seg.repeat(L), n, 1, None, 0)
    if segments.numel() == N * L:
        seg = segments.to(device)
        if locations and N > 1 and entry_ids(seg, N, L) is None:
            raise ValueError(
                f"ISOPO: {where}: segments has {N * L} entries, one per location of its "
                f"{N} batch entries of {L} locations, and they differ within an entry: ISOPO "
                "cannot tell them from ids meant for other rows (another layer's entries, as "
                "many by coincidence). Give each sample batch entries of its own (one id per "
                "entry), or pack the samples along one row (a batch of one entry)")
        return SampleMap(seg if entry_major else seg.view(N, L).T.reshape(-1), n, 1, None, 0)
    raise ValueError(f"ISOPO: {where}: segments has {segments.numel()} entries but the input has "
                     f"a batch of {N} with {L} positions each; give one sample id per batch "
                     "entry" + (_STEPPED if L == 1 and segments.numel() % N == 0 else ""))


def _time_major_entries(where: str, N: int) -> ValueError:
    return ValueError(
        f"ISOPO: {where}: a batch of {N} entries with one id each in a time-major microbatch "
        "(sample_dim=1): ISOPO cannot tell whether they were flattened from (T, B) (time-major) "
        "or (B, T) (sequence-major), and segments are sequence-major. Call the module on each "
        "step's (B, ...) batch (one entry per sample, sample_dim=1 without segments), or keep "
        "every tensor batch-first with sample_dim=0, where segments follow each input's memory "
        "order")


_OTHER_ROWS = (". A call whose output is never back-propagated (a target) can run under "
               "torch.no_grad(); several inputs of each sample stacked along the batch (obs and "
               "next_obs) can each have their own call; a module run on some rows only (an "
               "expert or head on h[idx]) can run on all rows, its outputs picked after "
               "(torch.where, gather); a forward per sample (a loop, a batch of one each) is run "
               "as one batch: padded, with a mask, or packed along one row with segments=")

_STEPPED = (" (a module stepped once per time step on the batch, as in CleanRL's recurrent PPO, "
            "cannot tell which step runs from ids given per row: keep every tensor in its "
            "(T, B, ...) layout and pass sample_dim=1 without segments, one sample per batch "
            "entry; for several inputs of each sample stacked along the batch for another "
            "module (obs and next_obs), give each input a call of its own, without segments)")


def expand_shared(t, n: int, segments: Tensor | None, sample_dim: int, token_dims: int):
    """An input shared by all samples (size 1 on the sample axis, e.g. GPT-2's position ids
    ``(1, L)``) is expanded to ``n`` so each sample's gradient stays visible after broadcasting.

    ``token_dims`` is how many leading dims index rows (``t.dim() - 1`` for features last).
    """
    if (isinstance(t, Tensor) and segments is None and n > 1 and token_dims >= 2
            and t.shape[sample_dim] == 1):
        shape = list(t.shape)
        shape[sample_dim] = n
        return t.expand(shape)
    return t
