"""Every budget is causal and prefix-consistent: the model that decodes is the model that trained.

A query block's kept blocks may depend only on what its queries may see, and not on where the input ends, so
for every policy, variant and consolidation setting: changing tokens after t leaves logits at <= t unchanged
(eval and training mode), a prefix's forward equals the one-shot forward on that prefix, and streaming in any
split equals the one-shot forward, in float64 to 1e-9.
"""

import pytest
import torch
from memsparse.kernels import select_blocks

from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.memory import NeuralMemory, WriteStats
from memsparse.model import MemSparseLM, SurpriseGate, top_count_indices

POLICIES = ["dense", "fixed:2", "length_scaled:c=3,min_tokens=8", "length_scaled:c=0.9,min_tokens=0,exponent=1",
            "top_p:p=0.6,min=1", "top_p:p=0.8,min=1,min_c=1,max_c=4",
            "top_p:p=0.6,min=1,forced_mass=0"]
CONSOLIDATION = {"off": ConsolidationConfig(mode="off"),
                 "schedule": ConsolidationConfig(mode="schedule", a=1.0, n_max=3)}


def model_for(policy, variant="mac", consolidation="schedule", memory_layers=(0, 1), **kw):
    torch.manual_seed(0)
    kw = {"persistent_tokens": 8, **kw}
    cfg = ModelConfig(vocab_size=40, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64,
                      block_size=8, segment=16, window=32, budget=policy, variant=variant,
                      memory_layers=list(memory_layers), memory=MemoryConfig(heads=2, head_dim=8, chunk_size=5),
                      consolidation=CONSOLIDATION[consolidation], **kw)
    return MemSparseLM(cfg).double().eval()


def ids_for(seed, length=120, batch=1):
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_top_p_selection_ignores_keys_after_the_blocks_first_query():
    # the case: only keys 5..7 (the future of query 4) change; block 1 must keep the same blocks
    torch.manual_seed(0)
    q = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    s = q[0, 0, :4].mean(0)
    kept = []
    for sign in (+1, -1):
        k2 = k.clone()
        k2[0, 0, 5:8] = sign * 10 * s
        idx, cnt = select_blocks(q, k2, block_size=4, policy="top_p:p=0.6,min=1", sink_blocks=0)
        kept.append(idx[0, 0, 1, :cnt[0, 0, 1]].tolist())
    assert kept[0] == kept[1]


@pytest.mark.parametrize("policy", POLICIES)
def test_selection_of_a_partial_block_equals_the_complete_block(policy):
    # queries 0..L-1 against keys 0..L-1, L ending mid-block: the last block keeps what it keeps once complete
    torch.manual_seed(1)
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    idx_full, cnt_full = select_blocks(q, k, block_size=8, policy=policy, sink_blocks=1)
    for L in (41, 44, 47):
        idx, cnt = select_blocks(q[:, :, :L], k[:, :, :L], block_size=8, policy=policy, sink_blocks=1)
        nb = cnt.shape[-1]
        torch.testing.assert_close(cnt, cnt_full[..., :nb], rtol=0, atol=0)
        w = idx.shape[-1]
        assert torch.equal(idx, idx_full[..., :nb, :w]) or w >= idx_full.shape[-1]
        for b in range(nb):
            c = int(cnt[0, 0, b])
            assert idx[0, 0, b, :c].tolist() == idx_full[0, 0, b, :c].tolist()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("policy", POLICIES)
def test_future_tokens_never_change_past_logits(policy, training):
    for memory_layers in ((), (1,)):
        model = model_for(policy, memory_layers=memory_layers, persistent_tokens=0)
        with torch.no_grad():  # peaked selection scores, as a trained model has (at init they are near flat)
            for blk in model.blocks:
                blk.wq.weight.mul_(6.0)
                blk.wkv.weight.mul_(6.0)
        model.train(training)
        ids = ids_for(3, 96)
        base = model(ids).logits
        for t in (41, 60):  # inside blocks and segments
            ids2 = ids.clone()
            ids2[:, t + 1:t + 3] = 28  # the next tokens only, as a query block's own future
            other = model(ids2).logits
            torch.testing.assert_close(other[:, :t + 1], base[:, :t + 1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("policy,variant", [(p, "mac") for p in POLICIES] +
                         [(p, v) for p in ("length_scaled:c=0.9,min_tokens=0,exponent=1", "top_p:p=0.6,min=1")
                          for v in ("mag", "mal")])
def test_prefix_forward_equals_one_shot(policy, variant):
    model = model_for(policy, variant=variant)
    ids = ids_for(6, 112)
    full = model(ids, state=model.init_state(1, total_length=112)).logits
    for t in (33, 71, 100):  # ends mid-block, mid-segment, after evictions
        part = model(ids[:, :t + 1], state=model.init_state(1, total_length=112)).logits
        torch.testing.assert_close(part, full[:, :t + 1], rtol=1e-9, atol=1e-9)


def _stream_in_random_splits(model, seed):
    ids = ids_for(seed, 130, batch=2)
    full = model(ids).logits
    g = torch.Generator().manual_seed(100 + seed)
    state, out, i = model.init_state(2, total_length=130), [], 0
    while i < 130:
        n = int(torch.randint(1, 40, (1,), generator=g))
        lg, state = model.stream(ids[:, i:i + n], state)
        out.append(lg)
        i += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("consolidation", ["off", "schedule"])
@pytest.mark.parametrize("policy", POLICIES)
def test_stream_in_random_splits_equals_one_shot(policy, consolidation):
    # one data seed per case, a different one for each policy (all seeds for all: the slow test below)
    seed = (0, 6, 11)[(POLICIES.index(policy) + (consolidation == "off")) % 3]
    _stream_in_random_splits(model_for(policy, consolidation=consolidation), seed)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_stream_in_random_splits_equals_one_shot_every_seed(policy):
    model = model_for(policy)
    for seed in (0, 6, 11, 17):
        _stream_in_random_splits(model, seed)


def test_token_by_token_stream_equals_one_shot_with_the_readme_config():
    # the README's model: length_scaled budget, MAC, consolidation schedule; one token at a time, as generate does
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=64, depth=2, segment=64, window=128, block_size=16,
                      budget="length_scaled:c=12,min_tokens=64", variant="mac",
                      memory=MemoryConfig(heads=4, head_dim=16, chunk_size=64),
                      consolidation=ConsolidationConfig(mode="schedule", a=1.0, n_max=8))
    model = MemSparseLM(cfg).double().eval()
    ids = torch.randint(0, 259, (1, 200), generator=torch.Generator().manual_seed(2))
    full = model(ids, state=model.init_state(1, total_length=200)).logits
    lg, state = model.stream(ids[:, :160], model.init_state(1, total_length=200))
    out = [lg]
    for i in range(160, 200):
        lg, state = model.stream(ids[:, i:i + 1], state)
        out.append(lg)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)


def test_hard_keep_with_duplicate_tokens_streams_like_one_shot():
    model = model_for("fixed:2", hard_keep_fraction=0.5)
    ids = ids_for(7, 112)
    ids[:, 20:60] = 5  # whole segments of one token: exactly tied surprises
    ids[:, 70:90:2] = 9
    full = model(ids).logits
    state, out = model.init_state(1, total_length=112), []
    for a, b in ((0, 13), (13, 14), (14, 50), (50, 51), (51, 112)):
        lg, state = model.stream(ids[:, a:b], state)
        out.append(lg)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)


def test_hard_keep_keeps_the_stated_count_per_evicted_segment():
    # 12-token segment written in chunks of 5: fraction 0.5 keeps 6 tokens of the segment, not 3 + 3 + 1
    gate = SurpriseGate(heads=2, learned=False)
    fn = gate.segment_gate_fn(0.5, 12)
    g = torch.Generator().manual_seed(0)
    kept = [fn(WriteStats(None, torch.rand(1, 2, n, generator=g, dtype=torch.float64))) for n in (5, 5, 2)]
    total = torch.cat(kept, -1)
    assert total.shape[-1] == 12
    assert (total.sum(-1) == 6).all()
    with pytest.raises(ValueError, match="segment"):
        fn(WriteStats(None, torch.rand(1, 2, 1, dtype=torch.float64)))


def test_top_count_breaks_ties_by_position_and_keeps_exactly_count():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0 * (1 + 1e-12), 0.5]], dtype=torch.float64)
    assert top_count_indices(x, 2).tolist() == [[1, 2]]  # the 1e-12 difference counts as a tie
    assert top_count_indices(x, 4).tolist() == [[1, 2, 3, 4]]
    assert top_count_indices(x, 0).shape == (1, 0)


def test_sequential_write_runs_under_no_grad():
    torch.manual_seed(0)
    mem = NeuralMemory(32, MemoryConfig(heads=2, head_dim=8, chunk_size=4)).double()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with_grad, _ = mem.write(mem.init_state(1), mem.project(x), impl="sequential")
    with torch.no_grad():
        st, _ = mem.write(mem.init_state(1), mem.project(x), impl="sequential")
    assert not st.weights[0].requires_grad
    for a, b in zip(st.weights, with_grad.weights):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_visible_tokens_count_the_complete_blocks_allowed_positions(seed):
    # brute force over positions: key p is visible to query block m (as if complete) when p <= its last query
    # and p's block is in the window (>= min_key_block) or a sink
    g = torch.Generator().manual_seed(seed)
    bs = int(torch.randint(2, 6, (1,), generator=g))
    Lk = int(torch.randint(3 * bs, 12 * bs, (1,), generator=g))
    Lq = int(torch.randint(1, Lk + 1, (1,), generator=g))
    sink = int(torch.randint(0, 3, (1,), generator=g))
    q, k = torch.randn(1, 1, Lq, 4, generator=g), torch.randn(1, 1, Lk, 4, generator=g)
    nq = -(-Lq // bs)
    off = Lk - Lq
    mkb = torch.randint(0, 4, (nq,), generator=g)
    for window in (None, mkb):
        *_, info = select_blocks(q, k, block_size=bs, policy="length_scaled:c=1,min_tokens=0", sink_blocks=sink,
                                 min_key_block=window, return_info=True)
        for m in range(nq):
            last = off + (m + 1) * bs - 1
            lo = 0 if window is None else int(window[m])
            want = sum(1 for p in range(last + 1) if p // bs >= lo or p // bs < sink)
            assert int(info["visible_tokens"][m]) == want, (bs, Lk, Lq, sink, m)
