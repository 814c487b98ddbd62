"""Triton kernels: per-token gradients of a depth-2 memory MLP (forward) and their backward.

The memory's chunk step (memsparse.memory) takes, for every token t of a chunk, the gradient of
l_t = 1/2 ||M(k_t) - v_t||^2 at the chunk-start fast weights, as outer-product factors (Titans sec. 3.2):
    z0 = k W0, a1 = silu(z0), z1 = a1 W1, n = LN(z1), y = k + n * gain, dy = y - v
    dz1 = rstd (dn - mean(dn) - n mean(dn n)) with dn = dy * gain,  dz0 = (dz1 W1^T) * silu'(z0)
    grad_W0 l_t = k_t^T dz0_t,  grad_W1 l_t = a1_t^T dz1_t,  gnorm_t = sqrt(|k|^2 |dz0|^2 + |a1|^2 |dz1|^2)
Every token is independent given the weights, so one program owns a tile of tokens of one (batch, head) and
walks the hidden width in tiles: the MLP forward, the LayerNorm and its backward, and the hidden-layer
backward stay on chip (torch runs this as ~10 kernels and 3 batched matmuls, each latency-bound at the
model's sizes). The backward kernel is the hand-derived gradient of those outputs (a second-order pass:
the chunk update is differentiated through them), token-local again; the two weight gradients, sums over
tokens, are left to two batched matmuls. Reference: `memory_grads_reference.token_gradients_mlp2_reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_attention_triton import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

LN_EPS = 1e-5
# Tiles and launch chosen by timing five configurations at the model's shape on the H100 (32 tokens x 64 hidden
# columns, 4 warps, 1 stage was fastest; 64-token tiles launch too few programs). One stage: the loops' fp32
# tiles pipelined over 3 stages need 256 KB of shared memory (the H100 has 227 KB).
BLOCK_T = 32   # tokens per program
BLOCK_F = 64   # hidden columns per inner step
LAUNCH = dict(num_warps=4, num_stages=1)
POISON_OUTPUTS = False  # tests: fill every kernel output with NaN before the launch (an unwritten element shows)


def unsupported_reason(k: Tensor, hidden: int, activation: str) -> str | None:
    """Why the kernels cannot run these inputs (None when they can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if activation != "silu":
        return f"activation {activation!r} (the kernels do silu)"
    D = k.shape[-1]
    if D not in (16, 32, 64, 128) or hidden % 16 or hidden < 16:
        return f"head_dim {D} / hidden {hidden} (need head_dim in 16..128, a power of two, hidden a multiple of 16)"
    if k.dtype != torch.float32:
        return f"dtype {k.dtype} (the memory runs in fp32)"
    if not k.is_cuda and not interpreting():
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    return None


if HAS_TRITON:

    @triton.jit
    def _silu_parts(z):
        s = tl.sigmoid(z)
        return z * s, s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))   # silu, silu', silu''

    @triton.jit
    def _fwd_kernel(K, V, W0, W1, GAIN, A1, DZ0, DZ1, NRM, RSTD, LOSS, GN, A1SQ, DZ0SQ,
                    C, H, F,
                    EPS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        t0 = tl.program_id(1) * BT
        rt = t0 + tl.arange(0, BT)
        rd = tl.arange(0, D)
        rf = tl.arange(0, BF)
        tm = rt < C
        row = bh * C + rt
        k = tl.load(K + row[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0)
        v = tl.load(V + row[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0)
        gain = tl.load(GAIN + (bh % H) * D + rd)
        w0_base = W0 + bh * D * F
        w1_base = W1 + bh * F * D
        z1 = tl.zeros((BT, D), dtype=tl.float32)
        for f0 in range(0, F, BF):
            fm = (f0 + rf) < F
            w0 = tl.load(w0_base + rd[:, None] * F + (f0 + rf)[None, :], mask=fm[None, :], other=0.0)
            w1 = tl.load(w1_base + (f0 + rf)[:, None] * D + rd[None, :], mask=fm[:, None], other=0.0)
            z0 = tl.dot(k, w0, input_precision=PREC)
            a1, _, _ = _silu_parts(z0)
            z1 += tl.dot(a1, w1, input_precision=PREC)
        zc = z1 - tl.sum(z1, 1)[:, None] / D
        rstd = 1 / tl.sqrt(tl.sum(zc * zc, 1) / D + EPS)
        n = zc * rstd[:, None]
        dy = k + n * gain[None, :] - v
        dn = dy * gain[None, :]
        dz1 = rstd[:, None] * (dn - tl.sum(dn, 1)[:, None] / D - n * (tl.sum(dn * n, 1) / D)[:, None])
        a1sq = tl.zeros((BT,), dtype=tl.float32)
        dz0sq = tl.zeros((BT,), dtype=tl.float32)
        for f0 in range(0, F, BF):
            fm = (f0 + rf) < F
            w0 = tl.load(w0_base + rd[:, None] * F + (f0 + rf)[None, :], mask=fm[None, :], other=0.0)
            w1t = tl.load(w1_base + (f0 + rf)[None, :] * D + rd[:, None], mask=fm[None, :], other=0.0)  # (D, BF)
            z0 = tl.dot(k, w0, input_precision=PREC)
            a1, d1, _ = _silu_parts(z0)
            dz0 = tl.dot(dz1, w1t, input_precision=PREC) * d1
            off = row[:, None] * F + (f0 + rf)[None, :]
            m2 = tm[:, None] & fm[None, :]
            tl.store(A1 + off, a1, mask=m2)
            tl.store(DZ0 + off, dz0, mask=m2)
            a1sq += tl.sum(a1 * a1, 1)
            dz0sq += tl.sum(dz0 * dz0, 1)
        off_d = row[:, None] * D + rd[None, :]
        tl.store(DZ1 + off_d, dz1, mask=tm[:, None])
        tl.store(NRM + off_d, n, mask=tm[:, None])
        tl.store(RSTD + row, rstd, mask=tm)
        tl.store(LOSS + row, 0.5 * tl.sum(dy * dy, 1), mask=tm)
        gn = tl.sqrt(tl.sum(k * k, 1) * dz0sq + a1sq * tl.sum(dz1 * dz1, 1) + 1e-20)
        tl.store(GN + row, gn, mask=tm)
        tl.store(A1SQ + row, a1sq, mask=tm)
        tl.store(DZ0SQ + row, dz0sq, mask=tm)

    @triton.jit
    def _bwd_kernel(K, V, W0, W1, GAIN, A1, DZ0, DZ1, NRM, RSTD, GN, A1SQ, DZ0SQ,
                    G_A1, G_DZ0, G_DZ1, G_LOSS, G_GN,
                    G_K, G_V, G_Z0, G_DA1, G_Z1, G_GAIN,
                    C, H, F, NT,
                    D: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        tb = tl.program_id(1)
        rt = tb * BT + tl.arange(0, BT)
        rd = tl.arange(0, D)
        rf = tl.arange(0, BF)
        tm = rt < C
        row = bh * C + rt
        off_d = row[:, None] * D + rd[None, :]
        k = tl.load(K + off_d, mask=tm[:, None], other=0.0)
        v = tl.load(V + off_d, mask=tm[:, None], other=0.0)
        dz1 = tl.load(DZ1 + off_d, mask=tm[:, None], other=0.0)
        n = tl.load(NRM + off_d, mask=tm[:, None], other=0.0)
        g_dz1 = tl.load(G_DZ1 + off_d, mask=tm[:, None], other=0.0)
        rstd = tl.load(RSTD + row, mask=tm, other=1.0)
        gn = tl.load(GN + row, mask=tm, other=1.0)
        a1sq = tl.load(A1SQ + row, mask=tm, other=0.0)
        dz0sq = tl.load(DZ0SQ + row, mask=tm, other=0.0)
        g_loss = tl.load(G_LOSS + row, mask=tm, other=0.0)
        gs = tl.load(G_GN + row, mask=tm, other=0.0) / gn       # d gnorm / d (|a|^2 |dz|^2) = 1 / (2 gnorm), x2
        gain = tl.load(GAIN + (bh % H) * D + rd)
        ksq = tl.sum(k * k, 1)
        dz1sq = tl.sum(dz1 * dz1, 1)
        w0_base = W0 + bh * D * F
        w1_base = W1 + bh * F * D
        # pass A over the hidden width: finish d/d dz1 (gnorm term + through da1 = dz1 W1^T)
        g_dz1 += (gs * a1sq)[:, None] * dz1
        for f0 in range(0, F, BF):
            fm = (f0 + rf) < F
            m2 = tm[:, None] & fm[None, :]
            off = row[:, None] * F + (f0 + rf)[None, :]
            w0 = tl.load(w0_base + rd[:, None] * F + (f0 + rf)[None, :], mask=fm[None, :], other=0.0)
            w1 = tl.load(w1_base + (f0 + rf)[:, None] * D + rd[None, :], mask=fm[:, None], other=0.0)
            _, d1, _ = _silu_parts(tl.dot(k, w0, input_precision=PREC))
            g_dz0 = tl.load(G_DZ0 + off, mask=m2, other=0.0) + (gs * ksq)[:, None] * tl.load(DZ0 + off, mask=m2,
                                                                                            other=0.0)
            g_da1 = g_dz0 * d1
            tl.store(G_DA1 + off, g_da1, mask=m2)
            g_dz1 += tl.dot(g_da1, w1, input_precision=PREC)
        # backward of dz1 = rstd * P, P = dn - mean(dn) - n * mean(dn * n)
        dy = k + n * gain[None, :] - v
        dn = dy * gain[None, :]
        m = tl.sum(dn * n, 1) / D
        g_p = rstd[:, None] * g_dz1
        g_r = tl.sum(g_dz1 * dz1, 1) / rstd
        mgn = tl.sum(g_p * n, 1) / D
        g_dn = g_p - tl.sum(g_p, 1)[:, None] / D - n * mgn[:, None]
        g_n = -m[:, None] * g_p - mgn[:, None] * dn
        g_dy = g_dn * gain[None, :] + g_loss[:, None] * dy
        g_n += g_dy * gain[None, :]
        tl.store(G_V + off_d, -g_dy, mask=tm[:, None])
        tl.store(G_GAIN + (bh * NT + tb) * D + rd, tl.sum(g_dn * dy + g_dy * n, 0))
        # backward of the LayerNorm forward n = zc * rstd (rstd also gets g_r from the step above)
        zc = n / rstd[:, None]
        g_rt = g_r + tl.sum(g_n * zc, 1)
        g_zc = rstd[:, None] * g_n - (g_rt * rstd * rstd * rstd / D)[:, None] * zc
        g_z1 = g_zc - tl.sum(g_zc, 1)[:, None] / D
        tl.store(G_Z1 + off_d, g_z1, mask=tm[:, None])
        # pass B: d/d a1 (gnorm term + through z1 = a1 W1) and d/d z0 (through a1 and through dz0's silu')
        g_k = g_dy + (gs * dz0sq)[:, None] * k
        for f0 in range(0, F, BF):
            fm = (f0 + rf) < F
            m2 = tm[:, None] & fm[None, :]
            off = row[:, None] * F + (f0 + rf)[None, :]
            w0 = tl.load(w0_base + rd[:, None] * F + (f0 + rf)[None, :], mask=fm[None, :], other=0.0)
            w0t = tl.load(w0_base + rd[None, :] * F + (f0 + rf)[:, None], mask=fm[:, None], other=0.0)  # (BF, D)
            w1t = tl.load(w1_base + (f0 + rf)[None, :] * D + rd[:, None], mask=fm[None, :], other=0.0)  # (D, BF)
            a1, d1, d2 = _silu_parts(tl.dot(k, w0, input_precision=PREC))
            da1 = tl.dot(dz1, w1t, input_precision=PREC)
            g_dz0 = tl.load(G_DZ0 + off, mask=m2, other=0.0) + (gs * ksq)[:, None] * tl.load(DZ0 + off, mask=m2,
                                                                                            other=0.0)
            g_a1 = (tl.load(G_A1 + off, mask=m2, other=0.0) + (gs * dz1sq)[:, None] * a1
                    + tl.dot(g_z1, w1t, input_precision=PREC))
            g_z0 = g_dz0 * da1 * d2 + g_a1 * d1
            g_z0 = tl.where(m2, g_z0, 0.0)
            tl.store(G_Z0 + off, g_z0, mask=m2)
            g_k += tl.dot(g_z0, w0t, input_precision=PREC)
        tl.store(G_K + off_d, g_k, mask=tm[:, None])


def _prec(x: Tensor) -> str:
    """tl.dot precision: TF32 where torch's float32 matmuls use it (CUDA only; the interpreter does ieee)."""
    return "tf32" if (x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _empty(ref: Tensor, *shape: int) -> Tensor:
    t = ref.new_empty(shape)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _grid(BH: int, C: int):
    return (BH, triton.cdiv(C, BLOCK_T))


def _fwd_impl(k: Tensor, v: Tensor, w0: Tensor, w1: Tensor, gain: Tensor):
    B, H, C, D = k.shape
    F = w0.shape[-1]
    k, v, w0, w1, gain = (t.contiguous() for t in (k, v, w0, w1, gain))
    a1, dz0 = _empty(k, B, H, C, F), _empty(k, B, H, C, F)
    dz1, nrm = _empty(k, B, H, C, D), _empty(k, B, H, C, D)
    rstd, loss, gn, a1sq, dz0sq = (_empty(k, B, H, C) for _ in range(5))
    if C > 0:
        _fwd_kernel[_grid(B * H, C)](k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, loss, gn, a1sq, dz0sq,
                                     C, H, F, EPS=LN_EPS, D=D, BT=BLOCK_T, BF=BLOCK_F, PREC=_prec(k), **LAUNCH)
    return a1, dz0, dz1, loss, gn, nrm, rstd, a1sq, dz0sq


def _bwd_impl(k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq, g_a1, g_dz0, g_dz1, g_loss, g_gn):
    B, H, C, D = k.shape
    F = w0.shape[-1]
    NT = triton.cdiv(C, BLOCK_T)
    # the saved inputs are the caller's tensors (chunk views, batch-expanded weights): the kernel wants rows
    # (a no-op for what is already contiguous)
    k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq, g_a1, g_dz0, g_dz1, g_loss, g_gn = (
        t.contiguous() for t in (k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq, g_a1, g_dz0, g_dz1,
                                 g_loss, g_gn))
    g_k, g_v, g_z1 = (_empty(k, B, H, C, D) for _ in range(3))
    g_z0, g_da1 = _empty(k, B, H, C, F), _empty(k, B, H, C, F)
    g_gain_part = _empty(k, B * H * NT, D)
    if C > 0:
        _bwd_kernel[_grid(B * H, C)](k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq,
                                     g_a1, g_dz0, g_dz1, g_loss, g_gn, g_k, g_v, g_z0, g_da1, g_z1, g_gain_part,
                                     C, H, F, NT, D=D, BT=BLOCK_T, BF=BLOCK_F, PREC=_prec(k), **LAUNCH)
    # the weight gradients sum over tokens: grad W0 = k^T g_z0; grad W1 = g_da1^T dz1 + a1^T g_z1 (one matmul)
    g_w0 = torch.matmul(k.transpose(-1, -2), g_z0)
    g_w1 = torch.matmul(torch.cat([g_da1, a1], 2).transpose(-1, -2), torch.cat([dz1, g_z1], 2))
    g_gain = g_gain_part.view(B, H, NT, D).sum((0, 2))
    return g_k, g_v, g_w0, g_w1, g_gain


class _TokenGradients(torch.autograd.Function):
    """The kernels with their backward. A plain autograd.Function (not a torch.library custom op): under
    torch.compile, dynamo traces the Triton launches into the graph, so inductor knows which buffers each
    kernel reads and writes. (As an opaque custom op inside the compiled memory step, the CUDA-graphed training
    step hit an illegal memory access, torch 2.11 / triton 3.6.)"""

    @staticmethod
    def forward(ctx, k, v, w0, w1, gain):
        a1, dz0, dz1, loss, gn, nrm, rstd, a1sq, dz0sq = _fwd_impl(k, v, w0, w1, gain)
        ctx.save_for_backward(k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq)
        return a1, dz0, dz1, loss, gn

    @staticmethod
    def backward(ctx, g_a1, g_dz0, g_dz1, g_loss, g_gn):
        k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq = ctx.saved_tensors

        def z(g, like):
            return torch.zeros_like(like) if g is None else g

        return _bwd_impl(k, v, w0, w1, gain, a1, dz0, dz1, nrm, rstd, gn, a1sq, dz0sq, z(g_a1, a1),
                         z(g_dz0, dz0), z(g_dz1, dz1), z(g_loss, gn), z(g_gn, gn))


def token_gradients_mlp2_triton(k: Tensor, v: Tensor, w0: Tensor, w1: Tensor, gain: Tensor):
    """The Triton path of `token_gradients_mlp2` (inputs checked by the caller)."""
    a1, dz0, dz1, loss, gn = _TokenGradients.apply(k, v, w0, w1, gain)
    return [k, a1], [dz0, dz1], loss, gn
