"""Neural memory: chunk-parallel write == sequential reference, exact recurrence, memorise/gate/forget, state."""

import importlib

import pytest
import torch

import memsparse.memory as M
from memsparse.config import MemoryConfig
from memsparse.memory import MemoryState, NeuralMemory

# the module itself: `memsparse.kernels.update_coefficients_reference` as an attribute is the function of that name
UCR = importlib.import_module("memsparse.kernels.update_coefficients_reference")


def _mem(depth=2, heads=2, head_dim=8, chunk=4, dim=24, dtype=torch.float64, **kw):
    torch.manual_seed(1)
    cfg = MemoryConfig(heads=heads, head_dim=head_dim, depth=depth, expansion=2, chunk_size=chunk, **kw)
    return NeuralMemory(dim, cfg).to(dtype)


def _flat(state: MemoryState):
    return torch.cat([t.flatten() for t in state.weights + state.momentum])


@pytest.mark.parametrize("depth,heads,chunk,n", [(1, 1, 1, 5), (2, 2, 3, 11), (2, 3, 4, 11), (3, 2, 16, 13),
                                                 (2, 2, 5, 5)])
def test_chunked_equals_sequential_forward_and_grads(depth, heads, chunk, n):
    mem = _mem(depth=depth, heads=heads, chunk=chunk)
    x = torch.randn(2, n, 24, dtype=torch.float64)
    gates = torch.rand(2, n, dtype=torch.float64)

    def run(impl):
        mem.zero_grad()
        st = mem.init_state(2)
        st, _ = mem.write(st, mem.project(x), gates, impl=impl)
        y = mem.read(st, mem.project(x).q)
        (y.pow(2).sum() + _flat(st).sin().sum()).backward()
        grads = {k: p.grad.clone() for k, p in mem.named_parameters() if p.grad is not None}
        return _flat(st).detach(), y.detach(), grads

    s_c, y_c, g_c = run("chunked")
    s_s, y_s, g_s = run("sequential")
    torch.testing.assert_close(s_c, s_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_c, y_s, rtol=1e-10, atol=1e-10)
    assert set(g_c) == set(g_s)
    for k in g_c:
        torch.testing.assert_close(g_c[k], g_s[k], rtol=1e-8, atol=1e-10, msg=k)
    # learning to memorise: gradients reach the projections, the rate nets and the initial weights
    assert g_c["to_rates.weight"].abs().sum() > 0 and g_c["init_weights.0"].abs().sum() > 0


def test_chunked_equals_sequential_fp32():
    mem = _mem(chunk=8, dtype=torch.float32)
    x = torch.randn(2, 21, 24)
    a, _ = mem.write(mem.init_state(2), mem.project(x))
    b, _ = mem.write(mem.init_state(2), mem.project(x), impl="sequential")
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)


def test_chunk_size_one_is_the_exact_token_recurrence():
    """Independent oracle: per (b, h) torch.func gradients at the current weights, token by token."""
    mem = _mem(depth=2, heads=2, chunk=1)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    inp = mem.project(x)
    st, _ = mem.write(mem.init_state(2), inp, chunk_size=1)
    W = [w.detach().clone() for w in mem.init_state(2).weights]
    S = [torch.zeros_like(w) for w in W]
    gain = mem.gain.detach()
    for t in range(7):
        for b in range(2):
            for h in range(2):
                def loss(ws, b=b, h=h, t=t):
                    k = inp.k[b, h, t].detach()[None, None, None]
                    y = M.memory_forward([w[None, None] for w in ws], k, gain[h:h + 1], "silu")
                    return 0.5 * (y - inp.v[b, h, t].detach()).pow(2).sum()

                grads = torch.func.grad(loss)([w[b, h] for w in W])
                gn = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                clip = min(1.0, mem.config.max_grad_norm / (gn.item() + 1e-6))
                eta, th, al = (inp.eta[b, h, t].item(), inp.theta[b, h, t].item(), inp.alpha[b, h, t].item())
                for i in range(len(W)):
                    S[i][b, h] = eta * S[i][b, h] - th * clip * grads[i]
                    W[i][b, h] = (1 - al) * W[i][b, h] + S[i][b, h]
    for a, b in zip(st.weights + st.momentum, W + S):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-11)


def test_memorises_pairs():
    mem = _mem(depth=2, heads=2, chunk=16, lr_max=1.0, lr_init=0.5, forget_init=1e-4)
    inp = mem.project(torch.randn(1, 16, 24, dtype=torch.float64))
    st0 = mem.init_state(1)
    before = (mem.read(st0, inp.k) - inp.v).pow(2).sum()
    st = st0
    for _ in range(5):
        st, _ = mem.write(st, inp)
    after = (mem.read(st, inp.k) - inp.v).pow(2).sum()
    assert after < 0.5 * before


def test_gates_zero_leave_memory_unchanged():
    mem = _mem(chunk=4)
    st0 = mem.init_state(2)
    st0.momentum = [torch.randn_like(s) for s in st0.momentum]  # momentum must not leak in either
    st, _ = mem.write(st0, mem.project(torch.randn(2, 9, 24, dtype=torch.float64)), torch.zeros(2, 9))
    torch.testing.assert_close(_flat(st), _flat(st0), rtol=0, atol=0)


def test_extreme_rates_and_zero_gates_match_sequential():
    """Long chunk, momentum ~1e-3 and strong forgetting (P_s spans ~e^-200 inside a chunk) with some gates
    exactly zero: the log-space coefficients stay exact and finite, values and gradients."""
    mem = _mem(chunk=32, momentum_init=1e-3, forget_init=0.5)
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    gates = torch.rand(1, 40, dtype=torch.float64)
    gates[:, ::3] = 0

    def run(impl):
        mem.zero_grad()
        st, _ = mem.write(mem.init_state(1), mem.project(x), gates, impl=impl)
        (_flat(st).sin().sum()).backward()
        return _flat(st).detach(), {k: p.grad.clone() for k, p in mem.named_parameters() if p.grad is not None}

    (s_c, g_c), (s_s, g_s) = run("chunked"), run("sequential")
    torch.testing.assert_close(s_c, s_s, rtol=1e-10, atol=1e-10)
    for k in g_c:
        assert torch.isfinite(g_c[k]).all(), k
        torch.testing.assert_close(g_c[k], g_s[k], rtol=1e-8, atol=1e-10, msg=k)


@pytest.mark.parametrize("C,block", [(150, 16), (64, 64), (7, 16), (96, 32)])
def test_decayed_suffix_sums_equal_the_naive_sum(C, block):
    """Blocked suffix sums == the O(C^2) definition, with decays spanning e^-300 and zero weights; gradients too."""
    g = torch.Generator().manual_seed(C)
    w = torch.rand(2, 3, C, generator=g, dtype=torch.float64)
    w[..., ::5] = 0
    log_eta = torch.log(torch.rand(2, 3, C, generator=g, dtype=torch.float64).clamp_min(1e-3))
    log_eta[0, 0] = -0.01                                               # slow decay in one row
    log_p = torch.cumsum(log_eta, -1).requires_grad_()
    w.requires_grad_()
    diff = log_p.unsqueeze(-2) - log_p.unsqueeze(-1)                    # [t, s] = log_p_s - log_p_t
    causal = torch.ones(C, C, dtype=torch.bool).triu()
    naive = (torch.exp(torch.where(causal, diff, -torch.inf)) * w.unsqueeze(-2)).sum(-1)
    got = UCR.decayed_suffix_sums(w, log_p, block=block)
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-300)
    probe = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * probe).sum(), (w, log_p))
    g_naive = torch.autograd.grad((naive * probe).sum(), (w, log_p))
    for a, b in zip(g_got, g_naive):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decayed_suffix_sums_stay_finite_in_float32_under_fast_decay():
    """float32, as the model trains: decays down to e^-100 inside the first block (retention 0.1-0.3 per token).
    Every exponent must be <= 0; the first block's carry once reached e^+88 (inf) and made every sum NaN (a GPU
    run diverged at step ~730 with it)."""
    g = torch.Generator().manual_seed(0)
    C = 512
    w = torch.rand(2, 3, C, generator=g, dtype=torch.float64)
    log_p = torch.cumsum(torch.log(0.1 + 0.2 * torch.rand(2, 3, C, generator=g, dtype=torch.float64)), -1)
    diff = log_p.unsqueeze(-2) - log_p.unsqueeze(-1)
    causal = torch.ones(C, C, dtype=torch.bool).triu()
    naive = (torch.exp(torch.where(causal, diff, -torch.inf)) * w.unsqueeze(-2)).sum(-1)
    w32, lp32 = w.float().requires_grad_(), log_p.float().requires_grad_()
    got = UCR.decayed_suffix_sums(w32, lp32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), naive, rtol=2e-4, atol=1e-6)  # fp32 cumulative logs
    for grad in torch.autograd.grad(got.sum(), (w32, lp32)):
        assert torch.isfinite(grad).all()


def test_float32_write_with_low_momentum_retention_stays_finite():
    """A float32 chunk of 512 with momentum retention ~0.1 (the products span e^-1000): weights, momentum and
    gradients finite, and equal to the float64 write."""
    mem = _mem(chunk=512, momentum_init=0.1, dtype=torch.float32)
    x = torch.randn(1, 512, 24)
    gates = 0.9 + 0.1 * torch.rand(1, 512)  # open gates: the effective retention stays near 0.1
    st, _ = mem.write(mem.init_state(1), mem.project(x), gates)
    _flat(st).square().sum().backward()
    assert torch.isfinite(_flat(st)).all()
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters() if p.grad is not None)
    mem64 = _mem(chunk=512, momentum_init=0.1)
    ref, _ = mem64.write(mem64.init_state(1), mem64.project(x.double()), gates.double())
    torch.testing.assert_close(_flat(st).double(), _flat(ref), rtol=1e-3, atol=1e-4)


def test_chunked_equals_sequential_across_suffix_blocks(monkeypatch):
    """Chunks longer than the suffix-sum block (the cross-block path) still equal the sequential reference."""
    calls = []

    def blocked(w, log_p):  # the module the coefficients call it from (patching memsparse.memory reached nothing)
        calls.append(w.shape[-1])
        return decayed(w, log_p, block=4)

    decayed = UCR.decayed_suffix_sums
    monkeypatch.setattr(UCR, "decayed_suffix_sums", blocked)
    mem = _mem(chunk=16, momentum_init=0.05)
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    gates = torch.rand(2, 37, dtype=torch.float64)
    a, _ = mem.write(mem.init_state(2), mem.project(x), gates)
    assert max(calls) == 16  # chunks of 16 through blocks of 4: the cross-block path ran
    b, _ = mem.write(mem.init_state(2), mem.project(x), gates, impl="sequential")
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-10, atol=1e-10)


def test_forgetting_one_forgets():
    mem = _mem(chunk=4)
    inp = mem.project(torch.randn(2, 6, 24, dtype=torch.float64))
    st0 = mem.init_state(2)
    ones, zeros = torch.ones_like(inp.alpha), torch.zeros_like(inp.theta)
    st, _ = M.write_chunked(st0, inp.k, inp.v, inp.eta, zeros, ones, gain=mem.gain, chunk_size=4)
    assert max(w.abs().max().item() for w in st.weights) < 1e-9  # nothing of M_0 is left
    q = inp.q
    torch.testing.assert_close(mem.read(st, q), q + 0 * q, atol=1e-6, rtol=0)  # M(x) = x + LN(0) = x


def test_split_calls_equal_one_call():
    mem = _mem(chunk=4)
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    inp = mem.project(x)
    one, _ = mem.write(mem.init_state(2), inp)
    half, _ = mem.write(mem.init_state(2), inp.slice(slice(0, 8)))
    two, _ = mem.write(half, inp.slice(slice(8, 16)))
    torch.testing.assert_close(_flat(one), _flat(two), rtol=1e-12, atol=1e-12)
    assert int(two.step[0]) == 16
    # and the layer view: chunk-wise read-then-write over one call == two calls with carried state
    y1, s1 = mem(x)
    ya, sa = mem(x[:, :8])
    yb, sb = mem(x[:, 8:], sa)
    torch.testing.assert_close(y1, torch.cat([ya, yb], 1))


def test_partial_chunk_is_written():
    mem = _mem(chunk=64)
    st0 = mem.init_state(1)
    st, stats = mem.write(st0, mem.project(torch.randn(1, 5, 24, dtype=torch.float64)))
    assert (_flat(st) - _flat(st0)).abs().max() > 0
    assert stats.loss.shape == (1, 2, 5)


def test_surprise_drops_after_writing():
    mem = _mem(chunk=8, lr_max=1.0, lr_init=0.5)
    inp = mem.project(torch.randn(1, 8, 24, dtype=torch.float64))
    st = mem.init_state(1)
    s0 = mem.surprise(st, inp)
    for _ in range(4):
        st, _ = mem.write(st, inp)
    s1 = mem.surprise(st, inp)
    assert s1.loss.mean() < s0.loss.mean() and s1.grad_norm.mean() < s0.grad_norm.mean()


def test_long_stream_stays_finite_fp32():
    mem = _mem(chunk=64, dtype=torch.float32, lr_max=1.0, lr_init=0.9, forget_init=1e-5)
    x = 5 * torch.randn(1, 2048, 24)
    y, st = mem(x)
    assert torch.isfinite(y).all() and torch.isfinite(_flat(st)).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters())


def test_state_roundtrip(tmp_path):
    mem = _mem(chunk=4)
    st, _ = mem.write(mem.init_state(2), mem.project(torch.randn(2, 5, 24, dtype=torch.float64)))
    path = tmp_path / "state.pt"
    torch.save(st.detach().state_dict(), path)
    back = MemoryState.from_state_dict(torch.load(path))
    torch.testing.assert_close(_flat(back), _flat(st.detach()))
    c = st.clone()
    c.weights[0].add_(1.0)
    assert not torch.equal(c.weights[0], st.weights[0])
    assert st.detach().to("cpu").weights[0].requires_grad is False


def test_bad_input_errors():
    mem = _mem(chunk=4)
    inp = mem.project(torch.randn(2, 5, 24, dtype=torch.float64))
    st = mem.init_state(2)
    with pytest.raises(ValueError, match="chunk_size"):
        mem.write(st, inp, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mem(torch.randn(2, 5, 24, dtype=torch.float64), chunk_size=-3)
    with pytest.raises(ValueError, match="dtypes differ"):
        M.write_chunked(st, inp.k, inp.v.float(), inp.eta, inp.theta, inp.alpha, gain=mem.gain, chunk_size=4)
    with pytest.raises(ValueError, match="v must have"):
        M.write_chunked(st, inp.k, inp.v[:, :, :3], inp.eta, inp.theta, inp.alpha, gain=mem.gain, chunk_size=4)
    with pytest.raises(ValueError, match="memory state"):
        mem.write(mem.init_state(3), inp)
    with pytest.raises(ValueError, match="gates"):
        mem.write(st, inp, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, N, dim=24\)"):
        mem.project(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="memory.depth"):
        MemoryConfig(depth=0).validate()


def test_surprise_gate_fn_chunked_equals_sequential():
    mem = _mem(chunk=4)
    inp = mem.project(torch.randn(2, 10, 24, dtype=torch.float64))

    def gate_fn(stats):
        return torch.sigmoid(3 * torch.log(stats.grad_norm) + stats.loss)

    a, _ = mem.write(mem.init_state(2), inp, gate_fn=gate_fn)
    b, _ = mem.write(mem.init_state(2), inp, gate_fn=gate_fn, impl="sequential")
    c, _ = mem.write(mem.init_state(2), inp)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-10, atol=1e-10)
    assert (_flat(a) - _flat(c)).abs().max() > 1e-6


@pytest.mark.slow
def test_compiled_chunk_step_equals_eager():
    mem = _mem(chunk=8, dtype=torch.float32)
    inp = mem.project(torch.randn(2, 16, 24))
    a, sa = M.write_chunked(mem.init_state(2), inp.k, inp.v, inp.eta, inp.theta, inp.alpha, gain=mem.gain,
                            chunk_size=8, gate_fn=lambda s: torch.sigmoid(s.grad_norm))
    b, sb = M.write_chunked(mem.init_state(2), inp.k, inp.v, inp.eta, inp.theta, inp.alpha, gain=mem.gain,
                            chunk_size=8, gate_fn=lambda s: torch.sigmoid(s.grad_norm), compiled=True)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-5, atol=1e-6)
    scale, bias = (p.float().detach() for p in _gate_params(2))
    c, sc = M.write_chunked(mem.init_state(2), inp.k, inp.v, inp.eta, inp.theta, inp.alpha, gain=mem.gain,
                            chunk_size=8, gate_params=(scale, bias))
    d, sd = M.write_chunked(mem.init_state(2), inp.k, inp.v, inp.eta, inp.theta, inp.alpha, gain=mem.gain,
                            chunk_size=8, gate_params=(scale, bias), compiled=True)
    torch.testing.assert_close(_flat(c), _flat(d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sc.gate, sd.gate, rtol=1e-5, atol=1e-6)


def _gate_params(heads, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(heads, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(heads, generator=g, dtype=dtype)
    return scale.requires_grad_(True), bias.requires_grad_(True)


def test_fused_soft_gate_step_equals_gate_fn_and_sequential():
    """gate_params (the soft gate fused into one chunk step) == the same gate as gate_fn == the token loop,
    in state, stats and gradients (to the inputs and to the gate's own parameters)."""
    mem = _mem(chunk=4)
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    gates = torch.rand(2, 10, dtype=torch.float64)
    scale, bias = _gate_params(2)

    def run(**kw):
        mem.zero_grad()
        scale.grad = bias.grad = None
        impl = kw.pop("impl", "chunked")
        st, ws = mem.write(mem.init_state(2), mem.project(x), gates, impl=impl, **kw)
        _flat(st).sin().sum().backward()
        return _flat(st).detach(), ws, mem.to_qkv.weight.grad.clone(), scale.grad.clone(), bias.grad.clone()

    fused = run(gate_params=(scale, bias))
    by_fn = run(gate_fn=lambda s: M.soft_gate(s.grad_norm, scale, bias))
    seq = run(gate_params=(scale, bias), impl="sequential")
    for other in (by_fn, seq):
        for a, b in zip((fused[0], *fused[2:]), (other[0], *other[2:])):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    ws, ws_fn = fused[1], by_fn[1]
    assert ws.gate.shape == (2, 2, 10) and ws.gate.min() > 0 and ws.gate.max() < 1
    torch.testing.assert_close(ws.gate, ws_fn.gate)
    torch.testing.assert_close(ws.gate, M.soft_gate(ws.grad_norm, scale, bias))
    # the gate changes the write
    plain, _ = mem.write(mem.init_state(2), mem.project(x), gates)
    assert (_flat(plain) - fused[0]).abs().max() > 1e-6


def test_gate_fn_and_gate_params_together_is_an_error():
    mem = _mem()
    inp = mem.project(torch.randn(1, 4, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate_fn or gate_params"):
        mem.write(mem.init_state(1), inp, gate_fn=lambda s: s.grad_norm, gate_params=_gate_params(2))


@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 4, 4, 2], [5]])
def test_read_segments_equals_reads_one_by_one(lengths):
    """Pieces of equal length are read in one batched call; values and gradients equal one read per piece."""
    mem = _mem(chunk=4)
    x = torch.randn(2, sum(lengths), 24, dtype=torch.float64)
    inp = mem.project(x)
    states, st = [], mem.init_state(2)
    for c0 in range(0, sum(lengths), 4):  # a different state per piece
        states.append(st)
        st, _ = mem.write(st, inp.slice(slice(c0, c0 + 4)))
    states = (states * 4)[:len(lengths)]
    qs = list(inp.q.split(lengths, dim=2))

    def run(batched):
        mem.zero_grad()
        y = mem.read_segments(states, qs) if batched else torch.cat([mem.read(s, q) for s, q in zip(states, qs)], 2)
        y.pow(2).sum().backward(retain_graph=True)
        return y.detach(), {k: p.grad.clone() for k, p in mem.named_parameters() if p.grad is not None}

    y_b, g_b = run(True)
    y_1, g_1 = run(False)
    torch.testing.assert_close(y_b, y_1, rtol=1e-12, atol=1e-12)
    assert g_b.keys() == g_1.keys() and g_b
    for k in g_b:
        torch.testing.assert_close(g_b[k], g_1[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=f"{len(states)} states for {len(qs) + 1} query pieces"):
        mem.read_segments(states, qs + qs[:1])
    y = mem.read_segments(states, qs)
    torch.testing.assert_close(mem.read_out(states, qs), mem.merge_heads(y), rtol=0, atol=0)


def _pieces_and_states(lengths):
    """(memory, its projected inputs of 2 x sum(lengths) tokens, one state per query piece: the states after
    0, 1, 2, ... writes of 4-token chunks, cycled)."""
    mem = _mem(chunk=4).float()
    inp = mem.project(torch.randn(2, sum(lengths), 24))
    states, st = [], mem.init_state(2)
    for c0 in range(0, sum(lengths), 4):
        states.append(st)
        st, _ = mem.write(st, inp.slice(slice(c0, c0 + 4)))
    return mem, inp, (states * 4)[:len(lengths)]


@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 4, 4, 2], [5]])
def test_read_out_is_the_merged_projection_of_the_reads(lengths):
    """read_out (one copy between the reads and the output projection) = merge_heads(read_segments): values and
    gradients, in fp32 and under bf16 autocast."""
    mem, inp, states = _pieces_and_states(lengths)
    qs = [q.detach().requires_grad_() for q in inp.q.split(lengths, dim=2)]
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            got, ref = mem.read_out(states, qs), mem.merge_heads(mem.read_segments(states, qs))
        assert got.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        w = torch.randn(got.shape)
        g_got = torch.autograd.grad((got.float() * w).sum(), qs)
        g_ref = torch.autograd.grad((ref.float() * w).sum(), qs)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 4, 4, 2], [5]])
def test_read_out_with_init_mask_equals_the_selected_reads(lengths):
    """read_out with init_mask (packed documents; with equal pieces the initial memory is read in the pieces'
    batched call and selected in its layout, the initial weights and the whole queries optionally given) =
    merge_heads(where(mask, read of the initial state, the segment reads)): values exactly; gradients of the
    queries and the states exactly, of the parameters to rounding (the initial weights' gradient is summed in
    another order)."""
    mem, inp, states = _pieces_and_states(lengths)
    q_all = inp.q.detach().requires_grad_()
    qs = list(q_all.split(lengths, dim=2))
    mask = torch.rand(2, sum(lengths), generator=torch.Generator().manual_seed(0)) < 0.4
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y0 = mem.read(mem.init_state(2), torch.cat(qs, 2))
            ref = mem.merge_heads(torch.where(mask[:, None, :, None], y0, mem.read_segments(states, qs)))
            gots = [mem.read_out(states, qs, init_mask=mask),
                    mem.read_out(states, qs, init_mask=mask, init_weights=mem.initial_weights(2), all_queries=q_all)]
        w = torch.randn(ref.shape)
        wrt = [q_all, *states[-1].weights, *mem.parameters()]
        g_ref = torch.autograd.grad((ref.float() * w).sum(), wrt, allow_unused=True, retain_graph=True)
        for got in gots:
            assert got.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            g_got = torch.autograd.grad((got.float() * w).sum(), wrt, allow_unused=True, retain_graph=True)
            for i, (a, b) in enumerate(zip(g_got, g_ref)):
                assert (a is None) == (b is None)
                if a is not None:
                    tol = 0 if i < 3 else 1e-6
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("gate", ["params", "fn", "none", "sequential"])
def test_write_with_reset_equals_reset_then_write(gate):
    """write(..., reset=rows) (packed documents: the rows' weights back at the initial weights inside the first
    chunk's step, their momentum zeroed through the update's two (B, H) momentum factors) == replacing those rows'
    weights and momentum first, then writing: the state exactly, gradients to rounding, over several chunks (the
    reset acts on the first only), with gates 0 before the boundary; the step counter counts on (the caller's)."""
    mem = _mem(chunk=4)
    x = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
    gates = torch.ones(2, 10, dtype=torch.float64)
    gates[0, :3] = 0.0
    scale, bias = _gate_params(2)
    kw = {"params": {"gate_params": (scale, bias)}, "none": {}, "sequential": {"impl": "sequential"},
          "fn": {"gate_fn": lambda s: M.soft_gate(s.grad_norm, scale, bias)}}[gate]
    reset = torch.tensor([True, False])
    prior, _ = mem.write(mem.init_state(2), mem.project(torch.randn(2, 6, 24, dtype=torch.float64)))
    prior.step = torch.tensor([6, 9])
    r4 = reset[:, None, None, None]
    manual = MemoryState([torch.where(r4, w0, w) for w0, w in zip(mem.initial_weights(2), prior.weights)],
                         [torch.where(r4, 0.0, m) for m in prior.momentum], prior.step)
    wrt = [x, scale, bias, *mem.parameters()]

    def run(state, **extra):
        st, _ = mem.write(state, mem.project(x), gates, **kw, **extra)
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).sum()
                   for t in st.weights + st.momentum)
        return st, torch.autograd.grad(loss, wrt, allow_unused=True, retain_graph=True)

    want, g_want = run(manual)
    for extra in ({}, {"init_weights": mem.initial_weights(2)}):
        got, g_got = run(prior, reset=reset, **extra)
        torch.testing.assert_close(_flat(got), _flat(want), rtol=0, atol=0)
        assert torch.equal(got.step, prior.step + 10)
        for a, b in zip(g_got, g_want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    plain, _ = run(prior)
    rows = [torch.cat([t.flatten(1) for t in s.weights + s.momentum], 1) for s in (plain, want)]
    assert (rows[0][0] - rows[1][0]).abs().max() > 1e-3  # the reset matters in row 0, and only there
    torch.testing.assert_close(rows[0][1], rows[1][1], rtol=0, atol=0)
