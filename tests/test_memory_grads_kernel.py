"""Triton per-token memory gradients (through TRITON_INTERPRET=1) against the PyTorch reference.

Forward outputs and the second-order backward (autograd through the reference) are compared; every kernel
output is poisoned with NaN first, so an element the kernels fail to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from memsparse.kernels import memory_grads_triton as tri  # noqa: E402
from memsparse.kernels.memory_grads import ENV_VAR, resolve_impl, token_gradients_mlp2  # noqa: E402

import memsparse.memory as M  # noqa: E402
from memsparse.config import MemoryConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    monkeypatch.delenv(ENV_VAR, raising=False)


def _inputs(B, H, C, D, F, gen):
    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=gen)).requires_grad_()

    k = torch.nn.functional.normalize(torch.randn(B, H, C, D, generator=gen), dim=-1).requires_grad_()
    return [k, r(B, H, C, D), r(B, H, D, F, scale=D ** -0.5), r(B, H, F, D, scale=F ** -0.5),
            (0.5 + torch.rand(H, D, generator=gen)).requires_grad_()]


def _run(ins, impl, gen_seed):
    acts, dzs, loss, gnorm = token_gradients_mlp2(*ins, impl=impl)
    outs = [acts[1], dzs[0], dzs[1], loss, gnorm]
    g = torch.Generator().manual_seed(gen_seed)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(total, ins)


@pytest.mark.parametrize("B,H,C,D,F", [(1, 2, 20, 16, 32), (2, 1, 70, 32, 80), (1, 1, 64, 16, 64)])
def test_kernels_equal_reference(B, H, C, D, F):
    """Partial token tiles (C % 64), hidden widths below and across the 64-column tile, two batch entries."""
    gen = torch.Generator().manual_seed(C + F)
    ins = _inputs(B, H, C, D, F, gen)
    out_r, grad_r = _run(ins, "reference", 1)
    out_t, grad_t = _run(ins, "triton", 1)
    for name, a, b in zip(["a1", "dz0", "dz1", "loss", "gnorm"], out_t, out_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for name, a, b in zip(["k", "v", "w0", "w1", "gain"], grad_t, grad_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_kernels_take_views():
    """Chunk views of longer inputs and batch-expanded weights (as the memory passes them), in both passes."""
    gen = torch.Generator().manual_seed(5)
    k, v, w0, w1, gain = _inputs(2, 2, 30, 16, 32, gen)
    ins = [k[:, :, 4:21], v[:, :, 4:21], w0[:1].expand(2, -1, -1, -1), w1[1:].expand(2, -1, -1, -1), gain]
    out_r, grad_r = _run(ins, "reference", 2)
    out_t, grad_t = _run(ins, "triton", 2)
    for a, b in zip(out_t + list(grad_t), out_r + list(grad_r)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_memory_write_through_kernels_equals_sequential(monkeypatch, kernel_checks):
    """The memory's chunked write (surprise-gated) on the kernels equals the token-by-token reference."""
    monkeypatch.setenv(ENV_VAR, "triton")
    torch.manual_seed(3)
    mem = M.NeuralMemory(32, MemoryConfig(heads=2, head_dim=16, depth=2, expansion=2, chunk_size=8))
    x = torch.randn(1, 19, 32)
    (s_k, g_k), (s_s, g_s) = (kernel_checks.memory_write(mem, x, impl) for impl in ("chunked", "sequential"))
    torch.testing.assert_close(s_k, s_s, rtol=1e-4, atol=1e-5)
    for n in g_s:
        torch.testing.assert_close(g_k[n], g_s[n], rtol=1e-3, atol=1e-5, msg=n)


def test_resolve_impl_and_errors(monkeypatch):
    k = torch.randn(1, 2, 8, 16)
    assert resolve_impl(k, 32, "silu") == "reference"              # CPU tensors: auto picks the reference
    assert resolve_impl(k, 32, "silu", "triton") == "triton"        # forced, through the interpreter
    assert resolve_impl(k, 32, "gelu") == "reference"
    with pytest.raises(ValueError, match="silu"):
        resolve_impl(k, 32, "gelu", "triton")
    with pytest.raises(ValueError, match="float64"):
        resolve_impl(k.double(), 32, "silu", "triton")
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl(k, 32, "silu", "fast")
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_impl(k, 32, "silu")
    with pytest.raises(ValueError, match="do not match"):
        token_gradients_mlp2(k, k, torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 16), torch.ones(2, 16))


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    fwd, bwd = tri._fwd_impl, tri._bwd_impl
    monkeypatch.setattr(tri, "_fwd_impl", lambda *a: calls.append("fwd") or fwd(*a))
    monkeypatch.setattr(tri, "_bwd_impl", lambda *a: calls.append("bwd") or bwd(*a))
    return calls


def test_model_training_step_on_kernels_equals_reference(monkeypatch, kernel_checks):
    """A training step of the whole model (evictions, surprise gate, a consolidation pass): loss and every
    parameter gradient are the same on the kernels and on the PyTorch path."""
    calls = _count_kernel_calls(monkeypatch)
    model = kernel_checks.tiny_model().train()
    ids = torch.randint(0, 50, (2, 160), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv(ENV_VAR, "reference")
    (l_r, g_r) = kernel_checks.model_step(model, ids)
    assert not calls
    monkeypatch.setenv(ENV_VAR, "triton")
    (l_t, g_t) = kernel_checks.model_step(model, ids)
    assert "fwd" in calls and "bwd" in calls
    torch.testing.assert_close(l_t, l_r, rtol=1e-5, atol=1e-6)
    assert set(g_t) == set(g_r) and any("memory" in n for n in g_r)
    for n in g_r:
        torch.testing.assert_close(g_t[n], g_r[n], rtol=1e-3, atol=1e-5, msg=n)


def test_stream_on_kernels_equals_one_shot(monkeypatch, kernel_checks):
    """Inference (no autograd: the hard surprise keep, consolidation) on the kernels: streaming in uneven
    pieces equals the one-shot forward, and both equal the PyTorch path."""
    monkeypatch.setenv(ENV_VAR, "triton")
    calls = _count_kernel_calls(monkeypatch)
    model = kernel_checks.tiny_model(hard_keep_fraction=0.5).eval()
    ids = torch.randint(0, 50, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(1, total_length=150)
        out, i = [], 0
        for n in (7, 33, 1, 60, 49):
            lg, state = model.stream(ids[:, i:i + n], state)
            out.append(lg)
            i += n
        torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-5)
        assert calls and "bwd" not in calls
        monkeypatch.setenv(ENV_VAR, "reference")
        torch.testing.assert_close(model(ids).logits, full, rtol=1e-4, atol=1e-4)
