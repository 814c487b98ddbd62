"""Triton chunk-update coefficients (through TRITON_INTERPRET=1) against the PyTorch reference.

Values and hand-derived gradients are compared; every kernel output is poisoned with NaN first, so an element
the kernels fail to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from memsparse.kernels import update_coefficients_triton as tri  # noqa: E402
from memsparse.kernels.update_coefficients import ENV_VAR, resolve_impl, update_coefficients  # noqa: E402

import memsparse.memory as M  # noqa: E402
from memsparse.config import MemoryConfig  # noqa: E402

NAMES = ["c", "d", "gamma", "beta_c", "p_c"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    monkeypatch.delenv(ENV_VAR, raising=False)


def _inputs(B, H, C, gen, gated=True, extreme=False):
    def leaf(t):
        return t.requires_grad_()

    gn = 3 * torch.rand(B, H, C, generator=gen)                    # the clip (max norm 1) binds for most tokens
    eta = 0.5 + 0.5 * torch.rand(B, H, C, generator=gen)
    theta = 0.1 * torch.rand(B, H, C, generator=gen)
    alpha = 0.1 * torch.rand(B, H, C, generator=gen)
    g = torch.rand(B, H, C, generator=gen) if gated else None
    if extreme:  # decays to the log floor, full forgetting, exact-zero gates
        eta[..., ::5] = 1e-20
        alpha[..., 1::7] = 1.0
        g[..., 2::3] = 0.0
    return [leaf(gn), leaf(eta), leaf(theta), leaf(alpha), None if g is None else leaf(g)]


def _run(ins, impl, seed, used=range(5)):
    outs = update_coefficients(*ins, 1.0, impl=impl)
    g = torch.Generator().manual_seed(seed)
    total = sum((outs[i] * torch.randn(outs[i].shape, generator=g)).sum() for i in used)
    leaves = [t for t in ins if t is not None]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)  # d and P_C do not depend on alpha
    return [o.detach() for o in outs], [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _compare(ins, seed, used=range(5)):
    out_r, grad_r = _run(ins, "reference", seed, used)
    out_t, grad_t = _run(ins, "triton", seed, used)
    for name, a, b in zip(NAMES, out_t, out_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(grad_t, grad_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("C", [512, 100, 64, 7, 1])
@pytest.mark.parametrize("gated", [True, False])
def test_kernels_equal_reference(C, gated):
    """Whole and partial 64-token blocks, one to eight of them, with and without gates."""
    _compare(_inputs(2, 3, C, torch.Generator().manual_seed(C), gated), seed=C)


def test_extreme_rates_and_partial_upstream_gradients():
    """Decays at the log floor, alpha = 1, zero gates; gradients from some outputs only (the others None)."""
    ins = _inputs(1, 2, 150, torch.Generator().manual_seed(7), extreme=True)
    _compare(ins, seed=3)
    _compare(ins, seed=4, used=[0])       # only c
    _compare(ins, seed=5, used=[1, 4])    # d and P_C


def test_fast_decay_stays_finite():
    """Momentum retention 0.1-0.3 over a 512 chunk, no gates (products down to e^-900 in float32): both paths
    finite and equal (the reference's first-block carry once overflowed to inf here, then NaN)."""
    gen = torch.Generator().manual_seed(11)
    gn, _, theta, alpha, _ = _inputs(1, 2, 512, gen, gated=False)
    eta = (0.1 + 0.2 * torch.rand(1, 2, 512, generator=gen)).requires_grad_()
    ins = [gn, eta, theta, alpha, None]
    out_r, grad_r = _run(ins, "reference", 2)
    assert all(torch.isfinite(t).all() for t in out_r + grad_r)
    _compare(ins, seed=2)


def test_kernels_take_views():
    """Chunk slices of longer rate tensors and head-expanded gates, as the memory passes them."""
    gen = torch.Generator().manual_seed(9)
    gn, eta, theta, alpha, _ = _inputs(2, 3, 90, gen)
    gates = torch.rand(2, 1, 90, generator=gen).requires_grad_()
    sl = slice(13, 77)
    ins = [gn[..., sl], eta[..., sl], theta[..., sl], alpha[..., sl], gates.expand(2, 3, 90)[..., sl]]
    out_r, grad_r = _run(ins, "reference", 1)
    out_t, grad_t = _run(ins, "triton", 1)
    for a, b in zip(out_t + list(grad_t), out_r + list(grad_r)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_memory_write_on_coefficient_kernels_equals_sequential(monkeypatch, kernel_checks):
    """The memory's chunked write (surprise-gated, three chunks, the last partial) with the coefficients from
    the kernels equals the token-by-token reference: state and parameter gradients."""
    monkeypatch.setenv(ENV_VAR, "triton")
    calls = []
    fwd = tri._fwd_impl
    monkeypatch.setattr(tri, "_fwd_impl", lambda *a: calls.append("fwd") or fwd(*a))
    torch.manual_seed(3)
    mem = M.NeuralMemory(32, MemoryConfig(heads=2, head_dim=16, depth=2, expansion=2, chunk_size=8))
    x = torch.randn(1, 19, 32)
    (s_k, g_k), (s_s, g_s) = (kernel_checks.memory_write(mem, x, impl) for impl in ("chunked", "sequential"))
    assert calls.count("fwd") == 3
    torch.testing.assert_close(s_k, s_s, rtol=1e-4, atol=1e-5)
    for n in g_s:
        torch.testing.assert_close(g_k[n], g_s[n], rtol=1e-3, atol=1e-5, msg=n)


def test_resolve_impl_and_errors(monkeypatch):
    gn = torch.rand(1, 2, 8)
    assert resolve_impl(gn) == "reference"               # opt-in: auto keeps the reference
    assert resolve_impl(gn, "triton") == "triton"         # through the interpreter
    with pytest.raises(ValueError, match="float64"):
        resolve_impl(gn.double(), "triton")
    monkeypatch.setattr(tri, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="not on CUDA"):
        resolve_impl(gn, "triton")
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl(gn, "fast")
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_impl(gn)
    monkeypatch.setenv(ENV_VAR, "reference")
    with pytest.raises(ValueError, match="share one"):
        update_coefficients(gn, gn, gn, gn[..., :4], None, 1.0)


def test_model_training_step_on_coefficient_kernels_equals_reference(monkeypatch, kernel_checks):
    """A whole-model training step (evictions, learned surprise gate, a consolidation pass) with the update
    coefficients from the kernels: the same loss and parameter gradients as on the PyTorch path."""
    model = kernel_checks.tiny_model().train()
    ids = torch.randint(0, 50, (2, 160), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv(ENV_VAR, "reference")
    (l_r, g_r) = kernel_checks.model_step(model, ids)
    monkeypatch.setenv(ENV_VAR, "triton")
    (l_t, g_t) = kernel_checks.model_step(model, ids)
    torch.testing.assert_close(l_t, l_r, rtol=1e-5, atol=1e-6)
    assert set(g_t) == set(g_r) and any("memory" in n for n in g_r)
    for n in g_r:
        torch.testing.assert_close(g_t[n], g_r[n], rtol=1e-3, atol=1e-5, msg=n)
