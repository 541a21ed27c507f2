"""``torch_isopo.check``: passes on models ISOPO handles, names the layer when a model's sample
layout is not what its rows say, reports generic fallbacks and refusals."""
import copy

import pytest
import torch
from torch import nn
from torch.distributions import Normal

import torch_isopo
from torch_isopo import CheckError, check

N = 6


def logp0(z):
    return z.log_softmax(-1)[:, 0]


class Centre(nn.Module):
    """A module with no rule (generic): subtracts the batch mean, so it mixes samples."""

    def __init__(self, d=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.5)

    def forward(self, x):
        return (x - x.mean(0)) @ self.w


class Scale(nn.Module):
    """A module with no rule that keeps samples apart: the generic fallback, exact."""

    def __init__(self, d=4):
        super().__init__()
        self.s = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return torch.tanh(x * self.s)


class Agent(nn.Module):
    """CleanRL's continuous-action agent: ``actor_logstd`` on the agent, a critic beside."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        self.actor_mean = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        self.actor_logstd = nn.Parameter(torch.randn(1, 2) * 0.3)

    def logp(self, x, a):
        mean = self.actor_mean(x)
        return Normal(mean, self.actor_logstd.expand_as(mean).exp()).log_prob(a).sum(1)


X = torch.randn(N, 3)                 # float32: check casts the inputs to float64 at each module
ACT = torch.randn(N, 2)
IMG = torch.randn(N, 2, 6, 6)


def mlp():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, 2),
                         nn.Flatten(), nn.Linear(4, 3))


SUPPORTED = {
    "mlp": (mlp, lambda m: -logp0(m(X)), ["linear"] * 3),
    "gaussian": (Agent, lambda m: -m.logp(X, ACT), ["parameter", "linear", "linear", "linear",
                                                    "linear"]),
    "cnn": (cnn, lambda m: -logp0(m(IMG)), ["conv", "channel_norm", "conv", "linear"]),
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_passes_on_supported_models(name):
    build, losses, rules = SUPPORTED[name]
    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check(model, losses)
    assert result.ok and not result.refusals
    assert [row.rule for row in result.layers] == rules
    assert all(set(row.errors) == {"reinforce", "ntk", "fisher"} for row in result.layers)
    assert max(e for row in result.layers for e in row.errors.values()) < 1e-10
    assert all(row.name in str(result) for row in result.layers)
    # the model is untouched: same weights, no gradients, no hooks, not attached
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch_isopo.ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6")
def test_passes_on_a_compiled_model_that_has_run():
    """A compiled model's code would skip the hooks the brute force records layer calls with
    (its Fisher pieces came out zero): the brute force runs it eagerly, and check passes."""
    from torch_isopo.reference import reference_gradients
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    compiled = torch.compile(model, backend="eager")
    compiled(X.double())
    A = torch.randn(N, dtype=torch.float64)
    plain = copy.deepcopy(model)
    want, _ = reference_gradients(plain, lambda: logp0(plain(X.double())), A, "fisher", 0.5)
    got, _ = reference_gradients(compiled, lambda: logp0(compiled(X.double())), A, "fisher", 0.5)
    for g, w in zip(got.values(), want.values()):
        assert float((g - w).norm()) < 1e-10 * float(w.norm())
    result = check(compiled, lambda m: logp0(m(X)))
    assert result.ok and max(e for row in result.layers for e in row.errors.values()) < 1e-10


def test_reports_the_generic_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 3))
    result = check(model, lambda m: -logp0(m(X)), modes=("ntk",))
    assert result.ok
    row = result.layers[1]
    assert (row.name, row.rule) == ("1", "generic")
    assert "no rule is registered for Scale" in row.warning
    assert "warning: ISOPO: module '1' takes the generic rule" in str(result)


def test_dropout_draws_the_same_masks_in_both_forwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).train()
    assert check(model, lambda m: -logp0(m(X))).ok


# -- sample layouts ISOPO cannot see: check names the layer ---------------------------------------
class Shifted(nn.Module):
    """Sample i's head reads the hidden row of sample i - 1: the first layer's rows are not its
    samples."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return logp0(self.head(torch.tanh(self.body(x)).roll(1, 0)))


class TableAcross(nn.Module):
    """A table with exactly ``n`` rows broadcast against the samples along a new leading axis:
    the result has ``n`` along dim 0, but dim 0 counts table rows, not samples."""

    def __init__(self, n=N):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(n, 4))

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        z = torch.tanh(h[None, :, :] + self.table[:, None, :])    # (table row, sample, d)
        return logp0(self.head(z.mean(0)))


MIXED = {
    "shifted rows": (Shifted, lambda m: -m(X), "body", "linear"),
    "batch mean in a generic module": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Centre(), nn.Linear(4, 3)),
        lambda m: -logp0(m(X)), "0", "linear"),
}


@pytest.mark.filterwarnings("ignore::torch_isopo.GenericRuleWarning")
@pytest.mark.parametrize("name", list(MIXED))
def test_names_the_layer_whose_samples_are_mixed(name):
    build, losses, layer, rule = MIXED[name]
    torch.manual_seed(0)
    model = build()
    # ISOPO alone runs without complaint: nothing in the rows tells it the samples are mixed
    opt = torch_isopo.ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with opt.microbatch(torch.randn(N)):
        losses(model).sum().backward()
    opt.detach()
    with pytest.raises(CheckError, match=f"layer '{layer}' \\({rule}\\) differs from the "
                                         "reference") as info:
        check(model, losses)
    result = info.value.result
    assert [row.name for row in result.layers if not row.ok] == [layer]
    row = next(row for row in result.layers if row.name == layer)
    assert all(e > 1e-2 for e in row.errors.values())
    assert f"{row.errors['reinforce']:.1e} !" in str(result)


@pytest.mark.parametrize("rows", [N, N + 1], ids=["n rows", "n+1 rows"])
def test_table_across_the_samples(rows):
    """A free table broadcast against the samples along a new leading axis: with ``n`` rows its
    rows would look like samples, and ISOPO refuses it at the forward (``check`` says so); with
    any other count the samples are met where ``mean(0)`` puts them back on dim 0: exact."""
    torch.manual_seed(0)
    model = TableAcross(rows)
    if rows != N:
        assert check(model, lambda m: -m(X)).ok
        return
    opt = torch_isopo.ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"shape \(6, 1, 4\) computed from free parameters"):
        with opt.microbatch(torch.randn(N)):
            (-model(X)).sum().backward()
    opt.detach()
    with pytest.raises(CheckError, match=r"ISOPO refused the model .*shape \(6, 1, 4\)"):
        check(model, lambda m: -m(X))


def test_wrong_segments_are_caught():
    """The loss sums rows into episodes by ``seg``; ISOPO is told another grouping."""
    seg = torch.tensor([0, 1, 1, 2, 0, 2])
    torch.manual_seed(0)
    agent = Agent()

    def losses(m):
        return torch.zeros(3, dtype=torch.float64).index_add(0, seg, -m.logp(X, ACT))
    assert check(agent, losses, segments=seg).ok
    with pytest.raises(CheckError, match="differs from the reference"):
        check(agent, losses, segments=torch.tensor([0, 0, 1, 1, 2, 2]))


# -- refusals and misuse ------------------------------------------------------------------------
def test_reports_a_refusal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    result = check(model, lambda m: -logp0(m(X)), modes=("ntk",), raise_on_error=False)
    assert not result.ok
    assert "module '1' (BatchNorm1d) normalises with the statistics of the whole batch" in \
        result.refusals["ntk"]
    assert [(row.name, row.rule, row.errors) for row in result.layers] == [
        ("0", "linear", {}), ("1", "channel_norm", {}), ("2", "linear", {})]
    assert "refused in mode ntk" in str(result) and "refused" in str(result).splitlines()[2]
    with pytest.raises(CheckError, match="ISOPO refused the model in mode ntk"):
        check(model, lambda m: -logp0(m(X)), modes=("ntk",))


class BatchOfOne(nn.Module):
    """All samples as the positions of one attention sequence: refused (the batch of one is one
    sample's); the check reports the refusal rather than failing inside the reference."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = torch.tanh(self.enc(x))[None]
        return self.head(self.att(h, h, h)[0][0])


def test_reports_a_refusal_the_reference_could_not_run():
    torch.manual_seed(0)
    result = check(BatchOfOne(), lambda m: -logp0(m(X)), raise_on_error=False)
    assert set(result.refusals) == {"reinforce", "ntk", "fisher"}
    assert "module 'att' input: the input has a batch of 1" in result.refusals["ntk"]


class PackedLSTM(nn.Module):
    """A float32 model fed a ``PackedSequence`` and an ``(h0, c0)`` tuple: the check's float64
    copy casts the tensors inside them too."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head, self.h0 = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2), nn.Linear(3, 4)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        h0 = torch.tanh(self.h0(x[:, :1]))[:, 0][None]
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed, (h0, torch.zeros_like(h0)))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return logp0(self.head(out)).sum(1)


def test_casts_tensors_inside_tuples_and_packed_sequences():
    torch.manual_seed(0)
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 4])
    assert check(PackedLSTM(), lambda m: -m(x, lengths)).ok


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return self.head(checkpoint(lambda y: torch.tanh(self.a(y)), x, use_reentrant=True))


def test_says_why_the_brute_force_cannot_run():
    """Reentrant checkpointing hides the layers' outputs from the brute force: a clear error."""
    torch.manual_seed(0)
    x = X.clone().requires_grad_()
    with pytest.raises(ValueError, match="brute force could not run.*use_reentrant=False"):
        check(ReentrantCheckpoint(), lambda m: -logp0(m(x)))


def test_refuses_non_finite_sample_terms():
    """Terms that are not finite without ISOPO (float64 turning a float32 softmax's mask into
    NaN) are reported as such, not as layers that disagree."""
    poison = torch.ones(N)
    poison[1] = float("nan")
    with pytest.raises(ValueError, match="not finite in torch.float64 without ISOPO"):
        check(mlp(), lambda m: -logp0(m(X)) * poison.to(torch.float64))


def test_sample_losses_must_be_per_sample():
    model = mlp()
    with pytest.raises(ValueError, match="unknown modes"):
        check(model, lambda m: -logp0(m(X)), modes=("natural",))
    for damping in (0.0, -1.0):           # the check's own setting, not a refusal of the model
        with pytest.raises(ValueError, match="damping must be"):
            check(model, lambda m: -logp0(m(X)), damping=damping)
    with pytest.raises(ValueError, match=r"shape \(n,\).*got \(\)"):
        check(model, lambda m: -logp0(m(X)).sum())
    with pytest.raises(ValueError, match=r"n = 4"):
        check(model, lambda m: -logp0(m(X)), torch.randn(4))


def test_sample_losses_of_another_model_are_refused():
    """``sample_losses`` that runs the user's own model rather than the copy it is given would
    compare two zero gradients: refused, naming the fix."""
    model, own = mlp(), mlp().double()
    with pytest.raises(ValueError, match="run the forward of the module m it is given"):
        check(model, lambda m: -logp0(own(X.double())))


class ScaledInPlace(nn.Module):
    """A tied embedding and output layer, the embedding's output scaled in place (CTRL's
    ``inputs_embeds *= sqrt(d)``)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h *= 2.0
        logp = torch.log_softmax(self.head(torch.tanh(h)), -1)
        return -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)


def test_brute_force_pieces_of_an_output_scaled_in_place():
    """The brute force takes a module's Fisher pieces at the gradient of its own output, not of
    what the model made of it in place (the tied layer's two uses were weighted wrongly)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (3, 5))
    result = check(ScaledInPlace(), lambda m: m(ids), torch.randn(3), modes=("fisher",))
    assert result.ok


class Hooked(nn.Module):
    """A policy whose forward the brute force must reproduce as the user wrote it: a forward
    hook that changes a layer's output, a copy of the body made in the forward, a target from the
    body under no_grad, a hook on an activation."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.body, self.head = kind, nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)
        if kind == "forward hook":
            self.body[0].register_forward_hook(lambda m, a, out: torch.sin(out))

    def forward(self, x):
        h = self.body(x)
        if self.kind == "copy in the forward":
            h = h + copy.deepcopy(self.body)(x)
        if self.kind == "target under no_grad":
            with torch.no_grad():
                h = h - self.body(x)
        if self.kind == "tensor hook":
            h.register_hook(lambda g: 0.5 * g)
        return -torch.log_softmax(self.head(h), -1)[:, 0]


@pytest.mark.parametrize("kind", ["forward hook", "copy in the forward", "target under no_grad",
                                  "tensor hook"])
def test_brute_force_runs_the_model_as_written(kind):
    """The brute force's Fisher pieces go through the user's hooks, ignore a copy's calls and
    no_grad calls, and its first forward records a graph (a tensor hook needs one): ISOPO is
    exact on all four, and ``check`` says so (it reported fisher errors or failed to run)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    assert check(Hooked(kind), lambda m: m(x.to(m.head.weight.dtype)), torch.randn(5)).ok


def test_a_layer_run_only_without_grad_has_zero_gradient():
    """A critic evaluated under no_grad to weight the actor's loss: the brute force gives it zero
    per-sample gradients (it refused the model), and check passes."""
    import torch
    from torch import nn
    from torch_isopo import check

    class ActorCritic(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.pi, self.v = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.enc(x))
            with torch.no_grad():
                w = torch.sigmoid(self.v(h)).squeeze(-1)
            return w * torch.log_softmax(self.pi(h), -1)[:, 0]
    torch.manual_seed(0)
    model = ActorCritic().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    report = check(model, lambda m: m(x), torch.randn(5, dtype=torch.float64))
    assert report.ok, report
