"""ISOPO gradients against the float64 brute force (per-sample autograd + SPEC formulas)."""
import pytest
import torch

from models import (MLPPolicy, SeqMixer, VOCAB, gpt2, llama, lm_losses, packed_losses, qwen3)
from conftest import assert_matches_reference

MODES = ["reinforce", "ntk", "fisher"]


def _adv(n):
    return torch.randn(n, dtype=torch.float64)


def _lm_batch(B=3, L=6, pad=True):
    ids = torch.randint(3, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:  # right padding
        mask[1, 4:] = 0
        ids[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("mode", MODES)
def test_mlp_policy_rows(mode):
    model = MLPPolicy().double()
    X = torch.randn(7, 5, dtype=torch.float64)
    acts = torch.randint(0, 4, (7,))

    def losses(m):
        return -torch.log_softmax(m(X), -1).gather(1, acts[:, None]).squeeze(1) / 7
    assert_matches_reference(model, losses, _adv(7), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["gram", "materialise"])
def test_sequence_model_positions_interact(mode, route):
    model = SeqMixer().double()
    ids, mask = _lm_batch(B=4, L=7)
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(4), mode, route=route)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [gpt2, qwen3, llama], ids=["gpt2", "qwen3", "llama"])
def test_hf_causal_lms(mode, build):
    model = build().double()
    ids, mask = _lm_batch()
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode)


@pytest.mark.parametrize("mode", MODES)
def test_llama_gradient_checkpointing(mode):
    model = llama(checkpointing=True).double()
    ids, mask = _lm_batch()
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode)


@pytest.mark.parametrize("mode", MODES)
def test_packed_segments(mode):
    model = SeqMixer().double()
    lengths = [4, 3, 5]
    seg = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)])
    ids = torch.randint(3, VOCAB, (1, seg.numel()))
    assert_matches_reference(model, lambda m: packed_losses(m, ids, seg, segments=seg),
                             _adv(3), mode, segments=seg)


@pytest.mark.parametrize("mode", MODES)
def test_packed_qwen3_block_mask(mode):
    model = qwen3().double()
    lengths = [5, 4, 3]
    seg = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)])
    pos = torch.cat([torch.arange(k) for k in lengths])[None]
    N = seg.numel()
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    mask = torch.where(allowed, 0.0, float("-inf")).double()[None, None]
    ids = torch.randint(3, VOCAB, (1, N))
    kw = dict(position_ids=pos, attention_mask=mask)
    assert_matches_reference(model, lambda m: packed_losses(m, ids, seg, **kw), _adv(3), mode,
                             segments=seg)


@pytest.mark.parametrize("mode", MODES)
def test_episodes_of_several_rows(mode):
    model = MLPPolicy().double()
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    X = torch.randn(8, 5, dtype=torch.float64)
    acts = torch.randint(0, 4, (8,))

    def losses(m):
        logp = torch.log_softmax(m(X), -1).gather(1, acts[:, None]).squeeze(1)
        return -torch.zeros(3, dtype=logp.dtype).index_add(0, seg, logp) / 8
    assert_matches_reference(model, losses, _adv(3), mode, segments=seg)
