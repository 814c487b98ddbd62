"""GraphedLoss: the static-buffer step (graph=False on CPU; the CUDA capture itself is checked on the GPU by
benchmarks/bench_model.py --cuda-graph) gives the eager model's loss, stats and gradients, composes with
optimizers and gradient accumulation, and refuses what it cannot do."""

import pytest
import torch

from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.cuda_graph import GraphedLoss
from memsparse.model import MemSparseLM


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                      segment=16, window=32, persistent_tokens=8, budget="fixed:3", memory_layers=[1],
                      memory=MemoryConfig(heads=2, head_dim=8, chunk_size=16),
                      consolidation=ConsolidationConfig(mode="fixed", passes=1))
    return MemSparseLM(cfg).double().train()


def batch(seed, B=2, L=80):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, L), generator=g)
    labels = torch.randint(0, 50, (B, L), generator=g)
    labels[:, :3] = -100
    return ids, labels


def grads_of(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_loss_stats_and_grads_equal_eager():
    model = make_model()
    ids, labels = batch(1)
    ref = model(ids, labels, return_logits=False)
    ref.loss.backward()
    want = grads_of(model)
    model.zero_grad(set_to_none=True)

    step = GraphedLoss(model, graph=False)
    out = step(ids, labels)
    assert out.logits is None and out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-12, atol=1e-12)
    assert out.stats.keys() == ref.stats.keys()
    for k in ref.stats:
        torch.testing.assert_close(out.stats[k], ref.stats[k], rtol=1e-12, atol=1e-12)
    (3.0 * out.loss).backward()  # the incoming gradient scales the graph's gradients
    for w, p in zip(want, model.parameters()):
        if w is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, 3.0 * w, rtol=1e-10, atol=1e-12)
    assert sum(p.grad is not None for p in model.parameters()) > 10


def test_accumulation_and_optimizer_steps_equal_eager():
    eager, graphed = make_model(), make_model()
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-2)
    step = GraphedLoss(graphed, graph=False)
    for it in range(3):
        for micro in range(2):  # two micro-batches per optimizer step, loss / 2 as Lightning does
            ids, labels = batch(10 * it + micro)
            (eager(ids, labels, return_logits=False).loss / 2).backward()
            (step(ids, labels).loss / 2).backward()
        opt_e.step()
        opt_g.step()
        opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-9, atol=1e-11)
    assert step.captures == 1 and step.replays == 6


def test_new_shape_is_captured_once_and_kept():
    model = make_model()
    step = GraphedLoss(model, graph=False, max_graphs=2)
    step(*batch(1)).loss.backward()
    ids, labels = batch(2, L=48)
    with pytest.warns(UserWarning, match="new input shape"):
        out = step(ids, labels)
    torch.testing.assert_close(out.loss, model(ids, labels, return_logits=False).loss.detach(), rtol=1e-12, atol=0)
    out.loss.backward()
    for seed in (3, 4):  # alternating shapes replay their own captures: no new capture, no warning
        step(*batch(seed)).loss.backward()
        step(*batch(seed, L=48)).loss.backward()
    assert step.captures == 2 and step.replays == 6
    with pytest.warns(UserWarning, match="new input shape"):
        step(*batch(5, L=32))  # a third shape releases the oldest capture
    assert len(step._steps) == 2 and step.captures == 3


def test_backward_of_another_shape_is_fine():
    model = make_model()
    step = GraphedLoss(model, graph=False)
    first = step(*batch(1))
    with pytest.warns(UserWarning):
        step(*batch(2, L=48))  # another shape, other buffers: the first loss's gradients are intact
    first.loss.backward()
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    model(*batch(1), return_logits=False).loss.backward()
    for g, w in zip(got, grads_of(model)):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_stale_backward_is_an_error():
    model = make_model()
    step = GraphedLoss(model, graph=False)
    first = step(*batch(1))
    step(*batch(2))
    with pytest.raises(RuntimeError, match="overwritten"):
        first.loss.backward()


def test_bad_use_is_a_clear_error():
    model = make_model()
    ids, labels = batch(1)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedLoss(model)(ids, labels)  # graph=True needs CUDA
    with pytest.raises(ValueError, match="labels"):
        GraphedLoss(model, graph=False)(ids, labels[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        GraphedLoss(model, graph=False)(ids + 100, labels)
    with pytest.raises(ValueError, match="warmup"):
        GraphedLoss(model, warmup=0)
    with pytest.raises(TypeError, match="MemSparseLM"):
        GraphedLoss(torch.nn.Linear(2, 2))
    model.eval()
    with pytest.raises(RuntimeError, match="train"):
        GraphedLoss(model, graph=False)(ids, labels)


# ------------------------------------------------------------------------------------------------ streaming
def stream_model(consolidation):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                      segment=16, window=32, persistent_tokens=8, budget="top_p:p=0.8,min=1", memory_layers=[1],
                      memory=MemoryConfig(heads=2, head_dim=8, chunk_size=16), consolidation=consolidation,
                      hard_keep_fraction=0.5)
    return MemSparseLM(cfg).double().eval()


def flat_state(state):
    return torch.cat([t.flatten().double() for ls in state.layers for t in ls.tensors()])


@pytest.mark.parametrize("total_length", [None, 400])
def test_graphed_stream_equals_stream(total_length):
    from memsparse.cuda_graph import GraphedStream

    # the log schedule's pass count grows with the position when total_length is None: several steps keyed
    model = stream_model(ConsolidationConfig(mode="schedule", a=1.0, n_max=3, replay="surprising", replay_tokens=8))
    ids = torch.randint(0, 50, (2, 300), generator=torch.Generator().manual_seed(4))
    gs = GraphedStream(model, graph=False)
    st, st_want = model.init_state(2, total_length=total_length), model.init_state(2, total_length=total_length)
    got, want, i = [], [], 0
    for n in (5, 40, 16, 16, 100, 7, 116):  # mid-segment starts (eager) and aligned runs (static steps)
        lg, st = gs(ids[:, i:i + n], st)
        lw, st_want = model.stream(ids[:, i:i + n], st_want)  # same calls: the stats' spans match
        got.append(lg)
        want.append(lw)
        i += n
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-10, atol=1e-10)
    one_shot, _ = model.stream(ids, model.init_state(2, total_length=total_length))
    torch.testing.assert_close(torch.cat(got, 1), one_shot, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat_state(st), flat_state(st_want), rtol=1e-10, atol=1e-10)
    assert st.pos == st_want.pos == 300
    means, want_means = st.stat_means(), st_want.stat_means()
    assert means.keys() == want_means.keys()
    for k in means:
        # float32 running sums, grouped per segment in the static steps
        torch.testing.assert_close(means[k].double(), want_means[k].double(), rtol=1e-6, atol=1e-9)
    assert gs.replays >= 8 and len(gs.steps) >= (2 if total_length is None else 1)


def test_graphed_stream_state_is_a_copy():
    from memsparse.cuda_graph import GraphedStream

    model = stream_model(ConsolidationConfig(mode="off"))
    ids = torch.randint(0, 50, (1, 160), generator=torch.Generator().manual_seed(5))
    gs = GraphedStream(model, graph=False)
    # 100 tokens: static steps, then a 4-token eager tail that passes the memory state through unchanged
    _, st = gs(ids[:, :100])
    kept = flat_state(st).clone()
    gs(ids[:, 100:], st)  # continuing moves the graph's buffers, not the state we hold
    torch.testing.assert_close(flat_state(st), kept, rtol=0, atol=0)
    last, _ = gs(ids[:, 100:], st, return_logits="last")
    full, _ = model.stream(ids, return_logits="all")
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-10, atol=1e-10)


def test_graphed_stream_errors():
    from memsparse.cuda_graph import GraphedStream

    model = stream_model(ConsolidationConfig(mode="off"))
    ids = torch.randint(0, 50, (1, 20))
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStream(model)(ids)
    with pytest.raises(ValueError, match="return_logits"):
        GraphedStream(model, graph=False)(ids, return_logits="first")
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        GraphedStream(model, graph=False)(ids)
