"""ISOPO is a real torch.optim.Optimizer around the inner one, and invisible outside microbatches."""
import contextlib
import copy
import io
import math

import pytest
import torch
from torch import nn

from models import MLPPolicy, SeqMixer, VOCAB, gpt2, lm_losses, qwen3
from torch_isopo import ISOPO


def _setup(inner=torch.optim.AdamW, **kw):
    model = MLPPolicy()
    opt = ISOPO(model, inner(model.parameters(), lr=1e-2), **kw)
    return model, opt


def _train_step(model, opt, n=6):
    X = torch.randn(n, 5)
    acts = torch.randint(0, 4, (n,))
    with opt.microbatch(torch.randn(n)):
        (-torch.log_softmax(model(X), -1).gather(1, acts[:, None]).mean()).backward()
    opt.step()
    opt.zero_grad()


def test_is_an_optimizer_with_the_inner_objects():
    model, opt = _setup()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    _train_step(model, opt)
    sd = opt.state_dict()
    opt.load_state_dict(sd)          # the inner optimizer rebuilds its group dicts
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, cycle_momentum=True),
], ids=["step", "lambda", "onecycle"])
def test_lr_schedulers_drive_the_inner_learning_rate(make):
    model, opt = _setup()
    sched = make(opt)
    lrs = []
    for _ in range(3):
        _train_step(model, opt)
        sched.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) == 3
    assert opt.optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_scheduler_survives_load_state_dict():
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.load_state_dict(opt.state_dict())
    _train_step(model, opt)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_step_hooks_run():
    model, opt = _setup()
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    _train_step(model, opt)
    assert calls == [("pre", opt), ("post", opt)]


def test_state_dict_round_trips_into_a_fresh_isopo():
    torch.manual_seed(0)
    model, opt = _setup(mode="fisher", fisher_probes=2)
    for _ in range(2):
        _train_step(model, opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = ISOPO(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2), mode="fisher",
                 fisher_probes=2)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["isopo"]["m"] == opt.state_dict()["isopo"]["m"]
    assert torch.equal(opt2.generator.get_state(), opt.generator.get_state())
    torch.manual_seed(1)
    _train_step(model, opt)
    torch.manual_seed(1)
    _train_step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("build", [gpt2, qwen3, SeqMixer], ids=["gpt2", "qwen3", "seqmixer"])
def test_outside_a_microbatch_nothing_changes_bit_for_bit(build):
    model = build()
    plain = copy.deepcopy(model)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ntk")
    ids = torch.randint(3, VOCAB, (2, 7))
    for m in (model, plain):
        lm_losses(m, ids, None).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():
        assert torch.equal(model(ids).logits if hasattr(model(ids), "logits") else model(ids),
                           plain(ids).logits if hasattr(plain(ids), "logits") else plain(ids))
    opt.zero_grad()


def test_no_grad_forward_inside_a_microbatch_is_plain():
    model = qwen3()
    plain = copy.deepcopy(model)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids = torch.randint(3, VOCAB, (2, 5))
    with opt.microbatch(torch.randn(2)), torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_detach_restores_the_model_exactly():
    model = gpt2()
    before = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    hooks = {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()}
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert any(m.__dict__.get("forward") is not None for m in model.modules())
    opt.detach()
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == before
    assert {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()} == hooks
    with pytest.raises(RuntimeError, match="detached"):
        with opt.microbatch(torch.randn(2)):
            pass


def test_frozen_parameters_are_left_alone():
    model = qwen3()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    opt = ISOPO(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert all("mlp" in n for layer in opt.layers for n in layer.param_names)
    ids = torch.randint(3, VOCAB, (2, 5))
    with opt.microbatch(torch.randn(2)):
        lm_losses(model, ids, None).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("mlp" in name)


def test_tied_parameters_form_one_layer():
    for build, names in [(gpt2, ("transformer.wte", "lm_head")),
                         (qwen3, ("model.embed_tokens", "lm_head"))]:
        opt = ISOPO(model := build(), torch.optim.SGD(model.parameters(), lr=0.1))
        tied = [l for l in opt.layers if len(l.entries) > 1]
        assert len(tied) == 1 and {e.name for e in tied[0].entries} == set(names)


def test_diagnostics_after_step():
    model, opt = _setup(mode="ntk")
    _train_step(model, opt)
    assert set(opt.diagnostics) == {l.name for l in opt.layers}
    for figs in opt.diagnostics.values():
        assert {"rho", "c_ratio", "cond", "m"} <= set(figs)
        assert figs["rho"] > 0 and figs["cond"] >= 1


@pytest.mark.parametrize("route", ["gram", "materialise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cond_of_duplicated_samples_is_infinite(dtype, route):
    """Two identical samples make every layer's K singular: ``cond`` is inf, not the ratio of
    the rounding left in its smallest eigenvalue; a layer without gradient has ``cond`` 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Linear(1, 1)).to(dtype)
    model[3].requires_grad_(True)
    x = torch.randn(4, 3, dtype=dtype)
    x[1] = x[0]
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.0), route=route)
    with opt.microbatch(torch.randn(4)):
        (-torch.log_softmax(model[:3](x), -1)[:, 0] + 0 * model[3](x[:, :1])[:, 0]).sum().backward()
    opt.step()
    figs = opt.diagnostics
    assert figs["0"]["cond"] == math.inf and figs["2"]["cond"] == math.inf
    assert figs["3"]["cond"] == 1.0


def test_bf16_autocast_close_to_fp32():
    """Under bf16 autocast the gradient stays close to the fp32 one; K and the solve run in fp32."""
    torch.manual_seed(0)
    model = qwen3()
    ids = torch.randint(3, VOCAB, (3, 8))
    A = torch.randn(3)
    grads = []
    for autocast in (False, True):
        m = copy.deepcopy(model)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="ntk", ema=None)
        with opt.microbatch(A), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lm_losses(m, ids, None).sum().backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters()]))
        assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    err = float((grads[0] - grads[1]).norm() / grads[0].norm())
    assert err < 0.05


class _AutocastRecurrent(nn.Module):
    def __init__(self, cls, cell):
        super().__init__()
        self.cell = cell
        self.rnn = (cls(3, 8) if cell else
                    cls(3, 8, num_layers=2, bidirectional=True, batch_first=True))
        self.head = nn.Linear(8 if cell else 16, 3)

    def forward(self, x):
        if self.cell:
            h, out = None, 0
            for t in range(x.shape[1]):
                h = self.rnn(x[:, t], h)
                out = out + self.head(h[0] if isinstance(h, tuple) else h)
            return out
        return self.head(self.rnn(x)[0]).sum(1)


@pytest.mark.parametrize("cell", [False, True])
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_bf16_autocast_recurrent_close_to_fp32(kind, cell):
    """Recurrent layers and cells under bf16 autocast run the recurrence in bf16, as autocast
    would, and give a gradient close to the fp32 one in the parameters' dtype."""
    torch.manual_seed(0)
    model = _AutocastRecurrent(getattr(nn, kind + ("Cell" if cell else "")), cell)
    _assert_autocast_close(model, torch.randn(4, 5, 3), torch.randn(4), mode="ntk")


def _assert_autocast_close(model, x, A, **settings):
    """The gradient under bf16 autocast is in the parameters' dtype and close to the fp32 one."""
    grads = []
    for autocast in (False, True):
        m = copy.deepcopy(model)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), ema=None, **settings)
        with opt.microbatch(A):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = m(x)
            torch.log_softmax(out.float(), -1)[:, 0].sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in m.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 0.05


def _conv_policy(kind):
    d = 1 if kind == "conv1d" else 2
    conv = getattr(nn, f"Conv{d}d")(4, 6, 3, stride=2, padding=1, groups=2 if kind == "grouped"
                                    else 1, bias=kind != "no bias")
    if kind == "weight_norm":
        conv = nn.utils.parametrizations.weight_norm(conv)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), d


@pytest.mark.parametrize("route", ["auto", "gram", "materialise"])
@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "grouped", "weight_norm", "no bias"])
def test_bf16_autocast_convolutions_close_to_fp32(kind, mode, route):
    """Convolutions under bf16 autocast run in bf16, as autocast would (input and weight cast,
    both factors in bf16), and give a gradient close to the fp32 one in the parameters' dtype."""
    torch.manual_seed(0)
    model, d = _conv_policy(kind)
    x, A = torch.randn(5, 4, *(8,) * d), torch.randn(5)
    model(x)                                      # the lazy head's shape
    _assert_autocast_close(model, x, A, mode=mode, route=route)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "grouped", "weight_norm"])
def test_autocast_leaves_float64_layers_alone(kind):
    """Autocast casts no float64 tensor, and neither do the layers' rules: a float64 model under
    bf16 autocast gets plain autograd's gradient in reinforce mode, and float64 outputs."""
    torch.manual_seed(0)
    model, d = _conv_policy(kind)
    x, A = torch.randn(5, 4, *(8,) * d), torch.randn(5, dtype=torch.float64)
    model(x)
    model, x = model.double(), x.double()
    grads = []
    for isopo in (False, True):
        m = copy.deepcopy(model)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="reinforce")
        with opt.microbatch(A) if isopo else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            assert out.dtype == torch.float64
            logp = torch.log_softmax(out, -1)[:, 0]
            (logp if isopo else logp * A).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_give_an_attached_equivalent(how):
    """A copy carries the model, the inner optimizer, the settings and the statistics, and it
    trains its own copy of the model exactly as the original trains the original."""
    import pickle
    torch.manual_seed(0)
    model, opt = _setup(ema=0.9, mode="fisher", damping=0.3)
    _train_step(model, opt)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert isinstance(twin, ISOPO) and twin.model is not model
    assert (twin.mode, twin.damping, twin.ema) == ("fisher", 0.3, 0.9)
    assert twin._m == opt._m and twin._m
    assert {id(p) for g in twin.param_groups for p in g["params"]} == {
        id(p) for p in twin.model.parameters()}
    for o in (opt, twin):
        torch.manual_seed(1)
        _train_step(o.model, o)
    for p, q in zip(model.parameters(), twin.model.parameters()):
        assert torch.equal(p, q)
    twin.detach()                      # the copy's patches are its own
    _train_step(model, opt)


def test_factory_instances_copy():
    model = MLPPolicy()
    cls = ISOPO.factory(model, torch.optim.SGD, mode="ntk")
    opt = cls(model.parameters(), lr=0.1)
    twin = copy.deepcopy(opt)
    assert isinstance(twin, ISOPO) and twin.model is not model
    _train_step(twin.model, twin)
