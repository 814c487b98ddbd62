"""The memory's short causal convolution on q/k/v (`memory.conv`, Titans sec. 4.4): the reference conv, the
identity start, streaming = one-shot, packed documents kept apart, gradients, the CUDA-graph state, bad config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memsparse.config import ConfigError, ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.memory import causal_depthwise_conv
from memsparse.model import MemSparseLM

V = 50


def config(conv=4, variant="mac", write_input="layer", **kw):
    return ModelConfig(vocab_size=V, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                       segment=16, window=32, persistent_tokens=8, budget="top_p:p=0.8,min=1", variant=variant,
                       memory_layers=[1], memory=MemoryConfig(heads=2, head_dim=8, chunk_size=8, conv=conv,
                                                              write_input=write_input), **kw)


def model(conv=4, variant="mac", randomize=True, write_input="layer", **kw):
    torch.manual_seed(0)
    m = MemSparseLM(config(conv, variant, write_input, **kw)).double().eval()
    if randomize and conv:  # away from the identity start, so every tap matters
        with torch.no_grad():
            m.blocks[1].memory.conv_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return m


def ids(n, seed=1, batch=2):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_conv_equals_conv1d_and_carries_its_state():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 23, 6, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None, :], groups=6).transpose(1, 2)
    y, _ = causal_depthwise_conv(x, w)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    outs, prev, i = [], None, 0
    for n in (1, 2, 7, 1, 12):  # pieces shorter than the K-1 = 3 tokens of state too
        yi, prev = causal_depthwise_conv(x[:, i:i + n], w, prev, pos=i)
        outs.append(yi)
        i += n
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(prev, x[:, -3:], rtol=0, atol=0)


def test_conv_taps_stop_at_the_document_start():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 10, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    start = torch.tensor([[0] * 4 + [4] * 6])  # a second document from token 4 on
    y, _ = causal_depthwise_conv(x, w, doc_start=start)
    alone, _ = causal_depthwise_conv(x[:, 4:], w)
    torch.testing.assert_close(y[:, 4:], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, :4], causal_depthwise_conv(x[:, :4], w)[0], rtol=0, atol=1e-12)


def test_identity_start_computes_what_the_model_without_it_computes():
    with_conv, without = model(conv=4, randomize=False), model(conv=0)
    missing, unexpected = without.load_state_dict(with_conv.state_dict(), strict=False)
    assert missing == [] and unexpected == ["blocks.1.memory.conv_weight"]
    x = ids(70)
    torch.testing.assert_close(with_conv(x).logits, without(x).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant, write_input", [("mac", "layer"), ("mag", "layer"), ("mac", "embeddings")])
def test_stream_equals_one_shot_with_conv(variant, write_input):
    """Also with `memory.write_input: embeddings` (the layer-1 memory's keys and values from the embeddings)."""
    m = model(variant=variant, write_input=write_input, consolidation=ConsolidationConfig(mode="fixed", passes=1))
    x = ids(130)
    with torch.no_grad():
        full = m(x).logits
        state, out, i = m.init_state(2, total_length=130), [], 0
        for n in (1, 2, 5, 16, 1, 40, 65):
            lg, state = m.stream(x[:, i:i + n], state)
            out.append(lg)
            i += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)
    assert (full - model(conv=0, variant=variant, consolidation=ConsolidationConfig(mode="fixed", passes=1))(x)
            .logits).abs().max() > 1e-3  # the convolution changes the model (the test can fail)


def test_other_documents_do_not_reach_through_the_conv():
    """Tokens of the previous document one to three positions back are what the taps would see: replacing them
    must not change the next document's logits, with doc_ids (and does without)."""
    m = model()
    x = ids(100, seed=5, batch=1)
    docs = torch.zeros_like(x)
    docs[:, 37:] = 1  # mid-block, mid-segment
    y = x.clone()
    y[:, 30:37] = (x[:, 30:37] + 1) % V
    with torch.no_grad():
        a, b = m(x, doc_ids=docs).logits, m(y, doc_ids=docs).logits
        torch.testing.assert_close(a[:, 37:], b[:, 37:], rtol=0, atol=1e-10)
        assert (m(x).logits[:, 37:] - m(y).logits[:, 37:]).abs().max() > 1e-4


def test_every_tap_learns():
    m = model().train()
    x = ids(64)
    m(x, torch.roll(x, -1, 1), return_logits=False).loss.backward()
    g = m.blocks[1].memory.conv_weight.grad
    assert g is not None and (g.abs().sum(0) > 0).all()


def test_random_init_draws_every_tap_within_conv1d_bounds():
    """memory.conv_init random: nn.Conv1d's depthwise default U(-1/sqrt(K), 1/sqrt(K)), seeded like the rest of the
    model; identity (the default) stays the last tap 1."""
    cfg = config(4)
    torch.manual_seed(0)
    w = MemSparseLM(ModelConfig(**{**cfg.__dict__, "memory": MemoryConfig(**{**cfg.memory.__dict__,
                                                                             "conv_init": "random"})})
                    ).blocks[1].memory.conv_weight
    assert w.abs().max() <= 0.5 and (w != 0).all() and w.std() > 0.2  # U(-0.5, 0.5): std 0.29
    ident = model(4, randomize=False).blocks[1].memory.conv_weight
    assert (ident[:, -1] == 1).all() and (ident[:, :-1] == 0).all()
    with pytest.raises(ConfigError, match="memory.conv_init"):
        MemoryConfig(conv=4, conv_init="zeros").validate()


def test_box_init_sums_the_last_k_tokens_whatever_their_lag():
    """memory.conv_init box: every query and key tap 1/sqrt(K), so a token's pre-head q/k are the sums of the last
    K tokens' projections over sqrt(K) (a token 3 back counts as much as the token itself, one K back not at all);
    values start at the identity."""
    cfg = config(4)
    torch.manual_seed(0)
    mem = MemSparseLM(ModelConfig(**{**cfg.__dict__, "memory": MemoryConfig(**{**cfg.memory.__dict__,
                                                                               "conv_init": "box"})})
                      ).blocks[1].memory
    qk = 2 * mem.heads * mem.head_dim
    assert torch.equal(mem.conv_weight[:qk], torch.full_like(mem.conv_weight[:qk], 0.5))
    x = torch.randn(1, 9, mem.dim)
    qkv = mem.to_qkv(x)
    conv, _ = causal_depthwise_conv(qkv, mem.conv_weight, None, None, 0)
    assert torch.allclose(conv[0, 8, :qk], qkv[0, 5:9, :qk].sum(0) / 2, atol=1e-5)
    assert torch.allclose(conv[0, 1, :qk], qkv[0, 0:2, :qk].sum(0) / 2, atol=1e-5)  # zeros before the first token
    assert torch.allclose(conv[0, :, qk:], qkv[0, :, qk:], atol=1e-6)  # values: the identity


def test_graph_state_round_trip_keeps_the_conv_state():
    from memsparse.cuda_graph import _flatten_layer, _unflatten_layer

    m = model()
    with torch.no_grad():
        _, st = m.stream(ids(21), m.init_state(2))
    ls = st.layers[1]
    assert ls.conv is not None and ls.conv.shape == (2, 3, 3 * 2 * 8)
    back = _unflatten_layer(*_flatten_layer(ls))
    assert back.conv is ls.conv and back.memory.step is ls.memory.step


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_conv_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="memory.conv"):
        MemoryConfig(conv=bad).validate()


def test_graphed_stream_equals_stream_with_conv():
    from memsparse.cuda_graph import GraphedStream

    m = model()
    x = ids(120, seed=7)
    gs = GraphedStream(m, graph=False)
    st, got, i = m.init_state(2), [], 0
    for n in (5, 27, 16, 16, 48, 8):  # mid-segment starts (eager) and aligned runs (the static steps)
        lg, st = gs(x[:, i:i + n], st)
        got.append(lg)
        i += n
    want, _ = m.stream(x, m.init_state(2))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-10, atol=1e-10)
    assert gs.replays >= 3
