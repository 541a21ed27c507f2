"""The advantage-free clipped surrogate: in ``reinforce`` mode ISOPO with ``surrogate_weights``
gives the gradient of an independent PPO-clip / CISPO loss (float64), at token and sequence
level, with padding; and flipping a sample's sign in both the loss and the advantages (what the
TRL integration does) leaves every mode's gradient unchanged."""
import copy

import pytest
import torch

from models import MLPPolicy, SeqMixer, VOCAB
from torch_isopo import ISOPO, surrogate_weights

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _batch(B=6, L=7):
    ids = torch.randint(3, VOCAB, (B, L))
    mask = torch.ones(B, L - 1, dtype=torch.float64)
    mask[1, 3:] = 0                       # right padding of different lengths
    mask[4, 5:] = 0
    A = torch.tensor([1.3, -0.7, 0.0, -1.1, 0.4, 2.0], dtype=torch.float64)[:B]
    return ids, mask, A


def _token_logp(model, ids):
    logits = model(ids)
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _old(model, ids, mask):
    """π_old: the log-probs moved by noise large enough that both clips bind somewhere."""
    with torch.no_grad():
        return _token_logp(model, ids) + 0.4 * torch.randn(mask.shape, dtype=torch.float64)


def _ppo_clip(ratio, A):
    return torch.min(ratio * A, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * A)


def _independent_loss(logp, old, A, mask, level, kind, agg):
    """The PPO-clip or CISPO loss with the advantages inside, written from the papers."""
    A = A[:, None]
    if level == "token":
        ratio = (logp - old).exp()
    else:                                 # GSPO: geometric mean ratio over the sequence
        ratio = (((logp - old) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).exp()
    if kind == "clip":
        per_token = _ppo_clip(ratio, A).expand_as(logp)
    else:
        per_token = ratio.detach().clamp(max=1 + EPS_HIGH) * A * logp
    return -_aggregate(per_token, mask, agg)


def _aggregate(per_token, mask, agg):
    if agg == "token-mean":
        return (per_token * mask).sum() / mask.sum()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()      # mean of sequence means


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["clip", "cispo"])
def test_reinforce_equals_clipped_surrogate(kind, level, agg):
    model = SeqMixer().double()
    ids, mask, A = _batch()
    old = _old(model, ids, mask)

    want = copy.deepcopy(model)
    _independent_loss(_token_logp(want, ids), old, A, mask, level, kind, agg).backward()

    ours = copy.deepcopy(model)
    opt = ISOPO(ours, torch.optim.SGD(ours.parameters(), lr=0.1), mode="reinforce")
    with opt.microbatch(A):
        logp = _token_logp(ours, ids)
        v = surrogate_weights(logp, old, A, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                              level=level, kind=kind)
        assert not v.requires_grad and torch.all(v[mask == 0] == 0)
        _aggregate(-v * logp, mask, agg).backward()

    real = mask > 0                                # the test exercises the clips
    if kind == "clip":
        assert ((v == 0) & real).any() and ((v > 0) & real).any()
    else:
        assert ((v == 1 + EPS_HIGH) & real).any()
    if level == "token":
        ratio = (logp.detach() - old).exp()
        assert ((ratio > 1 + EPS_HIGH) & (A[:, None] > 0) & real).any()
        assert ((ratio < 1 - EPS_LOW) & (A[:, None] < 0) & real).any()
    for g, w in zip(_grads(ours), _grads(want)):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_sequence_level_clips_whole_sequences():
    """GSPO: a sequence outside the clip range gets weight 0 on all its tokens."""
    logp = torch.zeros(3, 4, dtype=torch.float64)
    old = torch.tensor([[-0.5] * 4, [0.5] * 4, [0.05, -0.05, 0.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    v = surrogate_weights(logp, old, A, mask, level="sequence")
    assert torch.equal(v[0], torch.zeros(4))                   # ratio e^0.5 > 1.2, A > 0
    assert torch.equal(v[1], torch.zeros(4))                   # ratio e^-0.5 < 0.8, A < 0
    assert torch.allclose(v[2], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    # the same ratios with the other signs are inside: v = the ratio
    v = surrogate_weights(logp, old, -A, mask, level="sequence")
    assert torch.allclose(v[0], torch.full((4,), 0.5).exp().double())


def test_rows_with_per_row_advantages():
    """A CleanRL-style batch: one action per row, one advantage per row (each row a sample)."""
    model = MLPPolicy().double()
    X = torch.randn(9, 5, dtype=torch.float64)
    acts = torch.randint(0, 4, (9,))
    A = torch.randn(9, dtype=torch.float64)

    def logp_of(m):
        return torch.log_softmax(m(X), -1).gather(1, acts[:, None]).squeeze(1)
    with torch.no_grad():
        old = logp_of(model) + 0.4 * torch.randn(9, dtype=torch.float64)

    want = copy.deepcopy(model)
    logp = logp_of(want)
    (-_ppo_clip((logp - old).exp(), A).mean()).backward()

    ours = copy.deepcopy(model)
    opt = ISOPO(ours, torch.optim.SGD(ours.parameters(), lr=0.1), mode="reinforce")
    with opt.microbatch(A):
        logp = logp_of(ours)
        v = surrogate_weights(logp, old, A, eps_low=EPS_LOW, eps_high=EPS_HIGH)
        (-(v * logp).mean()).backward()
    assert (v == 0).any()
    for g, w in zip(_grads(ours), _grads(want)):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_sign_folded_into_the_loss(mode):
    """Loss with ``sign(A)·v`` and advantages ``|A|`` = loss with ``v`` and advantages ``A``:
    per sample the gradient G_i and the advantage flip together, and ISOPO's coefficients are
    odd under that flip (K → SKS, ν unchanged), so Σ c_i G_i is the same."""
    model = SeqMixer().double()
    ids, mask, A = _batch()
    old = _old(model, ids, mask)
    sign = torch.where(A < 0, -1.0, 1.0).double()
    results = []
    for folded in (False, True):
        m = copy.deepcopy(model)
        opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=0.3,
                    ema=None, fisher_probes=5, generator=torch.Generator().manual_seed(3))
        with opt.microbatch(A.abs() if folded else A):
            logp = _token_logp(m, ids)
            v = surrogate_weights(logp, old, A, mask)
            if folded:
                v = v * sign[:, None]
            (-(v * logp * mask).sum() / mask.sum()).backward()
        results.append(_grads(m))
    flipped = (A < 0).sum()
    assert flipped > 0
    for g, w in zip(*results):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


def test_refuses_what_it_cannot_weigh():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        surrogate_weights(logp, logp, torch.ones(2, 3), level="sequence")
    with pytest.raises(ValueError, match="do not fit"):
        surrogate_weights(logp, logp, torch.ones(3))
    with pytest.raises(ValueError, match="old_logp"):
        surrogate_weights(logp, logp[:, :2], torch.ones(2))
    with pytest.raises(ValueError, match="kind"):
        surrogate_weights(logp, logp, torch.ones(2), kind="ppo2")
