"""Mixed precision: fp16 with ``torch.amp.GradScaler`` and bf16 autocast (on CPU).

An overflow in the backward reaches ``.grad`` as inf/NaN, so the scaler skips the step exactly as
it would without ISOPO; a skipped step leaves no trace in ISOPO's statistics; no NaN reaches the
parameters; the loss scale changes neither the statistics nor the unscaled gradient.
"""
import copy

import pytest
import torch
from torch import nn

from torch_isopo import ISOPO
from torch_isopo.coefficients import condition_number, fisher_coefficients, fisher_nu2
from torch_isopo.reference import reference_gradients

N = 8


def _policy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(step, poison=()):
    """Step ``step``'s states and actions; a poisoned step has an inf in one state."""
    g = torch.Generator().manual_seed(step)
    X, acts = torch.randn(N, 6, generator=g), torch.randint(0, 4, (N,), generator=g)
    if step in poison:
        X[0, 0] = float("inf")
    return X, acts


def _losses(model, X, acts, dtype=None):
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        logits = model(X)
    return -torch.log_softmax(logits.float(), -1).gather(1, acts[:, None]).squeeze(1)


def _train(model, steps, *, isopo=None, A=torch.ones(N), dtype=torch.float16, scaler=None,
           first=0, poison=(), isopo_zero_grad=True):
    """Train with a GradScaler; returns per-step (scale after update, parameters, skipped)."""
    inner = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = scaler or torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    opt = ISOPO(model, inner, grad_scaler=scaler, **isopo) if isopo is not None else inner
    history = []
    for step in range(first, first + steps):
        X, acts = _batch(step, poison)
        if isopo is not None:
            with opt.microbatch(A):
                scaler.scale(_losses(model, X, acts, dtype).sum()).backward()
        else:
            scaler.scale((A * _losses(model, X, acts, dtype)).sum()).backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad() if isopo_zero_grad else model.zero_grad()
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert moved == finite                     # skipped exactly when .grad is not finite
        assert all(torch.isfinite(p).all() for p in model.parameters())
        history.append((scaler.get_scale(), [p.detach().clone() for p in model.parameters()],
                        not finite))
    return history, opt


# fp16: a scale that doubles every clean step overflows every few steps; bf16 has fp32's range,
# so its overflows come from a poisoned input
PRECISIONS = [(torch.float16, ()), (torch.bfloat16, (2, 5, 6))]


@pytest.mark.parametrize("dtype, poison", PRECISIONS, ids=["fp16", "bf16"])
def test_reinforce_under_a_scaler_is_autograd_bit_for_bit(dtype, poison):
    """With ``A = 1`` ISOPO's reinforce gradient is autograd's: the same overflows, the same
    skipped steps, the same scales and parameters at every step."""
    model = _policy()
    runs = [_train(copy.deepcopy(model), 10, isopo=isopo, dtype=dtype, poison=poison)[0]
            for isopo in (None, dict(mode="reinforce"))]
    assert any(skip for _, _, skip in runs[0]) and not all(skip for _, _, skip in runs[0])
    for (s1, p1, k1), (s2, p2, k2) in zip(*runs):
        assert s1 == s2 and k1 == k2
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
@pytest.mark.parametrize("dtype, poison", PRECISIONS, ids=["fp16", "bf16"])
def test_overflows_are_skipped_and_leave_the_statistics_finite(mode, dtype, poison):
    history, opt = _train(_policy(), 10, isopo=dict(mode=mode, ema=0.9), A=torch.randn(N),
                          dtype=dtype, poison=poison)
    skipped = [skip for _, _, skip in history]
    assert any(skipped) and not all(skipped)
    if poison:
        assert [i for i, skip in enumerate(skipped) if skip] == list(poison)
    assert opt._m and all(0 < m < float("inf") for m in opt._m.values())


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_a_skipped_step_leaves_no_trace(mode):
    """An overflowing first step, then three clean ones, ends exactly where the three clean
    steps alone end: the skipped step's statistics were discarded with its gradients."""
    model = _policy()
    kw = dict(isopo=dict(mode=mode, ema=0.9), A=torch.randn(N))
    overflow = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30,
                                    growth_interval=100)
    a, _ = _train(copy.deepcopy(model), 4, scaler=overflow, **kw)
    clean = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=100)
    b, _ = _train(copy.deepcopy(model), 3, first=1, scaler=clean, **kw)
    assert [skip for _, _, skip in a] == [True, False, False, False]
    assert all(torch.equal(p, q) for p, q in zip(a[-1][1], b[-1][1]))


def test_statistics_survive_a_skipped_step_without_isopo_zero_grad():
    """A loop that zeroes through the model keeps the skipped step's (NaN) figures until the
    next step; they never enter the moving average."""
    history, opt = _train(_policy(), 4, isopo=dict(mode="ntk", ema=0.9), A=torch.randn(N),
                          scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 40,
                                                      backoff_factor=2.0 ** -30),
                          isopo_zero_grad=False)
    assert history[0][2] and not any(skip for _, _, skip in history[1:])
    assert opt._m and all(0 < m < float("inf") for m in opt._m.values())


def test_the_clean_microbatch_of_a_step_after_a_skipped_one_counts():
    """A step skipped for an overflow, its figures kept by a loop zeroing through the model:
    at the next step each layer's finite figures enter the moving average, its NaN ones stay
    out; a layer whose figure overflowed gets the next step's clean one, as after
    ``opt.zero_grad``."""
    averages = []
    for skipped in (False, True):
        model = _policy()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=100)
        opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=1e-2), mode="ntk", ema=0.5,
                    grad_scaler=scaler)
        for step in (0, 1, 2) if skipped else (0, 2):
            X, acts = _batch(step, poison=(1,))
            with opt.microbatch(torch.ones(N)):
                scaler.scale(_losses(model, X, acts, torch.bfloat16).sum()).backward()
            if step == 1:
                assert not torch.isfinite(model[0].weight.grad).all()
            scaler.step(opt)
            scaler.update()
            model.zero_grad()                         # (not opt.zero_grad())
        averages.append(dict(opt._m))
    assert averages[1]["0"] == averages[0]["0"]        # the NaN figure stayed out


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_loss_scale_changes_nothing_after_unscaling(mode):
    """With ``grad_scaler=`` the statistics are in units of the unscaled loss and the fisher
    gradient follows the loss scale: a scale that doubles every step (fp32, no overflow) gives
    the parameters of a run without a scaler."""
    model = _policy()
    A = torch.randn(N)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=3.0, growth_interval=1)):
        m = copy.deepcopy(model)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=1e-2), mode=mode, ema=0.5,
                    grad_scaler=scaler)
        for step in range(4):
            X, acts = _batch(step)
            with opt.microbatch(A):
                loss = _losses(m, X, acts).sum()
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        runs.append((m, opt))
    (m1, o1), (m2, o2) = runs
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for name in o1._m:
        assert o1._m[name] == pytest.approx(o2._m[name], rel=1e-6)


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
@pytest.mark.parametrize("size", [1e6, 1e-6])
def test_fp16_holds_any_advantage_scale(mode, size):
    """Advantages far outside fp16's range (the transform is linear in them) give the fp32
    gradient to fp16 accuracy, not inf (a scaler would skip every step) or zero."""
    model = _policy()
    X, acts = _batch(0)
    A = torch.randn(N) * size
    grads = []
    for dtype in (torch.float16, None):
        m = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=1e-2), mode=mode, ema=None,
                    grad_scaler=scaler)
        with opt.microbatch(A):
            scaler.scale(_losses(m, X, acts, dtype).sum()).backward()
        scaler.unscale_(opt)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.isfinite(grads[0]).all()
    err = float((grads[0] - grads[1]).norm() / grads[1].norm())
    assert err < 2e-2


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_float32_kernel_overflow_gives_nan_not_a_wrong_gradient(mode):
    """K and the Fisher sums are formed in float32 for float32 models: per-sample gradients of
    norm ~1e20 overflow them. The gradient is then NaN (a scaler skips), never a finite wrong
    value; in float64 it is finite."""
    model = nn.Linear(3, 2)
    X = torch.randn(4, 3) * 1e10
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, ema=None)
        with opt.microbatch(torch.randn(4)):
            (m(X.to(dtype)) * 1e10).sum().backward()
        finite = torch.isfinite(m.weight.grad).all()
        assert bool(finite) == (dtype == torch.float64)
        if dtype == torch.float32:
            assert torch.isnan(m.weight.grad).all() and torch.isnan(m.bias.grad).all()


@pytest.mark.parametrize("dots, norms", [([[1.0, float("inf")]], [1.0]),
                                         ([[1.0, 2.0]], [float("inf")])],
                         ids=["products", "norms"])
def test_overflowed_fisher_statistics_give_nan_not_zero(dots, norms):
    """ν² from overflowed probe products or norms is NaN, so ``c`` is NaN, never a silent 0."""
    nu2 = fisher_nu2(torch.tensor(dots), torch.tensor(norms))
    for damping in (0.0, 0.5):
        assert torch.isnan(fisher_coefficients(nu2, torch.ones(2), damping).c).all()


def test_low_rank_solve_equals_the_kernel_solve():
    """A layer with fewer parameters than samples solves in its own dimensions (Woodbury)."""
    from torch_isopo.coefficients import ntk_coefficients, ntk_low_rank
    torch.manual_seed(0)
    G = torch.randn(40, 6, dtype=torch.float64)
    A = torch.randn(40, dtype=torch.float64)
    K = G @ G.T
    for m_used in (None, 2.5):
        want = ntk_coefficients(K, A, 0.7, m_used)
        got = ntk_low_rank(G, A, 0.7, m_used)
        assert torch.allclose(got.c, want.c, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got.rho, want.rho) and torch.allclose(got.m, want.m)
        assert condition_number(got.spectrum, "ntk") > 1e8 and condition_number(K, "ntk") > 1e8


class _Gaussian(nn.Module):
    """A Gaussian policy with a free ``log_std`` (an explicit layer of 3 parameters)."""

    def __init__(self):
        super().__init__()
        self.mean, self.log_std = nn.Linear(4, 3), nn.Parameter(torch.zeros(3))

    def forward(self, x, a):
        return -torch.distributions.Normal(self.mean(x), self.log_std.exp()).log_prob(a).sum(1)


@pytest.mark.parametrize("n", [40, 200], ids=["batched-solve", "woodbury"])
def test_float32_free_parameter_with_little_damping(n):
    """With damping 1e-3 the coefficients are nearly orthogonal to the span of a small layer's
    ``G_i``, and ``Σ c_i G_i`` cancels most of its terms: a float32 model's ``log_std`` gradient
    (``K`` and the contraction in float64) stays within float32's rounding of the float64
    brute force (it was off by up to 1e-2)."""
    from torch_isopo.reference import reference_gradients
    torch.manual_seed(0)
    model = _Gaussian()
    x, a = torch.randn(n, 4), torch.randn(n, 3)
    A = torch.randn(n, dtype=torch.float64)
    ref = copy.deepcopy(model).double()
    want, _ = reference_gradients(ref, lambda: ref(x.double(), a.double()), A, "ntk", 1e-3)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=1e-3, ema=None)
    with opt.microbatch(A):
        model(x, a).sum().backward()
    got, exp = model.log_std.grad.double(), want[ref.log_std]
    assert float((got - exp).norm() / exp.norm()) < 2e-6


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(11, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.h(self.e(x))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.i, self.h = nn.Linear(3, 6), nn.Linear(6, 4)
        self.a = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        h = self.i(x)
        return self.h(self.a(h, h, h)[0])


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv1d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        return self.h(self.c(x.transpose(1, 2)).transpose(1, 2))


LOW_FAMILIES = {"rows": lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)),
                "tokens": _Tokens, "attention": _Attention, "conv": _Conv}


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(LOW_FAMILIES))
def test_16bit_models_are_as_precise_as_their_per_sample_gradients(family, dtype, mode):
    """A 16-bit model with little damping (ntk 0.1, 130 samples): its per-sample gradients are
    16-bit, and ISOPO's gradient is as close to the float64 brute force as the brute force run
    on the 16-bit model itself (its c and sum in float64). Scaling the factors by c in 16 bits
    was up to 6 times further off (Σ c_i G_i cancels most of its terms)."""
    torch.manual_seed(0)
    n, g = 130, torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (n, 5), generator=g) if family == "tokens" else \
        torch.randn(n, 3, generator=g) if family == "rows" else torch.randn(n, 5, 3, generator=g)
    A = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    model = LOW_FAMILIES[family]().double()
    low = copy.deepcopy(model).to(dtype)

    def losses(m):
        inp = x if family == "tokens" else x.to(next(m.parameters()).dtype)
        logp = torch.log_softmax(m(inp).double(), -1)[..., 0]
        return -(logp if family == "rows" else logp.sum(-1))

    # (the two run the layers' ops in different orders, so their 16-bit roundings differ)
    _as_precise_as_its_brute_force(low, model, losses, A, mode, 0.1, slack=2e-3)


def _as_precise_as_its_brute_force(low, wide, losses, A, mode, damping, slack):
    """ISOPO on the 16-bit model ``low`` is as close to the float64 brute force (on ``wide``,
    the same weights in float64) as the brute force run on ``low`` itself."""
    want, _ = reference_gradients(wide, lambda: losses(wide), A, mode, damping)
    own, _ = reference_gradients(low, lambda: losses(low), A, mode, damping)
    m = copy.deepcopy(low)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=damping,
                ema=None, fisher_probes=None)
    with opt.microbatch(A):
        losses(m).sum().backward()
    for (name, p), q, r in zip(m.named_parameters(), wide.parameters(), low.parameters()):
        w = want[q]
        err = float((p.grad.double() - w).norm() / w.norm())
        floor = float((own[r].double() - w).norm() / w.norm())
        assert err <= 2 * floor + slack, f"{name}: {err:.3f} against {floor:.3f}"


@pytest.mark.parametrize("damping", [0.0, 1.0, 10.0])
@pytest.mark.parametrize("certain", ["one", "all"])     # samples whose action is near certain
@pytest.mark.parametrize("wide", ["inputs", "outputs"])   # the factor scaled: the narrower
def test_fp16_fisher_with_near_certain_samples(wide, certain, damping):
    """``fisher``'s ``c_i = A_i / sqrt(ν_i² + ρ)`` is huge for a sample whose gradient is tiny
    (an action already near certain), and the factor it scales (formed in float32) passed
    float16's range when split into its two float16 parts: NaN gradients, which a loss scaler
    skips at every step. Exact to the float16 brute force now."""
    lin = nn.Linear(2, 4) if wide == "inputs" else nn.Linear(4, 2)
    with torch.no_grad():
        w = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
        lin.weight.copy_(w if wide == "inputs" else w.T)
        lin.bias.zero_()
    model = nn.Sequential(lin).half()
    if certain == "one":
        x = torch.tensor([[14.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [14.0, 0.2, 0.0, 1.0]])
        x, a = x[:, :2] if wide == "inputs" else x, torch.tensor([0, 1, 0])
    elif wide == "inputs":
        x, a = torch.tensor([[14.0, 0.0], [0.0, 14.0], [-14.0, 0.0]]), torch.tensor([0, 2, 1])
    else:
        x = torch.tensor([[14.0, 0, 0, 0], [0, 0, 14.0, 0], [0, 14.0, 0, 0]])
        a = torch.tensor([0, 1, 1])
    A = torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64)

    def losses(m):
        z = m(x.to(next(m.parameters()).dtype))
        return -torch.log_softmax(z.double(), -1).gather(-1, a[:, None])[:, 0]

    own, _ = reference_gradients(model, lambda: losses(model), A, "fisher", damping)
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fisher", damping=damping,
                ema=None, fisher_probes=None)
    with opt.microbatch(A):
        losses(m).sum().backward()
    for (name, p), q in zip(m.named_parameters(), model.parameters()):
        assert torch.isfinite(p.grad).all(), name
        err = float((p.grad.double() - own[q].double()).norm() / own[q].double().norm())
        assert err <= 1e-2, f"{name}: {err:.3f}"


@pytest.mark.parametrize("small", [1e-4, 1e-2])
@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_fp16_keeps_samples_of_small_advantage_beside_a_large_one(mode, small):
    """Advantages 1e4 and ``small`` on a float16 policy whose first sample has no gradient left:
    the advantages are divided by 2^14 for the 16-bit factors and the result multiplied back,
    which happened after its cast to float16, where the second sample's part was below its
    smallest number (errors of 0.2 up to the whole gradient lost). As close to the float64 brute
    force as the float16 brute force now."""
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
        lin.bias.zero_()
    model = nn.Sequential(lin).half()
    x, a = torch.tensor([[28.0, 0.0], [2.0, 1.0]]), torch.tensor([0, 1])
    A = torch.tensor([1e4, small], dtype=torch.float64)

    def losses(m):
        z = m(x.to(next(m.parameters()).dtype))
        return -torch.log_softmax(z.double(), -1).gather(-1, a[:, None])[:, 0]

    _as_precise_as_its_brute_force(model, copy.deepcopy(model).double(), losses, A, mode, 0.3,
                                   slack=1e-3)


@pytest.mark.parametrize("family", ["rows", "conv"])
def test_brute_force_under_autocast_in_fisher_mode(family):
    """The brute force recomputes each module call for its Fisher pieces: under the autocast
    state the call ran in (outside it, a bf16 input met a float32 weight and it failed)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = LOW_FAMILIES[family]()
    x = torch.randn(6, 3, generator=g) if family == "rows" else torch.randn(6, 5, 3, generator=g)
    A = torch.randn(6, dtype=torch.float64, generator=g)

    def losses(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = torch.log_softmax(m(x).float(), -1)[..., 0]
        return -(logp if family == "rows" else logp.sum(-1))

    ref = copy.deepcopy(model)
    want, _ = reference_gradients(ref, lambda: losses(ref), A, "fisher", 1.0)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fisher", damping=1.0,
                ema=None, fisher_probes=None)
    with opt.microbatch(A):
        losses(model).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert float((p.grad - want[q]).norm() / want[q].norm()) < 3e-2
