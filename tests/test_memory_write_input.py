"""`memory.write_input: embeddings`: the memory's keys, values and write rates from the token embeddings, its
queries from its layer's input. The projection split, the first layer unchanged, a later layer's writes, activation
checkpointing, bad config (streaming = one-shot: tests/test_memory_conv.py)."""

from __future__ import annotations

import pytest
import torch

from memsparse.config import ConfigError, MemoryConfig, ModelConfig
from memsparse.memory import NeuralMemory
from memsparse.model import MemSparseLM

V = 50


def model(write_input="embeddings", layers=(1,), **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                      segment=16, window=32, persistent_tokens=8, budget="top_p:p=0.8,min=1",
                      memory_layers=list(layers), memory=MemoryConfig(heads=2, head_dim=8, chunk_size=8, conv=4,
                                                                      conv_init="random", write_input=write_input),
                      **kw)
    return MemSparseLM(cfg).double().eval()


def ids(n, seed=1, batch=2):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_queries_from_the_layer_keys_values_and_rates_from_the_source():
    torch.manual_seed(0)
    mem = NeuralMemory(24, MemoryConfig(heads=2, head_dim=8, conv=0)).double()
    x, e = torch.randn(2, 9, 24, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    split, from_x, from_e = mem.project_stream(x, src=e)[0], mem.project(x), mem.project(e)
    torch.testing.assert_close(split.q, from_x.q)
    for name in ("k", "v", "eta", "theta", "alpha"):
        torch.testing.assert_close(getattr(split, name), getattr(from_e, name))
    assert (split.k - from_x.k).abs().max() > 1e-3
    with pytest.raises(ValueError, match="src must have x's shape"):
        mem.project_stream(x, src=e[:, :5])


def test_first_layer_memory_is_unchanged():
    """In layer 0 the layer's input is the embeddings: the option changes nothing there."""
    a, b = model("embeddings", layers=(0,)), model("layer", layers=(0,))
    b.load_state_dict(a.state_dict())
    x = ids(70)
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


def test_later_layer_memory_writes_from_the_embeddings():
    """A layer-1 memory's writes then do not depend on layer 0: scaling layer 0's attention output changes the
    logits through the residual, but not the memory's written keys (compared through its state after a stream)."""
    m, ref = model("embeddings"), model("layer")
    ref.load_state_dict(m.state_dict())
    x = ids(96)
    with torch.no_grad():
        _, st = m.stream(x, m.init_state(2, total_length=96))
        _, st_ref = ref.stream(x, ref.init_state(2, total_length=96))
        for p in (m.blocks[0].wo.weight, ref.blocks[0].wo.weight):
            p.mul_(3.0)
        _, st2 = m.stream(x, m.init_state(2, total_length=96))
        _, st2_ref = ref.stream(x, ref.init_state(2, total_length=96))
    w, w2 = st.layers[1].memory.weights[0], st2.layers[1].memory.weights[0]
    torch.testing.assert_close(w, w2, rtol=0, atol=1e-12)
    assert (st_ref.layers[1].memory.weights[0] - st2_ref.layers[1].memory.weights[0]).abs().max() > 1e-4


def test_the_option_changes_a_later_layer_memory():
    """(Streaming = one-shot with the option: tests/test_memory_conv.py.)"""
    m, ref = model(), model("layer")
    ref.load_state_dict(m.state_dict())
    x = ids(130)
    with torch.no_grad():
        assert (m(x).logits - ref(x).logits).abs().max() > 1e-3


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    x = ids(64)
    losses, grads = [], []
    for ckpt in (False, True):
        m = model(activation_checkpointing=ckpt).train()
        loss = m(x, torch.roll(x, -1, 1), return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.embed.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_write_input_is_a_config_error():
    with pytest.raises(ConfigError, match="memory.write_input"):
        MemoryConfig(write_input="residual").validate()
