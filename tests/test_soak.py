"""Soak: 1000 optimizer steps of 4 microbatches each keep memory and live objects flat.

Garbage collection is off during the run, so every tensor ISOPO makes must be freed by
reference counting as soon as the graph, ``step()`` and ``zero_grad()`` are done with it: a
reference kept anywhere, or a reference cycle holding tensors, shows up as growth. (Other
objects are counted after a collection: torch's pytree makes tensor-free cycles per call.)
"""
import gc

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torch_isopo import ISOPO
from torch_isopo.microbatch import LayerRecord, Microbatch

STEPS, MICROBATCHES, N, L, VOCAB = 1000, 4, 2, 3, 16


class Gain(nn.Module):
    """A module without a dedicated rule (generic path)."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.g


class Tiny(nn.Module):
    """One layer per rule (embedding, norm, generic, linear); with ``ckpt`` all but the
    embedding run under activation checkpointing."""

    def __init__(self, d=4):
        super().__init__()
        self.emb, self.norm = nn.Embedding(VOCAB, d), nn.LayerNorm(d)
        self.gain, self.head = Gain(d), nn.Linear(d, VOCAB)
        self.ckpt = False

    def rest(self, h):
        return self.head(self.gain(self.norm(torch.tanh(h))))

    def forward(self, ids):
        h = self.emb(ids)
        return checkpoint(self.rest, h, use_reentrant=False) if self.ckpt else self.rest(h)


def _live(owner):
    """Live tensors and this optimizer's ISOPO records (those of other tests may be kept by
    global caches such as torch.compile's), then all objects that survive a collection."""
    objs = gc.get_objects()
    tensors = sum(isinstance(o, torch.Tensor) for o in objs)
    records = sum(isinstance(o, Microbatch) and o.owner is owner or
                  isinstance(o, LayerRecord) and o.mb.owner is owner for o in objs)
    del objs
    gc.collect()
    return tensors, records, len(gc.get_objects())


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_thousand_steps_keep_memory_flat():
    torch.manual_seed(0)
    model = Tiny()
    opt = ISOPO(model, torch.optim.AdamW(model.parameters(), lr=1e-3), mode="ntk", ema=0.9)
    hooks = [len(p._backward_hooks or {}) for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    samples = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # tiny ops: no thread pool to wake
    gc.collect()
    gc.disable()
    try:
        for step in range(STEPS):
            for k in range(MICROBATCHES):
                ids = torch.randint(0, VOCAB, (N, L), generator=gen)
                last = model.ckpt = k == MICROBATCHES - 1
                with opt.microbatch(torch.randn(N, generator=gen)):
                    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
                    if not last:
                        loss.backward()
                if last:                    # after its block, recomputing the checkpointed part:
                    loss.backward()         # the graph carries its microbatch
                del loss
            opt.step()
            opt.zero_grad()
            if step + 1 == 100:             # warmed up: the baseline starts clean
                gc.collect()
            if step + 1 in (100, 550, STEPS):
                samples[step + 1] = (_live(opt._attachment), _rss_bytes())
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    (t0, r0, o0), rss0 = samples[100]
    for at in (550, STEPS):
        (t, r, o), rss = samples[at]
        assert t <= t0, f"live tensors {t0} at step 100, {t} at step {at}"
        assert r == r0 == 0, f"ISOPO records alive at step {at}: {r}"
        assert o - o0 < 100, f"objects grew by {o - o0} from step 100 to {at}"
        assert rss - rss0 < 16 * 2**20, f"resident memory grew by {(rss - rss0) / 2**20:.1f} MiB"
    assert opt._ledger.made == {} and opt._step_figures == {} and opt._attachment.active is None
    assert [len(p._backward_hooks or {}) for p in model.parameters()] == hooks
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(opt._m) == {layer.name for layer in opt.layers}
