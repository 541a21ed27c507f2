"""ISOPO gradients against the float64 brute force (per-sample autograd + SPEC formulas)."""
import pytest
import torch

from models import (MLPPolicy, SeqMixer, VOCAB, gemma, gpt2, llama, lm_losses, packed_losses,
                    qwen3)
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
@pytest.mark.parametrize("build", [gpt2, qwen3, llama, gemma], ids=["gpt2", "qwen3", "llama", "gemma"])
def test_hf_causal_lms(mode, build):
    model = build().double()
    ids, mask = _lm_batch()
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode)


def test_gemma_scaled_embedding_takes_the_embedding_rule():
    """Gemma's scaled word embedding has its own forward (lookup × embed_scale): checked, it
    takes the factor rule and merges with the tied head instead of falling to generic."""
    from torch_isopo import ISOPO
    model = gemma()
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "linear+scaled_embedding" in [layer.rule for layer in opt.layers]
    assert "generic" not in [layer.rule for layer in opt.layers]


@pytest.mark.parametrize("mode", MODES)
def test_opt_flattened_rows_with_segments(mode):
    """OPT runs its MLP on ``hidden.reshape(-1, d)``: rows of every sequence flattened together.
    Refused without segments (rows ≠ samples); exact with one id per token."""
    from torch_isopo import ISOPO
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=24,
                                     word_embed_proj_dim=16, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32,
                                     pad_token_id=0, dropout=0.0, attn_implementation="eager"))
    model = model.double().eval()
    ids, mask = _lm_batch()
    seg = torch.arange(3).repeat_interleave(ids.shape[1])
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode,
                             segments=seg)
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="pass segments="):
        with opt.microbatch(_adv(3)):
            lm_losses(model, ids, mask).sum().backward()


class _OffsetEmbedding(torch.nn.Embedding):
    """Has an ``embed_scale`` but adds an offset too: the check sends it to the generic rule."""

    embed_scale = 2.0

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale + 1.0


def test_embedding_with_another_forward_is_not_taken_for_a_scaled_one():
    from torch_isopo import ISOPO, GenericRuleWarning
    model = torch.nn.Sequential(_OffsetEmbedding(10, 4), torch.nn.Linear(4, 2))
    with pytest.warns(GenericRuleWarning):
        opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.layers[0].rule == "generic"


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


@pytest.mark.parametrize("mode", MODES)
def test_two_accumulated_microbatches(mode):
    """Gradients of two microbatches add up; each microbatch has its own K."""
    import copy
    from torch_isopo import ISOPO
    from torch_isopo.reference import reference_gradients
    model = qwen3().double()
    batches = [(_lm_batch(), _adv(3)), (_lm_batch(B=2, L=5, pad=False), _adv(2))]
    expected = {}
    ref = copy.deepcopy(model)
    for (ids, mask), A in batches:
        g, _ = reference_gradients(ref, lambda: lm_losses(ref, ids, mask), A, mode, 0.5)
        for p, v in g.items():
            expected[p] = expected.get(p, 0) + v
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, damping=0.5, ema=None,
                fisher_probes=None)
    for (ids, mask), A in batches:
        with opt.microbatch(A):
            lm_losses(m, ids, mask).sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        err = float((p.grad - expected[q]).norm() / expected[q].norm())
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
def test_ema_statistics_over_steps(mode):
    """Step 1 uses each microbatch's own m; step 2 uses the average m of step 1 (β = 0.5)."""
    import copy
    from torch_isopo import ISOPO
    from torch_isopo.reference import reference_gradients
    model = SeqMixer().double()
    data = [[(_lm_batch(B=3, L=6), _adv(3)), (_lm_batch(B=3, L=6), _adv(3))] for _ in range(3)]
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.05), mode=mode, damping=0.7, ema=0.5,
                fisher_probes=None)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ema = {}
    for step in data:
        expected, figures = {}, {}
        for (ids, mask), A in step:
            g, st = reference_gradients(ref, lambda: lm_losses(ref, ids, mask), A, mode, 0.7,
                                        m=dict(ema))
            for p, v in g.items():
                expected[p] = expected.get(p, 0) + v
            for k, v in st.items():
                figures.setdefault(k, []).append(v)
        for (ids, mask), A in step:
            with opt.microbatch(A):
                lm_losses(m, ids, mask).sum().backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            err = float((p.grad - expected[q]).norm() / expected[q].norm())
            assert err < 1e-5, (name, err)
            q.grad = expected[q].clone()
        opt.step(); opt.zero_grad()
        ref_opt.step(); ref_opt.zero_grad()
        for k, v in figures.items():
            mean = sum(v) / len(v)
            ema[k] = mean if k not in ema else 0.5 * ema[k] + 0.5 * mean
        assert set(opt.diagnostics) == set(ema)
        for k in ema:
            assert abs(opt.state_dict()["isopo"]["m"][k] - ema[k]) <= 1e-9 * abs(ema[k])


def test_fisher_probe_subset_matches_reference_with_same_draw():
    """With fisher_probes=k a seeded uniform subset of the non-zero positions is used."""
    import copy
    from torch_isopo import ISOPO
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    X = torch.randn(2, 9, 4, dtype=torch.float64)
    X[1, 7:] = 0
    A = _adv(2)
    k, seed = 5, 123
    m = copy.deepcopy(model)
    opt = ISOPO(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fisher", damping=0.3, ema=None,
                fisher_probes=k, generator=torch.Generator().manual_seed(seed))
    target = torch.randn(2, 9, 3, dtype=torch.float64)
    target[1, 7:] = 0

    def losses(y):
        return ((y - target) ** 2 * (X.abs().sum(-1, keepdim=True) > 0)).sum((1, 2))
    with opt.microbatch(A):
        losses(m(X)).sum().backward()
    # brute force with the same draw: candidates are the positions with non-zero Δ, in order
    y = model(X)
    D = torch.autograd.grad(losses(y).sum(), [y])[0].reshape(-1, 3)
    a = torch.cat([X.reshape(-1, 4), torch.ones(18, 1, dtype=X.dtype)], 1)
    cands = torch.nonzero(D.abs().sum(1) > 0).flatten()
    # the microbatch draws one seed from the generator; layer 0 draws its keys from seed + 0
    probe_seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed)))
    keys = torch.rand(18, generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    keys[~(D.abs().sum(1) > 0)] = float("inf")
    pick = keys.topk(k, largest=False).indices
    assert set(pick.tolist()) <= set(cands.tolist())
    g = torch.einsum("tp,td->tpd", D, a).reshape(18, -1)
    G = torch.stack([g[:9].sum(0), g[9:].sum(0)])
    dots = g[pick] @ G.T
    nu2 = (dots ** 2).sum(0) / (g[pick] ** 2).sum()
    c = A / torch.sqrt(nu2 + 0.3 * nu2.mean())
    want = (c @ G).view(3, 5)
    got = torch.cat([m[0].weight.grad, m[0].bias.grad[:, None]], 1)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


class OffsetRMSNorm(torch.nn.Module):
    """A Gemma-style norm, ``y = x̂ ⊙ (1 + w)``: not ``h ⊙ weight``, so it takes the
    per-feature recompute rule."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("mode", MODES)
def test_norm_rules_affine_and_offset(mode):
    model = SeqMixer().double()
    model.norm = OffsetRMSNorm(8).double()
    ids, mask = _lm_batch(B=3, L=5)
    _, opt = assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode)
    rules = {e.name: (e.rule.name, e.cache.get("affine")) for l in opt.layers for e in l.entries}
    assert rules["norm"] == ("norm", False)


def test_standard_norms_use_the_affine_step():
    from torch_isopo import ISOPO
    model = gpt2()
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids, _ = _lm_batch(pad=False)
    with opt.microbatch(torch.randn(3)):
        lm_losses(model, ids, None).sum().backward()
    norms = [e for l in opt.layers for e in l.entries if e.rule.name == "norm"]
    assert norms and all(e.cache["affine"] for e in norms)


@pytest.mark.parametrize("mode", MODES)
def test_forward_replaced_on_the_instance_is_a_black_box(mode):
    """A linear layer whose instance forward was replaced (e.g. an fp32 head cast) is not
    assumed to compute x Wᵀ + b: it takes the generic exact rule."""
    import types

    import torch.nn.functional as F
    model = MLPPolicy().double()
    head = model.net[3]
    head.forward = types.MethodType(lambda self, x: F.linear(x, self.weight * 2, self.bias), head)
    X = torch.randn(5, 5, dtype=torch.float64)
    acts = torch.randint(0, 4, (5,))

    def losses(m):
        return -torch.log_softmax(m(X), -1).gather(1, acts[:, None]).squeeze(1)
    _, opt = assert_matches_reference(model, losses, _adv(5), mode)
    assert [l.rule for l in opt.layers if l.name == "net.3"] == ["generic"]


def test_fisher_probes_beyond_the_candidates_use_them_all():
    from conftest import run_isopo
    model = qwen3().double()
    ids, mask = _lm_batch()
    A = _adv(3)
    grads = []
    for probes in (None, 10_000, 7):
        m, _ = run_isopo(model, lambda mm: lm_losses(mm, ids, mask), A, "fisher",
                         fisher_probes=probes)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.equal(grads[0], grads[1])
    assert torch.isfinite(grads[2]).all() and not torch.allclose(grads[0], grads[2])


@pytest.mark.parametrize("mode", ["ntk", "fisher"])
@pytest.mark.parametrize("route", ["gram", "materialise"])
def test_tiny_memory_budget_chunks_without_changing_the_result(mode, route):
    """A budget of a few KiB forces row chunks (materialise), row blocks (gram, Fisher
    products) and drops the kept per-sample gradients: the result stays exact."""
    model = qwen3().double()
    ids, mask = _lm_batch()
    assert_matches_reference(model, lambda m: lm_losses(m, ids, mask), _adv(3), mode,
                             route=route, memory_budget=4096)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [1, 200, 1000])
def test_host_row_chunks_of_per_sample_gradients(mode, chunk, monkeypatch):
    """On the host the per-sample gradients of a weight are formed and kept in chunks of rows
    (``finish.HOST_CHUNK`` bytes); chunks of one row, of uneven sizes and one whole weight give
    the brute force's gradients (float64: a row of the 16 × 24 MLP weight is 7·24·8 bytes)."""
    import torch_isopo.finish as finish
    monkeypatch.setattr(finish, "HOST_CHUNK", chunk * 8)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3, bias=False)).double()
    X = torch.randn(7, 5, 24, dtype=torch.float64)          # 7 sequences of 5 positions
    target = torch.randint(0, 3, (7, 5))

    def losses(m):
        return -torch.log_softmax(m(X), -1).gather(-1, target[..., None]).squeeze(-1).sum(1) / 35
    assert_matches_reference(model, losses, _adv(7), mode, route="materialise")
    if chunk != 200:
        return
    ids, mask = _lm_batch()                       # a tied embedding and head: merged uses
    for budget in (256 * 2**20, 4096):            # kept, and not kept (a GEMM to contract)
        assert_matches_reference(qwen3().double(), lambda m: lm_losses(m, ids, mask), _adv(3),
                                 mode, route="materialise", memory_budget=budget)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_first_inputs_with_sample_dim(mode):
    """(L, B, d) inputs: samples along dim 1, said with ``sample_dim=1``."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.LayerNorm(6),
                                torch.nn.Linear(6, 3)).double()
    X = torch.randn(7, 4, 5, dtype=torch.float64)          # (L, B, d)
    target = torch.randint(0, 3, (7, 4))

    def losses(m):
        logp = torch.log_softmax(m(X), -1).gather(-1, target[..., None]).squeeze(-1)
        return -logp.sum(0) / 28
    assert_matches_reference(model, losses, _adv(4), mode, sample_dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpointing_matches_the_plain_forward(mode):
    """Reentrant checkpointing (the brute force cannot run under it) gives the gradients of
    the same model without checkpointing, which the brute-force tests cover."""
    from conftest import run_isopo
    model = llama().double()
    ids, mask = _lm_batch()
    A = _adv(3)
    plain, _ = run_isopo(model, lambda m: lm_losses(m, ids, mask), A, mode)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ckpt, _ = run_isopo(model, lambda m: lm_losses(m, ids, mask), A, mode)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        err = float((p.grad - q.grad).norm() / p.grad.norm())
        assert err < 1e-10, (name, err)
