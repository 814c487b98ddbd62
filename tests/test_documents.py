"""Packed documents are kept apart (doc_ids): attention, block selection and memory never cross a boundary.

Float64, tiny models with sparse budgets, a memory in the second layer (write chunk = half a segment, so boundaries
fall inside chunks), consolidation on (train: one unrolled pass; eval: one fixed pass of the most surprising
tokens, hard keep of half of each evicted segment). Block 16, segment 32, window 64.
"""

from __future__ import annotations

import pytest
import torch

from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM

V, BS, S, L = 50, 16, 32, 192


def make_model(variant="mac", budget="fixed:3", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, depth=2, heads=2, kv_heads=1, head_dim=16, mlp_hidden=48, block_size=BS,
                      segment=S, window=64, persistent_tokens=16, budget=budget, variant=variant, memory_layers=[1],
                      memory=MemoryConfig(heads=2, head_dim=16, depth=2, expansion=2, chunk_size=16),
                      hard_keep_fraction=0.5,
                      consolidation=ConsolidationConfig(mode="fixed", passes=1, train_passes=1, replay="surprising",
                                                        replay_tokens=8), **kw)
    return MemSparseLM(cfg).double()


def doc_ids_from(starts: list[int], length: int = L) -> torch.Tensor:
    """(length,) ids 0, 1, ... changing at each start."""
    d = torch.zeros(length, dtype=torch.long)
    for s0 in starts:
        d[s0:] += 1
    return d


def rand_ids(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


# Boundaries per row: at, just before and just after block and segment edges; a document shorter than a block
# (5 tokens) in every row. Each row: [A | B (5 tokens) | D | E], D long enough to have its own evictions.
# D reads its own evicted tokens from 96 tokens after its start on.
ROWS = [(BS - 1, 110), (BS, 120), (BS + 1, 128), (S - 1, 112), (S + 1, 125)]  # (start of B, length of D)


def layouts():
    out = []
    for b0, d_len in ROWS:
        d0 = b0 + 5
        out.append(([b0, d0, d0 + d_len], d0))
    return out


def rerandomized(ids, docs, keep_doc, seed):
    """ids with every document but `keep_doc` (per row) replaced by fresh random tokens."""
    new = ids.clone()
    fresh = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(seed))
    other = docs != keep_doc[:, None]
    new[other] = fresh[other]
    return new


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_segment_aligned_document_equals_it_alone(variant):
    """A document starting on a segment edge (the one before ending just before it; a 5-token document before
    that) computes exactly what it computes alone: logits in eval, the loss in training."""
    m = make_model(variant)
    ids = torch.stack([rand_ids(L, 1), rand_ids(L, 2)])
    starts = [[64], [10, 15, 32]]
    docs = torch.stack([doc_ids_from(s) for s in starts])
    d0s = [64, 32]
    m.eval()
    with torch.no_grad():
        packed = m(ids, doc_ids=docs).logits
        for row, d0 in enumerate(d0s):
            alone = m(ids[row:row + 1, d0:]).logits
            torch.testing.assert_close(packed[row:row + 1, d0:], alone, rtol=0, atol=1e-10)
    m.train()
    row, d0 = 1, 32
    labels = torch.full_like(ids, -100)
    labels[:, d0:-1] = ids[:, d0 + 1:]
    labels[0] = -100
    packed_loss = m(ids, labels, doc_ids=docs, return_logits=False).loss
    alone_loss = m(ids[row:, d0:], labels[row:, d0:], return_logits=False).loss
    torch.testing.assert_close(packed_loss, alone_loss, rtol=0, atol=1e-6)  # the loss is summed in fp32
    with torch.no_grad():  # without doc_ids the previous documents do change it (the test can fail)
        assert (m(ids, labels, return_logits=False).loss - alone_loss).abs() > 1e-3


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_other_documents_do_not_change_a_document(variant):
    """Boundaries anywhere (inside blocks and segments, next to their edges): replacing every other document's
    tokens leaves a document's logits exactly as they were, for the long document D and the 5-token one."""
    m = make_model(variant)
    m.eval()
    lays = layouts()
    ids = torch.stack([rand_ids(L, 10 + i) for i in range(len(lays))])
    docs = torch.stack([doc_ids_from(s) for s, _ in lays])
    with torch.no_grad():
        base = m(ids, doc_ids=docs).logits
        for keep, seed in ((2, 5), (1, 6)):  # D, then the short document B
            keep_t = torch.full((len(lays),), keep)
            other = m(rerandomized(ids, docs, keep_t, seed), doc_ids=docs).logits
            mine = docs == keep
            torch.testing.assert_close(other[mine], base[mine], rtol=0, atol=1e-10)
            assert (other[~mine] - base[~mine]).abs().max() > 1e-3
        assert (m(ids).logits[docs == 2] - base[docs == 2]).abs().max() > 1e-3  # doc_ids matter


def test_no_gradient_crosses_documents():
    """Training mode (one unrolled consolidation pass): the loss of one document has exactly zero gradient on
    every other document's token embeddings, and a nonzero one on its own."""
    m = make_model("mac", budget="top_p:p=0.8,min=1,max=4")
    m.train()
    lays = layouts()[:3]
    ids = torch.stack([rand_ids(L, 20 + i) for i in range(len(lays))])
    docs = torch.stack([doc_ids_from(s) for s, _ in lays])
    for keep in (1, 2):
        seen = {}
        hook = m.embed.register_forward_hook(
            lambda mod, inp, out, seen=seen: seen.setdefault("x", out.retain_grad() or out))
        labels = torch.where(docs == keep, torch.roll(ids, -1, 1), torch.full_like(ids, -100))
        labels[:, -1] = -100
        m(ids, labels, doc_ids=docs, return_logits=False).loss.backward()
        hook.remove()
        g = seen["x"].grad.abs().sum(-1)
        assert (g[docs != keep] == 0).all()
        assert (g[docs == keep] > 0).float().mean() > 0.9
        m.zero_grad()


def test_stream_with_documents_equals_one_shot():
    """Streaming a packed sequence in uneven pieces (mid-block, mid-segment, across boundaries) with its doc_ids
    equals the one-shot forward; a new document in a stream behaves like a fresh init_state."""
    m = make_model("mac")
    m.eval()
    lays = [layouts()[0], layouts()[4]]
    ids = torch.stack([rand_ids(L, 30 + i) for i in range(len(lays))])
    docs = torch.stack([doc_ids_from(s) for s, _ in lays])
    with torch.no_grad():
        want = m(ids, doc_ids=docs).logits
        state = m.init_state(len(lays), total_length=L)
        outs, i = [], 0
        for n in (7, 20, 1, 41, 33, 16, 74):
            lg, state = m.stream(ids[:, i:i + n], state, doc_ids=docs[:, i:i + n])
            outs.append(lg)
            i += n
        assert i == L
        torch.testing.assert_close(torch.cat(outs, 1), want, rtol=0, atol=1e-9)
        # the last document of row 0 streamed on its own from a fresh state at position 0 (segment-aligned
        # start) equals it in the packed stream
        d0 = 64
        alone, _ = m.stream(ids[:1, d0:], m.init_state(1, total_length=L - d0))
        packed, _ = m.stream(ids[:1], m.init_state(1, total_length=L), doc_ids=doc_ids_from([d0])[None])
        torch.testing.assert_close(packed[:, d0:], alone, rtol=0, atol=1e-9)


def test_one_document_and_cross_document_option():
    """One document per row computes what no doc_ids computes; `cross_document: true` ignores doc_ids (the old
    behaviour); bad doc_ids are a ValueError."""
    m = make_model("mag")
    m.eval()
    ids = torch.stack([rand_ids(L, 40), rand_ids(L, 41)])
    with torch.no_grad():
        none = m(ids).logits
        torch.testing.assert_close(m(ids, doc_ids=torch.zeros_like(ids)).logits, none, rtol=0, atol=1e-12)
        docs = torch.stack([doc_ids_from([50, 130]), doc_ids_from([17])])
        m.config.cross_document = True
        assert torch.equal(m(ids, doc_ids=docs).logits, none)
        m.config.cross_document = False
        with pytest.raises(ValueError, match="doc_ids"):
            m(ids, doc_ids=docs[:, :10])
        with pytest.raises(ValueError, match="doc_ids"):
            m(ids, doc_ids=docs.double())


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_training_step_passes_doc_ids():
    """The Lightning training step trains leak-free on a packed batch: its loss is the model's with the batch's
    doc_ids, not without."""
    from memsparse.train.module import MemSparseLightningModule

    module = MemSparseLightningModule(make_model("mac").config, lr=1e-3, total_steps=2).double()
    module.train()
    ids = torch.stack([rand_ids(L, 50), rand_ids(L, 51)])
    docs = torch.stack([doc_ids_from([40, 45, 96]), doc_ids_from([130])])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels, "doc_ids": docs}
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        want = module.model(ids, labels, doc_ids=docs, return_logits=False).loss
        old = module.model(ids, labels, return_logits=False).loss
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-6)
    assert (old - want).abs() > 1e-4


def test_eviction_masks_equal_the_per_segment_formulas():
    """What the memory loop derives once per span (`Documents.evictions`, `Documents.fresh`) equals the
    per-segment formulas it replaced, exactly (the reset itself is folded into the write: tests/test_memory.py)."""
    from memsparse.model import OLD_DOCUMENT, document_starts

    pos, cached, n = 96, 64, 160  # a span after a cache of two segments, prev document continued in row 0
    ids = torch.stack([doc_ids_from([5, 40, 70]), doc_ids_from([32, 33, 100])])[:, :n]
    docs = document_starts(ids, pos, prev_id=torch.tensor([0, 7]), prev_start=torch.tensor([50, 90]))
    c0 = pos - cached
    dst = docs.with_cache(pos, c0)
    assert docs.with_cache(pos, c0) is dst  # derived once, reused by every layer
    evs = list(range(c0 // S, (pos + n) // S - 64 // S))
    resets, gates = docs.evictions(pos, c0, evs[0], len(evs), S, torch.float64)
    for i, ev in enumerate(evs):
        s_last = dst[:, ev * S - c0 + S - 1]
        assert torch.equal(resets[:, i], s_last >= ev * S)
        valid = torch.arange(ev * S, ev * S + S)[None, :] >= s_last[:, None]
        assert torch.equal(gates[:, i], valid.double())
    assert resets.any() and not resets.all() and (dst == OLD_DOCUMENT).any()
    t_abs = torch.arange(pos, pos + n)
    assert torch.equal(docs.fresh(pos, n, S, 64), docs.start >= (t_abs // S - 64 // S) * S)


def _steps_reference(m, docs, total_length):
    """The memory's step counter after a packed sequence, per row, by the per-eviction rule: 0 at each eviction
    that resets the row, then + the tokens written (the segment and its consolidation replays)."""
    from memsparse.consolidation import consolidation_passes
    from memsparse.model import document_starts

    cfg = m.config
    w_seg, start = cfg.window // S, document_starts(docs).start
    replay = min(cfg.consolidation.replay_tokens, S) if cfg.consolidation.replay == "surprising" else S
    step = torch.zeros(docs.shape[0], dtype=torch.long)
    for ev in range(docs.shape[1] // S - w_seg):
        s1 = (ev + 1 + w_seg) * S
        passes = consolidation_passes(cfg.consolidation, total_length or s1, cfg.window, m.training)
        step = torch.where(start[:, ev * S + S - 1] >= ev * S, 0, step) + S + passes * replay
    return step


def test_memory_step_counts_from_the_last_document_reset():
    """The step counters of the rows a document reset are set once per span (`Documents.restarted_steps`, a
    minimum with the count without resets), or before each write where the evictions of a span write different
    token counts: either way they equal the per-eviction rule, for a one-shot span (train: one unrolled pass per
    eviction), two spans (rows without a reset in the second keep counting), a stream, and a span without a
    declared length under a consolidation schedule (1, 2, 3, 3 passes)."""
    ids = torch.stack([rand_ids(L, 40 + i) for i in range(3)])
    docs = torch.stack([doc_ids_from([40]), doc_ids_from([5, 100]), doc_ids_from([170])])
    m = make_model()

    def step_of(state):
        return state.layers[1].memory.step

    m.train()
    _, st = m._run(ids, m.init_state(3, total_length=L), {}, doc_ids=docs)
    want = _steps_reference(m, docs, L)
    assert torch.equal(step_of(st), want) and len(set(want.tolist())) == 3
    m.eval()
    with torch.no_grad():
        want = _steps_reference(m, docs, L)
        st = m.init_state(3, total_length=L)
        for a, b in ((0, 96), (96, L)):
            _, st = m._run(ids[:, a:b], st, {}, doc_ids=docs[:, a:b])
        assert torch.equal(step_of(st), want)
        _, st = m.stream(ids, m.init_state(3, total_length=L), return_logits="none", doc_ids=docs)
        assert torch.equal(step_of(st), want)
        m.set_consolidation(ConsolidationConfig(mode="schedule", a=2.0, n_max=3, replay="surprising",
                                                replay_tokens=8))
        _, st = m._run(ids, m.init_state(3), {}, doc_ids=docs)
        want = _steps_reference(m, docs, None)
        assert torch.equal(step_of(st), want) and len(set(want.tolist())) == 3
