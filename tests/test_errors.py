"""Bad input gets a clear error naming the problem, and leaves model and optimizer untouched."""
import copy

import pytest
import torch
from torch import nn

from models import MLPPolicy, VOCAB, lm_losses, qwen3
from torch_isopo import ISOPO
from torch_isopo.reference import reference_gradients


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.optimizer.state_dict()))


def _assert_untouched(model, opt, snap):
    params, grads, state = snap
    for p, q, g in zip(model.parameters(), params, grads):
        assert torch.equal(p, q)
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert str(opt.optimizer.state_dict()) == str(state)
    assert opt._attachment.active is None


@pytest.fixture
def mlp():
    model = MLPPolicy()
    opt = ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    X = torch.randn(4, 5)
    with opt.microbatch(torch.randn(4)):      # some history: grads and optimizer state
        model(X).sum().backward()
    opt.step()
    with opt.microbatch(torch.randn(4)):
        model(X).sum().backward()
    return model, opt, X


@pytest.mark.parametrize("adv, match", [
    (torch.randn(4, 1), "1-D"),
    (torch.randn(()), "1-D"),
    (torch.randn(0), "1-D"),
    (torch.tensor([1.0, float("nan"), 0.0, 1.0]), "finite"),
    (torch.tensor([1.0, float("inf"), 0.0, 1.0]), "finite"),
    (torch.tensor([1 + 1j, 0, 0, 0]), "real"),
    (None, "sequence of real numbers, got NoneType"),
    ("1234", "sequence of real numbers, got str"),
    (torch.randn(4, device="meta"), "meta device"),
])
def test_bad_advantages(mlp, adv, match):
    model, opt, X = mlp
    snap = _snapshot(model, opt)
    with pytest.raises((ValueError, TypeError), match=match):
        with opt.microbatch(adv):
            model(X).sum().backward()
    _assert_untouched(model, opt, snap)


def test_advantages_and_segments_as_numpy_views():
    """Numpy views with negative strides (``np.flip``) are read like their copies."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    X, A, seg = torch.randn(4, 5), np.array([0.5, -1.0, 2.0]), np.array([2, 1, 1, 0])
    grads = []
    for adv, ids in ((np.flip(A), np.flip(seg)), (A[::-1].copy(), seg[::-1].copy())):
        torch.manual_seed(1)
        model = MLPPolicy()
        opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with opt.microbatch(adv, segments=ids):
            model(X).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(g, h) for g, h in zip(*grads))


def test_stacked_inputs_with_segments_name_a_call_each():
    """obs and next_obs stacked for an encoder with segments (ids for 2n rows), then a head on n
    rows: the refusal names the exact fix, a call per input without segments."""
    torch.manual_seed(0)
    enc, pi = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.ModuleList([enc, pi])
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    obs, nxt = torch.randn(3, 3), torch.randn(3, 3)
    with pytest.raises(ValueError, match="obs and next_obs.*a call of its own, without segments"):
        with opt.microbatch(torch.randn(3), segments=torch.arange(3).repeat(2)):
            pi(enc(torch.cat([obs, nxt]))[:3]).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_advantage_count_must_match_samples(mlp):
    model, opt, X = mlp
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"4 rows .* 3 advantages"):
        with opt.microbatch(torch.randn(3)):
            model(X).sum().backward()
    _assert_untouched(model, opt, snap)


@pytest.mark.parametrize("seg, match", [
    (torch.tensor([0, 1, 1]), "segments has 3 entries"),
    (torch.tensor([0, 1, 1, 0, 1]), "segments has 5 entries"),
    (torch.tensor([0, 1, 1, 2]), r"\[0, 2\)"),
    (torch.tensor([0, -1, 1, 1]), r"\[0, 2\)"),
    (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer"),
])
def test_bad_segments(mlp, seg, match):
    model, opt, X = mlp
    snap = _snapshot(model, opt)
    with pytest.raises((ValueError, TypeError), match=match):
        with opt.microbatch(torch.randn(2), segments=seg):
            model(X).sum().backward()
    _assert_untouched(model, opt, snap)


def test_layer_input_that_cannot_be_mapped_to_samples():
    model = qwen3()
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    snap = _snapshot(model, opt)
    ids = torch.randint(3, VOCAB, (3, 5))
    with pytest.raises(ValueError, match=r"model.embed_tokens.*3 samples along dim 0 but 2"):
        with opt.microbatch(torch.randn(2)):
            lm_losses(model, ids, None).sum().backward()
    _assert_untouched(model, opt, snap)
    with pytest.raises(ValueError, match="sample_dim"):
        with opt.microbatch(torch.randn(3), sample_dim=2):
            pass


class DirectUse(nn.Module):
    """Uses its head's weight outside the head's forward (like a fused log-prob kernel)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.body(x)) @ self.head.weight.T


def test_parameter_used_outside_its_module_is_an_error():
    model = DirectUse()
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"'head.weight'.*cannot attribute"):
        with opt.microbatch(torch.randn(5)):
            model(torch.randn(5, 4)).sum().backward()
    assert model.head.weight.grad is None
    assert opt._attachment.active is None
    model.zero_grad()
    model(torch.randn(5, 4)).sum().backward()          # outside a microbatch: plain autograd
    assert model.head.weight.grad is not None


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(7, 4))

    def forward(self, s):
        return self.logits[s]


class Tabular(nn.Module):
    """A table read by its owner's forward, or directly in a method of the policy."""

    def __init__(self):
        super().__init__()
        self.table, self.enc = Table(), nn.Linear(5, 4)

    def logp(self, x, s):                 # the table's parameter read outside its forward
        return torch.log_softmax(self.table.logits[s] + self.enc(x), -1)[:, 0]

    def forward(self, x, s):
        return torch.log_softmax(self.table(s) + self.enc(x), -1)[:, 0]


def test_parameter_read_outside_its_module_names_the_fix():
    """Read outside its module's forward a parameter is refused with the fix named; through
    it, exact."""
    model = Tabular().double()
    x, s, A = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 7, (6,)), torch.randn(6)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"'table.logits'.*a method reading self.table.weight "
                                           r"outside the table module's forward.*read a module's "
                                           r"parameter through that module"):
        with opt.microbatch(A):
            model.logp(x, s).sum().backward()
    model.zero_grad()
    with opt.microbatch(A):
        model(x, s).sum().backward()
    ref = copy.deepcopy(model)
    want, _ = reference_gradients(ref, lambda: ref(x, s), A.double(), "ntk", 1.0)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert float((p.grad - want[q]).norm() / want[q].norm()) < 1e-10


def test_functional_call_with_computed_parameters_names_the_fix():
    """Tensors computed from the parameters given to ``functional_call`` in their place reach
    them around the layers' forwards: refused, naming functional_call and the fix."""
    model = MLPPolicy()
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    swapped = {k: v * 1.0 for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="functional_call with tensors computed from the "
                                           "parameters.*give functional_call the parameters"):
        with opt.microbatch(torch.randn(5)):
            torch.func.functional_call(model, swapped, (torch.randn(5, 5),)).sum().backward()


@pytest.mark.parametrize("kw, match", [
    (dict(mode="ntk", damping=0.0), "damping"),
    (dict(mode="ntk", damping=-1.0), "damping"),
    (dict(mode="fisher", damping=-0.1), "damping"),
    (dict(mode="fisher", damping=float("nan")), "damping"),
    (dict(mode="natural"), "unknown mode"),
    (dict(ema=1.0), "ema"),
    (dict(fisher_probes=0), "fisher_probes"),
    (dict(route="fast"), "route"),
    (dict(mode="reinforce", damping=-1.0), "damping"),
    (dict(damping="abc"), "damping must be a finite number"),
    (dict(ema="x"), "ema must be a finite number"),
    (dict(memory_budget="x"), "memory_budget must be a finite number"),
    (dict(memory_budget=0), "memory_budget must be a positive"),
    (dict(memory_budget=-5), "memory_budget must be a positive"),
    (dict(memory_budget=float("inf")), "memory_budget must be a finite number"),
])
def test_bad_configuration(kw, match):
    model = MLPPolicy()
    before = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with pytest.raises((TypeError, ValueError), match=match):
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == before


def test_fisher_damping_zero_is_allowed():
    model = MLPPolicy()
    ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fisher", damping=0.0)


def test_inner_must_be_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ISOPO(MLPPolicy(), [torch.zeros(1)])


def test_a_second_isopo_on_the_same_model_is_refused():
    model = MLPPolicy()
    first = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already has an ISOPO"):
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first.detach()
    ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("shape, lazy", [(nn.Identity, lambda: nn.LazyLinear(2)),
                                         (lambda: nn.Unflatten(1, (4, 1)),
                                          lambda: nn.LazyConv1d(2, 1))])
def test_a_lazy_module_must_be_initialised_first(shape, lazy):
    """Before its first forward a lazy module has no shape: refused, naming it and the fix; after
    one forward it is an ordinary layer (exact, as every other test of its family)."""
    model = nn.Sequential(nn.Linear(3, 4), shape(), lazy())
    with pytest.raises(ValueError, match=r"module '2' \(Lazy.*dummy batch before ISOPO"):
        ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(5, 3))
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(opt.layers) == 2


@pytest.mark.parametrize("cls, hx, error", [
    (nn.LSTMCell, lambda: torch.zeros(3, 4), TypeError),                       # h without c
    (nn.GRUCell, lambda: torch.zeros(1, 4), RuntimeError),                     # batch of one
    (nn.LSTMCell, lambda: (torch.zeros(1, 4), torch.zeros(1, 4)), RuntimeError),
    (nn.RNNCell, lambda: torch.zeros(3, 5), RuntimeError)])                    # hidden size
def test_a_cell_state_of_the_wrong_shape_is_refused(cls, hx, error):
    """As PyTorch refuses it, naming the module, with nothing written."""
    model = nn.ModuleDict({"cell": cls(2, 4)})
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(error, match="module 'cell'"):
        with opt.microbatch(torch.randn(3)):
            model["cell"](torch.randn(3, 2), hx())
    assert all(p.grad is None for p in model.parameters())
