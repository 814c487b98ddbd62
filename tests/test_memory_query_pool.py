"""`memory.query_pool`: the memory's queries pick among the last `conv` tokens by a learned content score. The
function against a naive loop, the pick by content whatever the lag, streaming = one-shot, packed documents kept
apart, gradients, bad config."""

from __future__ import annotations

import pytest
import torch

from memsparse.config import ConfigError, MemoryConfig, ModelConfig
from memsparse.memory import causal_softmax_pool
from memsparse.model import MemSparseLM

V = 50


def naive_pool(x, score, lag_bias, prev):
    B, N, C = x.shape
    H, K = lag_bias.shape
    D = C // H
    ext = torch.cat([prev, x], 1)
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(N):
            for h in range(H):
                taps = [ext[b, K - 1 + t - j, h * D:(h + 1) * D] for j in range(K)]
                s = torch.stack([score[h] @ v + lag_bias[h, j] for j, v in enumerate(taps)])
                w = torch.softmax(s, 0)
                y[b, t, h * D:(h + 1) * D] = sum(w[j] * taps[j] for j in range(K))
    return y


def test_pool_equals_the_naive_loop_and_carries_its_state():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    score = torch.randn(2, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 4, generator=g, dtype=torch.float64)
    want = naive_pool(x, score, bias, torch.zeros(2, 3, 6, dtype=torch.float64))
    torch.testing.assert_close(causal_softmax_pool(x, score, bias), want, rtol=1e-12, atol=1e-12)
    # in two spans, the second with the first's last K-1 tokens as its state
    a = causal_softmax_pool(x[:, :4], score, bias)
    b = causal_softmax_pool(x[:, 4:], score, bias, prev=x[:, 1:4], pos=4)
    torch.testing.assert_close(torch.cat([a, b], 1), want, rtol=1e-12, atol=1e-12)


def test_a_sharp_score_picks_the_marked_token_whatever_its_lag():
    """One head, a score aligned with a marker direction: the output is the marked token's vector at lags 0-5."""
    D, K, N = 4, 6, 12
    for lag in range(K):
        x = torch.zeros(1, N, D, dtype=torch.float64)
        x[0, :, 1] = 1.0                       # every token: direction 1
        t_mark = N - 1 - lag
        x[0, t_mark] = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64)  # the marked token: direction 0
        score = torch.tensor([[50.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        y = causal_softmax_pool(x, score, torch.zeros(1, K, dtype=torch.float64))
        torch.testing.assert_close(y[0, -1], x[0, t_mark], rtol=0, atol=1e-9)


def config(query_pool=True, conv=4):
    return ModelConfig(vocab_size=V, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                       segment=16, window=32, persistent_tokens=8, budget="top_p:p=0.8,min=1", memory_layers=[0],
                       memory=MemoryConfig(heads=2, head_dim=8, chunk_size=8, conv=conv, conv_init="random",
                                           query_pool=query_pool))


def model(query_pool=True):
    torch.manual_seed(0)
    m = MemSparseLM(config(query_pool)).double().eval()
    if query_pool:  # away from the mean start, so the scores matter
        mem = m.blocks[0].memory
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            mem.pool_score.copy_(torch.randn(mem.pool_score.shape, generator=g, dtype=torch.float64) * 3)
            mem.pool_lag_bias.copy_(torch.randn(mem.pool_lag_bias.shape, generator=g, dtype=torch.float64))
    return m


def ids(n, seed=1, batch=2):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_stream_equals_one_shot_with_the_pool():
    m = model()
    x = ids(110)
    with torch.no_grad():
        full = m(x).logits
        state, out, i = m.init_state(2, total_length=110), [], 0
        for n in (1, 3, 16, 2, 40, 48):
            lg, state = m.stream(x[:, i:i + n], state)
            out.append(lg)
            i += n
        torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)
        assert (full - model(query_pool=False)(x).logits).abs().max() > 1e-3  # the pool changes the model


def test_other_documents_do_not_reach_through_the_pool():
    m = model()
    x = ids(90, seed=5, batch=1)
    docs = torch.zeros_like(x)
    docs[:, 37:] = 1
    y = x.clone()
    y[:, 33:37] = (x[:, 33:37] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(m(x, doc_ids=docs).logits[:, 37:], m(y, doc_ids=docs).logits[:, 37:],
                                   rtol=0, atol=1e-10)


def test_the_score_and_the_lag_bias_learn():
    m = model().train()
    x = ids(64)
    m(x, torch.roll(x, -1, 1), return_logits=False).loss.backward()
    mem = m.blocks[0].memory
    assert mem.pool_score.grad.abs().sum() > 0 and mem.pool_lag_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("conv", [0, 1])
def test_the_pool_needs_a_convolution_of_two_taps_or_more(conv):
    with pytest.raises(ConfigError, match="memory.query_pool"):
        MemoryConfig(conv=conv, query_pool=True).validate()
