"""Misuse works as documented or raises a clear error, and the next step is unaffected.

Every test ends with ``_assert_clean``: no open block, no gradients waiting to be checked, the
same patches and parameter hooks as after construction.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal
from torch.utils.checkpoint import checkpoint

from models import VOCAB, llama, lm_losses
import torch_isopo.attach
from torch_isopo import ISOPO
from torch_isopo.attach import PatchedForward
from torch_isopo.reference import reference_gradients


class Block(nn.Module):
    """Square linear layers and a norm, optionally under non-reentrant activation checkpointing
    (square weights: a plain recompute would save tensors of the same shapes)."""

    def __init__(self, d=4, ckpt=False):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.ckpt = ckpt

    def body(self, x):
        return self.norm(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=False) if self.ckpt else self.body(x)


def _losses(model, X):
    return (model(X) ** 2).sum(1) / X.shape[0]


def _make(model, mode="ntk", ema=None, copy_model=True, gates="auto"):
    m = copy.deepcopy(model) if copy_model else model
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=0.5, ema=ema,
                fisher_probes=None, gates=gates)
    return m, opt, _hooks(m)


def _hooks(model):
    return {n: len(p._backward_hooks or {}) for n, p in model.named_parameters()}


def _assert_clean(model, opt, hooks):
    assert opt._attachment.active is None
    assert opt._ledger.made == {}
    assert _hooks(model) == hooks
    for layer in opt.layers:
        for e in layer.entries:
            assert isinstance(e.module.__dict__["forward"], PatchedForward)


def _refused_at_start(m, opt, A, expected: str) -> None:
    """The next block is refused before it starts, naming the change, and writes nothing."""
    with pytest.raises(ValueError, match=expected + r".*opt\.detach\(\); opt = ISOPO"):
        with opt.microbatch(A):
            raise AssertionError("the block must not start")
    assert all(p.grad is None for p in m.parameters())


def _reference(model, losses, A, mode="ntk"):
    ref = copy.deepcopy(model)
    grads, _ = reference_gradients(ref, lambda: losses(ref), A, mode, 0.5)
    return [grads[q] for q in ref.parameters()]


def _assert_grads(model, expected, tol=1e-10):
    for (name, p), want in zip(model.named_parameters(), expected):
        err = float((p.grad - want).norm() / want.norm())
        assert err <= tol, (name, err)


def _fresh_step_matches(model, opt, X, A):
    """The next microbatch gives the gradients a fresh optimizer gives (to rounding: BLAS
    results may depend on memory alignment)."""
    opt.zero_grad()
    twin, twin_opt, _ = _make(model, opt.mode, opt.ema)
    twin_opt.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (twin, twin_opt)):
        with o.microbatch(A):
            _losses(m, X).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-12


@pytest.fixture
def data():
    torch.manual_seed(0)
    f64 = torch.float64
    return Block().double(), torch.randn(5, 4, dtype=f64), torch.randn(5, dtype=f64)


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_backward_twice_with_retain_graph_gives_twice_the_gradient(data, mode):
    """Each backward is one ISOPO transform of that backward's per-sample gradients, added to
    ``.grad`` like autograd's (with probe subsets each backward draws its own probes)."""
    model, X, A = data
    m, opt, hooks = _make(model, mode)
    with opt.microbatch(A):
        loss = _losses(m, X).sum()
        loss.backward(retain_graph=True)
        once = [p.grad.clone() for p in m.parameters()]
        loss.backward()
    for p, g in zip(m.parameters(), once):
        assert torch.equal(p.grad, 2 * g)
    m.zero_grad()
    for p, g in zip(m.parameters(), once):
        p.grad = g
    _assert_grads(m, _reference(model, lambda r: _losses(r, X), A, mode))
    _assert_clean(m, opt, hooks)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("where", ["after", "other", "twice"])
def test_graph_remembers_its_microbatch(data, ckpt, where):
    """A graph back-propagated after its block, inside another block, or both (retain_graph)
    gets the ISOPO gradient of the microbatch that built it; a checkpoint recompute repeats
    ISOPO's forward with that microbatch."""
    model, X, A = data
    model.ckpt = ckpt
    expected = _reference(model, lambda m: _losses(m, X), A)
    m, opt, hooks = _make(model)
    with opt.microbatch(A):
        loss = _losses(m, X).sum()
    if where == "after":
        loss.backward()
    else:
        with opt.microbatch(torch.randn(5, dtype=torch.float64)):
            loss.backward(retain_graph=where == "twice")
        if where == "twice":
            m.zero_grad()
            loss.backward()
    _assert_grads(m, expected)
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


def test_plain_checkpointed_backward_searches_nothing(data, monkeypatch):
    """Once no microbatch's graph is alive, the recompute of a plain checkpointed graph runs the
    plain forward without searching the graph: outside blocks ISOPO costs nothing, bit for bit."""
    model, X, A = data
    model.ckpt = True
    plain = copy.deepcopy(model)
    m, opt, hooks = _make(model, copy_model=False)
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    m.zero_grad()

    def no_search(node, isopo):
        raise AssertionError("searched a graph built outside any microbatch")
    monkeypatch.setattr(torch_isopo.attach, "graph_microbatch", no_search)
    _losses(m, X).sum().backward()
    _losses(plain, X).sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    _assert_clean(m, opt, hooks)


def test_checkpointed_llama_backward_after_the_block():
    torch.manual_seed(0)
    model = llama(checkpointing=True).double()
    ids = torch.randint(3, VOCAB, (2, 6))
    A = torch.randn(2, dtype=torch.float64)
    expected = _reference(model, lambda m: lm_losses(m, ids, None), A)
    m, opt, hooks = _make(model)
    with opt.microbatch(A):
        loss = lm_losses(m, ids, None).sum()
    loss.backward()
    _assert_grads(m, expected, tol=1e-8)
    _assert_clean(m, opt, hooks)


def test_reentrant_checkpointing_inside_the_block():
    """Reentrant checkpointing runs the forward without grad and recomputes in the backward:
    it works when the backward runs inside the block."""
    torch.manual_seed(0)
    model = llama().double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(3, VOCAB, (2, 6))
    A = torch.randn(2, dtype=torch.float64)
    m, opt, hooks = _make(model)
    model.gradient_checkpointing_disable()      # the brute force takes per-sample autograd.grad
    expected = _reference(model, lambda r: lm_losses(r, ids, None), A)
    with opt.microbatch(A):
        lm_losses(m, ids, None).sum().backward()
    _assert_grads(m, expected, tol=1e-8)
    _assert_clean(m, opt, hooks)


class Regions(nn.Module):
    """One Linear applied twice under reentrant checkpointing: both calls in one region, or
    each in its own region."""

    def __init__(self, split):
        super().__init__()
        self.a, self.head, self.split = nn.Linear(4, 4), nn.Linear(4, 3), split

    def twice(self, x):
        return torch.tanh(self.a(torch.tanh(self.a(x))))

    def once(self, x):
        return torch.tanh(self.a(x))

    def forward(self, x, ckpt=True):
        if not ckpt:
            return self.head(self.twice(x))
        if self.split:
            x = checkpoint(self.once, x, use_reentrant=True)
            return self.head(checkpoint(self.once, x, use_reentrant=True))
        return self.head(checkpoint(self.twice, x, use_reentrant=True))


@pytest.mark.parametrize("gates", ["auto", "layer"])
@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_reentrant_region_calling_a_layer_twice(mode, gates):
    """Both calls of a layer in one reentrant region share one gate: exact."""
    torch.manual_seed(0)
    model = Regions(split=False).double()
    X, A = torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
    expected = _reference(model, lambda r: torch.log_softmax(r(X, ckpt=False), -1)[:, 0], A, mode)
    m, opt, hooks = _make(model, mode=mode, gates=gates)
    with opt.microbatch(A):
        torch.log_softmax(m(X), -1)[:, 0].sum().backward()
    _assert_grads(m, expected, tol=1e-8)
    _assert_clean(m, opt, hooks)


@pytest.mark.parametrize("gates", ["auto", "layer"])
def test_a_layer_in_two_reentrant_regions_is_refused(gates):
    """Each reentrant region is back-propagated on its own: a layer used in two cannot have its
    per-sample gradients joined into one K. Refused, naming the layer and the fix."""
    torch.manual_seed(0)
    m, opt, hooks = _make(Regions(split=True).double(), gates=gates)
    X = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="layer 'a' runs in more than one region of reentrant.*"
                                         "use_reentrant=False"):
        with opt.microbatch(torch.randn(5, dtype=torch.float64)):
            torch.log_softmax(m(X), -1)[:, 0].sum().backward()
    _assert_clean(m, opt, hooks)


def test_one_backward_through_two_microbatches_is_an_error(data):
    model, X, A = data
    m, opt, hooks = _make(model)
    with opt.microbatch(A):
        first = _losses(m, X).sum()
    with opt.microbatch(A):
        second = _losses(m, X).sum()
    with pytest.raises(RuntimeError, match=r"graphs of 2 microbatches.*one backward per"):
        (first + second).backward()
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


def test_plain_graph_backpropagated_inside_a_block_is_an_error(data):
    model, X, A = data
    m, opt, hooks = _make(model)
    loss = _losses(m, X).sum()              # built outside any microbatch
    with pytest.raises(RuntimeError, match=r"'norm.weight'.*outside any microbatch"):
        with opt.microbatch(A):
            loss.backward()
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


class Boom(Exception):
    pass


def test_exception_in_the_forward(data):
    model, X, A = data
    m, opt, hooks = _make(model)
    with pytest.raises(Boom):
        with opt.microbatch(A):
            _losses(m, X)
            raise Boom
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


def test_interrupted_backward_then_retry(data):
    """A backward that raises half-way leaves partial gradients, as autograd does (with a gate
    per layer); the retry of the retained graph uses only its own per-sample gradients."""
    model, X, A = data
    m, opt, hooks = _make(model, gates="layer")
    calls = []

    def fail_once(grad):
        calls.append(1)
        if len(calls) == 1:
            raise Boom
    with opt.microbatch(A):
        h = torch.tanh(m.a(X))
        h.register_hook(fail_once)          # between layer b (done) and layer a (not yet)
        loss = (m.norm(torch.tanh(m.b(h))) ** 2).sum(1).sum() / X.shape[0]
        with pytest.raises(Boom):
            loss.backward(retain_graph=True)
        assert m.b.weight.grad is not None and m.a.weight.grad is None
        m.zero_grad()
        loss.backward()
    _assert_grads(m, _reference(model, lambda r: _losses(r, X), A))
    _assert_clean(m, opt, hooks)


def test_failure_after_the_block_leaves_no_stale_gradient(data):
    """A hook that fails before ISOPO's check leaves a made gradient unchecked; a later plain
    backward and the next microbatch are unaffected."""
    model, X, A = data
    plain = copy.deepcopy(model)
    failing = [True]

    def maybe_fail(grad):
        if failing[0]:
            raise Boom
    model.b.weight.register_hook(maybe_fail)     # runs before ISOPO's own hook
    m, opt, hooks = _make(model, copy_model=False)
    with opt.microbatch(A):
        loss = _losses(m, X).sum()
    with pytest.raises(Boom):
        loss.backward()
    failing[0] = False
    m.zero_grad()
    _losses(m, X).sum().backward()               # outside any microbatch: plain autograd
    _losses(plain, X).sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    _fresh_step_matches(m, opt, X, A)
    _assert_clean(m, opt, hooks)


def test_nested_blocks_are_an_error_and_the_outer_block_goes_on(data):
    model, X, A = data
    m, opt, hooks = _make(model)
    with opt.microbatch(A):
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with opt.microbatch(A):
                pass
        _losses(m, X).sum().backward()
    _assert_grads(m, _reference(model, lambda r: _losses(r, X), A))
    _assert_clean(m, opt, hooks)


def test_step_without_a_microbatch_steps_the_inner_optimizer(data):
    """``step()`` with no microbatch steps on whatever gradients are there (none: nothing moves;
    a supervised loss outside any block: plain SGD) and leaves the statistics alone."""
    model, X, A = data
    m, opt, hooks = _make(model, ema=0.9)
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    opt.step()
    opt.zero_grad()
    stats = dict(opt._m)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()                                   # no gradients at all
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    _losses(m, X).sum().backward()               # a plain loss, outside any block
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    for p, q, g in zip(m.parameters(), before, grads):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=0, atol=1e-15)
    assert opt._m == stats and opt.diagnostics == {}
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


def test_block_without_backward_leaves_nothing(data):
    model, X, A = data
    m, opt, hooks = _make(model)
    with opt.microbatch(A):
        _losses(m, X)
    opt.step()
    assert all(p.grad is None for p in m.parameters())
    _assert_clean(m, opt, hooks)
    _fresh_step_matches(m, opt, X, A)


def test_step_inside_the_block(data):
    """``step()`` inside a block, after its backward, steps on its gradients and counts its
    statistics, as after the block."""
    model, X, A = data
    runs = []
    for inside in (True, False):
        m, opt, hooks = _make(model, ema=0.9)
        with opt.microbatch(A):
            _losses(m, X).sum().backward()
            if inside:
                opt.step()
        if not inside:
            opt.step()
        opt.zero_grad()
        runs.append((m, opt))
        _assert_clean(m, opt, hooks)
    (m1, o1), (m2, o2) = runs
    assert o1._m == o2._m and o1._m
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_parameter_of_the_optimizer_outside_the_model(data):
    """A ``log_std`` kept beside the model, in the optimizer: its loss inside a microbatch is
    refused (its gradient would be plain autograd's, without advantages); trained outside any
    block (a critic's own loss) it is plain autograd; added later with ``add_param_group`` it
    is guarded too."""
    model, X, A = data
    log_std, extra = nn.Parameter(torch.zeros(4, dtype=X.dtype)), nn.Parameter(torch.ones(1, dtype=X.dtype))
    opt = ISOPO(model, torch.optim.SGD([*model.parameters(), log_std], lr=0.1))
    hooks = _hooks(model)
    for p, losses in ((log_std, lambda: (model(X) * log_std.exp()).sum(1)),
                      (extra, lambda: _losses(model, X) * extra)):
        if p is extra:
            opt.add_param_group({"params": [extra]})
        with pytest.raises(RuntimeError, match=rf"param group {1 if p is extra else 0} is not a "
                                               r"trainable parameter of the model ISOPO was built "
                                               r"on.*whole agent"):
            with opt.microbatch(A):
                losses().sum().backward()
        assert p.grad is None
        opt.zero_grad()
        losses().sum().backward()                       # outside a block: plain autograd
        assert p.grad is not None
        opt.zero_grad()
    _assert_clean(model, opt, hooks)


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_trainable_parameters_changed_after_building_are_refused(data, change):
    """Layers and their parameters are found when ISOPO is built: a parameter frozen or
    unfrozen later is refused at the next block (unfrozen it would get plain autograd's
    gradient; frozen it would still enter ``K``), before anything runs; rebuilt, it is exact."""
    model, X, A = data
    if change == "unfreeze":
        model.a.bias.requires_grad_(False)
    m, opt, hooks = _make(model)
    m.a.bias.requires_grad_(change == "unfreeze")
    with pytest.raises(ValueError, match=r"parameter 'a\.bias' was (trainable|frozen) when ISOPO "
                                         r"was built.*opt\.detach\(\); opt = ISOPO"):
        with opt.microbatch(A):
            raise AssertionError("the block must not start")
    assert all(p.grad is None for p in m.parameters())
    _assert_clean(m, opt, hooks)
    opt.detach()
    opt = ISOPO(m, opt.optimizer, damping=0.5, ema=None)
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    ref = copy.deepcopy(m)
    want, _ = reference_gradients(ref, lambda: _losses(ref, X), A, "ntk", 0.5)
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (p.grad is None) == (not q.requires_grad)
        if q.requires_grad:
            assert float((p.grad - want[q]).norm() / want[q].norm()) < 1e-10


def test_refused_backward_leaves_no_statistics(data):
    """A backward refused in the block (an L2 penalty on a weight used directly) adds nothing to
    the step's statistics: after it, a clean microbatch and ``step()`` fold exactly the
    statistics a fresh optimizer folds (``ema``), one microbatch per layer."""
    model, X, A = data
    m, opt, hooks = _make(model, ema=0.9)
    twin, twin_opt, _ = _make(model, ema=0.9)
    with pytest.raises(RuntimeError, match=r"did not come from its module's forward.*a penalty on "
                                           r"the parameters.*inner optimizer's weight_decay"):
        with opt.microbatch(A):
            (_losses(m, X).sum() + (m.a.weight ** 2).sum()).backward()
    for p in m.parameters():
        p.grad = None                      # the partial gradients, as after a failed autograd call
    for mm, o in ((m, opt), (twin, twin_opt)):
        with o.microbatch(A):
            _losses(mm, X).sum().backward()
        o.step()
    assert opt._m == twin_opt._m and len(opt._m) == len(opt.layers)
    assert all(d["microbatches"] == 1 for d in opt.diagnostics.values())
    _assert_clean(m, opt, hooks)


@pytest.mark.parametrize("change", ["frozen weight", "new module", "added module"])
def test_parameters_replaced_after_building_are_refused(data, change):
    """A weight swapped for another Parameter (frozen: the old one still entered ``K``, a wrong
    bias gradient) or a module replaced (its parameters got plain autograd's gradient) after
    ISOPO was built: refused at the next block, before anything runs."""
    model, X, A = data
    m, opt, hooks = _make(model)
    if change == "frozen weight":
        m.a.weight = nn.Parameter(m.a.weight.detach().clone(), requires_grad=False)
    elif change == "new module":
        m.a = nn.Linear(4, 4).double()
    else:
        m.extra = nn.Linear(4, 4).double()
    expected = {"frozen weight": r"parameter 'a\.weight' was trainable when ISOPO was built and "
                                 r"is frozen now",
                "new module": r"module 'a' was replaced",
                "added module": r"module 'extra' was added"}[change]
    _refused_at_start(m, opt, A, expected)


class FreeScale(nn.Module):
    """Two Linears, the second tied or not, and a free per-feature scale on the policy itself."""

    def __init__(self, tied: bool):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        if tied:
            self.b.weight = self.a.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


@pytest.mark.parametrize("gates", ["model", "layer"])
@pytest.mark.parametrize("how", ["assign", "load_state_dict"])
def test_a_free_parameter_replaced_after_building_is_the_one_trained(data, gates, how):
    """A free parameter swapped for another trainable Parameter of its shape (a new tensor, or
    ``load_state_dict(assign=True)``) is followed through the forward as the one the module now
    holds: exact, and its gradient lands on the new Parameter (it got plain autograd's
    advantage-free gradient with per-layer gates, and a misleading refusal with one gate)."""
    _, X, A = data
    torch.manual_seed(1)
    model = FreeScale(tied=False).double()
    m, opt, _ = _make(model, gates=gates)
    new = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    if how == "assign":
        m.scale = nn.Parameter(new.clone())
    else:
        m.load_state_dict({**m.state_dict(), "scale": new.clone()}, assign=True)
    model.scale = nn.Parameter(new.clone())
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    for (name, p), want in zip(m.named_parameters(), _reference(model, lambda net: _losses(net, X), A)):
        assert float((p.grad - want).norm() / want.norm()) < 1e-10, name
    assert opt._attachment.active is None and opt._ledger.made == {}


@pytest.mark.parametrize("change", ["added", "tied", "untied", "removed", "list pop",
                                    "list insert", "swapped"])
def test_parameters_added_tied_or_untied_after_building_are_refused(data, change):
    """A trainable Parameter added to a module (it would get plain autograd's gradient), two
    weights tied (each layer would gate the one tensor) or untied (the forward would still use
    the tied one, a silent wrong gradient) after ISOPO was built: refused at the next block,
    before anything runs, with the change named."""
    _, X, A = data
    torch.manual_seed(1)
    model = FreeScale(tied=change == "untied").double()
    model.extra = nn.ModuleList([nn.Identity(), nn.Identity()])
    m, opt, _ = _make(model)
    if change == "added":
        m.shift = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    elif change == "tied":
        m.b.weight = m.a.weight
    elif change == "untied":
        m.b.weight = nn.Parameter(m.a.weight.detach().clone())
    elif change == "removed":
        m.b.bias = None
    elif change == "swapped":
        m.a.weight, m.b.weight = m.b.weight, m.a.weight
    elif change == "list pop":
        m.extra.pop(0)
    else:
        m.extra.insert(0, nn.Identity())
    expected = {"added": r"parameter 'shift' was added",
                "tied": r"parameter 'b\.weight' was tied to 'a\.weight'",
                "untied": r"parameter 'b\.weight' was untied from 'a\.weight'",
                "removed": r"parameter 'b\.bias' was removed",
                "list pop": r"module 'extra\.0' was removed",
                "list insert": r"module 'extra\.0' was added",
                "swapped": r"parameter 'a\.weight' now holds the tensor of 'b\.weight'"}[change]
    _refused_at_start(m, opt, A, expected)


def test_frozen_weights_untied_after_building_are_accepted(data):
    """Ties between frozen parameters do not matter to any layer (a LoRA model's tied base
    embedding untied by ``load_state_dict(assign=True)``): accepted, and exact."""
    _, X, A = data
    torch.manual_seed(1)
    model = FreeScale(tied=True).double()
    model.a.weight.requires_grad_(False)
    m, opt, _ = _make(model)
    m.b.weight = nn.Parameter(m.a.weight.detach().clone(), requires_grad=False)
    model.b.weight = nn.Parameter(model.a.weight.detach().clone(), requires_grad=False)
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    ref = copy.deepcopy(model)
    wants, _ = reference_gradients(ref, lambda: _losses(ref, X), A, "ntk", 0.5)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (not q.requires_grad), name
        if q.requires_grad:
            assert float((p.grad - wants[q]).norm() / wants[q].norm()) < 1e-10, name


def test_a_parameter_replaced_beside_tied_ones_is_followed(data):
    """A tied pair left as it is while another parameter is replaced: the ties are the build's,
    the replaced parameter is followed, exact."""
    _, X, A = data
    torch.manual_seed(1)
    model = FreeScale(tied=True).double()
    m, opt, _ = _make(model)
    new = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    m.scale = nn.Parameter(new.clone())
    model.scale = nn.Parameter(new.clone())
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    for (name, p), want in zip(m.named_parameters(), _reference(model, lambda net: _losses(net, X), A)):
        assert float((p.grad - want).norm() / want.norm()) < 1e-10, name


# -- state left by discarded work, attributes written inside a block, inputs read exactly ------
def _probing(model, ema=0.9):
    m = copy.deepcopy(model)
    return m, ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fisher", damping=0.5,
                    ema=ema, fisher_probes=2)


def _same_next_step(pairs, X, A):
    """The next microbatch and step give the same gradients and statistics in every pair."""
    for m, o in pairs:
        with o.microbatch(A):
            _losses(m, X).sum().backward()
    (m1, o1), (m2, o2) = pairs
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p.grad, q.grad)
    for _, o in pairs:
        o.step()
    assert o1._m == o2._m


@pytest.mark.parametrize("discard", ["failed block", "no backward", "zero_grad after backward",
                                     "zero_grad inside the block", "backward after, zero_grad"])
def test_discarded_microbatches_leave_no_trace_in_the_probes_or_statistics(data, discard):
    """A microbatch dropped without a step (a failed block, one without backward, gradients
    zeroed) changes neither the probes later microbatches draw nor the moving averages."""
    model, X, A = data
    m, opt = _probing(model)
    twin, twin_opt = _probing(model)
    if discard == "failed block":
        with pytest.raises(ValueError, match="advantages"):
            with opt.microbatch(A[:4]):
                _losses(m, X).sum().backward()
        opt.zero_grad()
    elif discard == "no backward":
        with opt.microbatch(A):
            _losses(m, X)
    elif discard == "zero_grad after backward":
        with opt.microbatch(A):
            _losses(m, X).sum().backward()
        opt.zero_grad()
    elif discard == "zero_grad inside the block":
        with opt.microbatch(A):
            _losses(m, X).sum().backward()
            opt.zero_grad()
        assert all(p.grad is None for p in m.parameters())
    else:
        with opt.microbatch(A):
            loss = _losses(m, X).sum()
        loss.backward()
        opt.zero_grad()
    _same_next_step([(m, opt), (twin, twin_opt)], X, A)


def test_refused_backward_after_the_block_leaves_no_statistics(data):
    """One backward through the graphs of two closed blocks is refused; what its first layers
    finished before the refusal does not enter the step's statistics."""
    model, X, A = data
    m, opt, hooks = _make(model, ema=0.9)
    twin, twin_opt, _ = _make(model, ema=0.9)
    losses = []
    for _ in range(2):
        with opt.microbatch(A):
            losses.append(_losses(m, X).sum())
    with pytest.raises(RuntimeError, match="graphs of 2 microbatches"):
        (losses[0] + losses[1]).backward()
    for p in m.parameters():
        p.grad = None                      # the partial gradients, as after a failed autograd call
    assert opt._step_figures == {}
    _same_next_step([(m, opt), (twin, twin_opt)], X, A)
    _assert_clean(m, opt, hooks)


class Gaussian(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.log_std = nn.Parameter(torch.tensor([-0.3, 0.2]))

    def forward(self, x, y):
        return torch.distributions.Normal(self.mu(x), self.log_std.exp()).log_prob(y).sum(-1)


@pytest.mark.parametrize("write", ["zero_grad", "grad = None", "data", "step and zero_grad"])
def test_attributes_of_a_free_parameter_written_inside_a_block(write):
    """Writes to a free parameter's attributes inside a block reach the parameter itself (they
    were lost on its stand-in, leaving a stale log_std gradient for the next step)."""
    torch.manual_seed(0)
    f64 = torch.float64
    model = Gaussian().double()
    X, Y, A = torch.randn(5, 4, dtype=f64), torch.randn(5, 2, dtype=f64), torch.randn(5, dtype=f64)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ntk", ema=None)
    with opt.microbatch(A):
        (-model(X, Y)).sum().backward()
        if write == "zero_grad":
            opt.zero_grad()
        elif write == "grad = None":
            model.log_std.grad = None
        elif write == "data":
            model.log_std.data = torch.full((2,), -1.0, dtype=f64)
        else:
            before = model.log_std.detach().clone()
            opt.step()
            opt.zero_grad()
    if write == "data":
        assert torch.equal(model.log_std.detach(), torch.full((2,), -1.0, dtype=f64))
        return
    assert model.log_std.grad is None
    assert (model.mu[0].weight.grad is None) == (write != "grad = None")
    model.mu.zero_grad()
    if write == "step and zero_grad":
        assert not torch.equal(model.log_std.detach(), before)
    ref = copy.deepcopy(model)
    want, _ = reference_gradients(ref, lambda: -ref(X, Y), A, "ntk", 1.0)
    with opt.microbatch(A):
        (-model(X, Y)).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, want[q], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e-310, 1e300])
def test_advantages_are_read_exactly(data, scale):
    """A list of Python floats is read in float64 (not torch's default float32), and subnormal
    or huge advantages are scaled exactly."""
    model, X, A = data
    A = A * scale
    m, opt, _ = _make(model, mode="reinforce")
    twin, twin_opt, _ = _make(model, mode="reinforce")
    for mm, o, a in ((m, opt, A.tolist()), (twin, twin_opt, A)):
        with o.microbatch(a):
            _losses(mm, X).sum().backward()
    want = _reference(model, lambda r: _losses(r, X), A, "reinforce")
    for p, q, w in zip(m.parameters(), twin.parameters(), want):
        assert torch.equal(p.grad, q.grad)
        assert torch.allclose(p.grad, w, rtol=1e-12, atol=1e-320)   # (subnormals' own rounding)


@pytest.mark.parametrize("given", ["float64 tensor", "numpy array", "int64 segments"])
def test_buffers_reused_inside_the_block_change_nothing(data, given):
    """The advantages and segments are read when the block opens: a caller that reuses their
    buffer before the backward (a rollout buffer refilled, a NaN written) leaves the gradients
    those values give (a float64 tensor or array on the host was read at the backward)."""
    model, X, A = data
    A = A.double()
    seg = torch.arange(len(A))
    want = _reference(model, lambda r: _losses(r, X), A)
    m, opt, _ = _make(model)
    buf = A.clone().numpy() if given == "numpy array" else A.clone()
    with opt.microbatch(buf, seg.clone() if given != "int64 segments" else seg):
        if given == "int64 segments":
            seg.copy_(seg.flip(0))
        else:
            buf[0] = math.nan
            buf[1:] = 7.0
        _losses(m, X).sum().backward()
    _assert_grads(m, want)


def test_a_malformed_state_dict_leaves_everything_as_it_was(data):
    model, X, A = data
    m, opt, _ = _make(model, ema=0.9)
    with opt.microbatch(A):
        _losses(m, X).sum().backward()
    opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    for bad, match in ((dict(sd, isopo={"m": {"a": "x"}, "generator": sd["isopo"]["generator"]}),
                        "malformed"),
                       (dict(sd, isopo={"m": {}, "generator": torch.zeros(3)}), "malformed"),
                       (dict(sd, isopo={"m": {"model.a": 1.0},
                                        "generator": sd["isopo"]["generator"]}),
                        r"layers \['model.a'\] that this model does not have"),
                       *((dict(sd, isopo={"m": {"a": v}, "generator": sd["isopo"]["generator"]}),
                          "must be finite and positive")
                         for v in (math.nan, math.inf, -1.0, 0.0))):
        bad = copy.deepcopy(bad)
        bad["state"] = {}                  # would empty the inner optimizer's state
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert str(opt.state_dict()) == str(before)


@pytest.mark.parametrize("kw,match", [({"fisher_probes": True}, "fisher_probes"),
                                      ({"generator": 42}, "generator must be a torch.Generator")])
def test_settings_refused_when_building(data, kw, match):
    model, _, _ = data
    with pytest.raises((TypeError, ValueError), match=match):
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fisher", **kw)
    assert "forward" not in model.a.__dict__


class ScaledBlock(nn.Module):
    """A residual block with a layer scale beside its Linear children (ConvNeXt, CaiT)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.gamma = nn.Parameter(torch.full((4,), 0.3))

    def forward(self, x):
        return x + self.gamma * self.fc2(torch.tanh(self.fc1(x)))


class MaskedBlock(nn.Module):
    """Attention whose causal mask is built inside the block (nanoGPT, ViT variants)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).split(4, -1)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        scale = torch.full((1,), 0.5, dtype=x.dtype)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) * scale


class CheckpointedGaussian(nn.Module):
    """A free ``log_std`` at the head, a checkpointed block that builds constants inside."""

    def __init__(self, reentrant):
        super().__init__()
        self.inp, self.block, self.mu = nn.Linear(4, 4), MaskedBlock(), nn.Linear(4, 2)
        self.log_std = nn.Parameter(torch.full((2,), -0.3))
        self.reentrant, self.checkpointed = reentrant, True

    def logp(self, x, a):
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant) if self.checkpointed \
            else self.block(h)
        return Normal(self.mu(h), self.log_std.exp()).log_prob(a).sum((1, 2))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_constants_built_in_a_checkpointed_region_beside_a_free_parameter(mode, reentrant):
    """Tensors a checkpointed region builds from nothing (a causal mask, a constant scale) are
    constants, not free parameters: a model with a free parameter elsewhere stays exact."""
    torch.manual_seed(0)
    f64 = torch.float64
    model = CheckpointedGaussian(reentrant).double()
    x, a, A = torch.randn(3, 5, 4, dtype=f64), torch.randn(3, 5, 2, dtype=f64), torch.randn(3)
    ref = copy.deepcopy(model)
    ref.checkpointed = False                       # the brute force runs the plain forward
    want, _ = reference_gradients(ref, lambda: ref.logp(x, a), A.double(), mode, 1.0)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode, damping=1.0,
                fisher_probes=None, ema=None)
    with opt.microbatch(A):
        model.logp(x, a).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert float((p.grad - want[q]).norm() / want[q].norm()) < 1e-10


@pytest.mark.parametrize("reentrant", [False, True])
def test_free_parameter_in_a_checkpointed_region_is_refused(reentrant):
    """A free parameter is followed through the forward's ops, which a checkpoint's recompute
    does not repeat alike: refused (at the forward without reentrance, at the backward with
    it), naming checkpointing."""
    torch.manual_seed(0)
    f64 = torch.float64
    inp, block, head = nn.Linear(4, 4).double(), ScaledBlock().double(), nn.Linear(4, 1).double()
    model = nn.ModuleDict({"inp": inp, "block": block, "head": head})
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(3, 4, dtype=f64)
    error = ValueError if not reentrant else RuntimeError
    with pytest.raises(error, match="checkpoint"):
        with opt.microbatch(torch.ones(3, dtype=f64)):
            h = checkpoint(block, inp(x), use_reentrant=reentrant)
            head(h).sum().backward()
