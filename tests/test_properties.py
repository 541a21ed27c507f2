"""Property tests against the float64 brute force (``torch_isopo.reference``).

Random layer sizes, 1..16 samples, random segments (empty and one-row samples, rows in any
order), duplicated samples (rank-deficient K), samples with zero gradient (zero weight, or all
padding), advantages with zeros, all equal, and magnitudes from 1e-20 to 1e20. Every gradient is
finite and equals the brute force; where the math leaves ``c`` open the documented choice holds
on both sides (ν_i = 0 without damping: ``c_i = 0``; K = 0: ``c = A``, contracted with zero).
"""
import copy

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import run_isopo
from torch_isopo import ISOPO
from torch_isopo.reference import reference_gradients

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODES = [("reinforce", 1.0), ("ntk", 1e-3), ("ntk", 0.5), ("ntk", 10.0), ("fisher", 0.0),
         ("fisher", 0.5)]


def _assert_matches(model, losses, A, mode, damping, segments=None):
    """Every gradient is finite and equals the brute force to 1e-8 of its norm, up to rounding
    (1e-10) of the size it has before samples cancel (duplicates with opposite advantages):
    ``‖A‖ · ‖G‖`` with ``G`` the per-sample gradients (``‖c‖ ≤ ‖A‖`` for reinforce and ntk), or
    for fisher, whose ``c_i = A_i f_i`` with ``f_i ≥ 0``, the gradient made with ``|A|``."""
    A = torch.tensor(A, dtype=torch.float64)
    ref = copy.deepcopy(model)
    expected, _ = reference_gradients(ref, lambda: losses(ref), A, mode, damping, segments)
    size = {q: float(A.norm()) * float(g.norm()) for q, g in _per_sample(ref, losses).items()}
    if mode == "fisher":
        size, _ = reference_gradients(ref, lambda: losses(ref), A.abs(), mode, damping, segments)
        size = {q: float(g.norm()) for q, g in size.items()}
    m, _ = run_isopo(model, losses, A, mode, damping=damping, segments=segments)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        want = expected[q]
        assert torch.isfinite(p.grad).all(), f"{mode}: {name} is not finite"
        err = float((p.grad - want).norm())
        assert err <= 1e-8 * float(want.norm()) + 1e-10 * size[q], (
            f"{mode}: {name} error {err:.2e}, gradient norm {float(want.norm()):.2e}")


def _per_sample(model, losses):
    """``{parameter: (n, ...) per-sample gradients}`` by plain autograd."""
    params = list(model.parameters())
    ell = losses(model)
    rows = [torch.autograd.grad(ell[i], params, retain_graph=True, allow_unused=True)
            for i in range(ell.numel())]
    return {p: torch.stack([torch.zeros_like(p) if r[k] is None else r[k] for r in rows])
            for k, p in enumerate(params)}


def _value():
    magnitude = st.floats(-20, 20).map(lambda e: 10.0 ** e)
    signed = st.tuples(st.sampled_from([-1.0, 1.0]), magnitude).map(lambda t: t[0] * t[1])
    return st.one_of(st.just(0.0), signed)


def _advantages(n):
    return st.one_of(st.lists(_value(), min_size=n, max_size=n),
                     _value().map(lambda v: [v] * n))          # all equal (all zero included)


@st.composite
def episodes(draw):
    """An MLP policy on rows grouped into episodes by ``segments``."""
    n = draw(st.integers(1, 16))
    # a LayerNorm of width 1 has an exactly zero gradient that the brute force (and only it)
    # turns into rounding noise: widths start at 2
    sizes = [draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 4))]
    rows = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    copies = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3))
    for i, j in copies:                       # sample j repeats sample i: K is rank-deficient
        rows[j] = rows[i]
    assume(sum(rows) > 0)
    silent = draw(st.sets(st.integers(0, n - 1), max_size=n))    # zero-weight samples
    A = draw(_advantages(n))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2 ** 16))
    return n, sizes, rows, copies, silent, A, mode, seed


@given(episodes())
@SETTINGS
def test_mlp_episodes_match_the_brute_force(case):
    n, (d_in, hidden, out), rows, copies, silent, A, (mode, damping), seed = case
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(k, d_in, generator=g, dtype=torch.float64) for k in rows]
    acts = [torch.randint(0, out, (k,), generator=g) for k in rows]
    for i, j in copies:
        X[j], acts[j] = X[i].clone(), acts[i].clone()
    seg = torch.cat([torch.full((x.shape[0],), i) for i, x in enumerate(X)])
    order = torch.randperm(seg.numel(), generator=g)             # rows in any order
    X, acts, seg = torch.cat(X)[order], torch.cat(acts)[order], seg[order]
    w = torch.tensor([0.0 if i in silent else 1.0 / seg.numel() for i in range(n)],
                     dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.LayerNorm(hidden),
                          nn.Linear(hidden, out)).double()

    def losses(m):
        logp = torch.log_softmax(m(X), -1).gather(1, acts[:, None]).squeeze(1)
        return -torch.zeros(n, dtype=logp.dtype).index_add(0, seg, logp) * w
    _assert_matches(model, losses, A, mode, damping, segments=seg)


@st.composite
def sequences(draw):
    """A token model on a padded ``(n, L)`` batch; some samples are all padding."""
    n = draw(st.integers(1, 16))
    L = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, L), min_size=n, max_size=n).filter(sum))
    d = draw(st.integers(1, 4))
    A = draw(_advantages(n))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2 ** 16))
    return n, L, lengths, d, A, mode, seed


@given(sequences())
@SETTINGS
def test_padded_sequences_match_the_brute_force(case):
    n, L, lengths, d, A, (mode, damping), seed, vocab = *case, 5
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).double()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, d), nn.Linear(d, d), nn.Tanh(),
                          nn.Linear(d, vocab)).double()

    def losses(m):
        logp = torch.log_softmax(m(ids), -1).gather(-1, ids[..., None]).squeeze(-1)
        return -(logp * mask).sum(1) / mask.sum()
    _assert_matches(model, losses, A, mode, damping)


def test_a_layer_without_gradient_is_no_history():
    """A zero-initialised LoRA-style ``up`` leaves ``down`` without gradient (K = 0, m = 0) in the
    first step: that step does not enter ``down``'s average, so the second step uses its own
    ``m``, not a damping of zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 3, bias=False)).double()
    nn.init.zeros_(model[1].weight)
    X = torch.randn(4, 3, dtype=torch.float64)
    A = torch.randn(4, dtype=torch.float64)
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.5), mode="ntk", damping=0.5, ema=0.9)

    def losses(net):
        return (net(X) - 1).square().sum(1)
    with opt.microbatch(A):
        losses(m).sum().backward()
    assert not m[0].weight.grad.any()
    opt.step()
    opt.zero_grad()
    assert set(opt._m) == {"1"}
    with opt.microbatch(A):
        losses(m).sum().backward()
    ref = copy.deepcopy(m)
    want, _ = reference_gradients(ref, lambda: losses(ref), A, "ntk", 0.5, m=dict(opt._m))
    for p, q in zip(m.parameters(), ref.parameters()):
        assert float((p.grad - want[q]).norm() / want[q].norm()) < 1e-10
