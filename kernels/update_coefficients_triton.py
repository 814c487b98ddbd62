"""Triton kernels: the memory's chunk-update coefficients (c, d, gamma, beta_C, P_C) and their backward.

The contract and the math are `update_coefficients_reference`'s. Compiled, the reference is ~20 small kernels
per chunk step (clamps, logs, two cumulative sums, blocked decayed sums, their backward), each a launch on a
(B, H, C) tensor. Here one program owns one (batch, head) row and walks it in blocks of 64 tokens, carrying
three running sums between blocks; everything is written as suffix sums of the log decays,
    q_t = sum_{s>t} log eta'_s,   y_t = sum_{s>t} log(1 - alpha'_s)      (both <= 0)
so that  d_t = theta'_t exp(q_t),  w_t = g_t exp(y_t),  r_t = sum_{s>=t} w_s exp(q_t - q_s),  c_t = theta'_t r_t,
gamma = r_0 exp(log eta'_0),  beta_C = exp(y_{-1}),  P_C = exp(q_{-1}); every exponent is <= 0.

Forward, blocks last to first: r_t = local_t + exp(q_t - Q) R, with Q = q at the block's end, R the sum over
later blocks relative to it, local_t a 64 x 64 masked decay matrix; then R <- exp(log eta'_first) r_first.
Backward (hand-derived; blocks first to last), with G the upstream gradients:
    G_r = G_c theta' (+ G_gamma exp(log eta'_0) at t = 0),   A_s = sum_{t<=s} G_r,t exp(q_t - q_s),
    G_w = A,  G_q = G_d d + G_r r - w A,  G_y = w A,
    G_{log eta'}_s = sum_{t<s} G_q,t + G_P P_C (+ G_gamma gamma at s = 0),
    G_{log(1-alpha')}_s = sum_{t<s} G_y,t + G_beta beta_C,
then through the clamps, logs, gates and the clip to (gnorm, eta, theta, alpha, gates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_attention_triton import HAS_TRITON, interpreting
from .update_coefficients_reference import LOG_FLOOR

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK = 64   # tokens per inner block (a 64 x 64 fp32 decay tile per step)
LAUNCH = dict(num_warps=4, num_stages=1)
POISON_OUTPUTS = False  # tests: fill every kernel output with NaN before the launch (an unwritten element shows)


def unsupported_reason(gnorm: Tensor) -> str | None:
    """Why the kernels cannot run these inputs (None when they can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if gnorm.dtype != torch.float32:
        return f"dtype {gnorm.dtype} (the memory runs in fp32)"
    if not gnorm.is_cuda and not interpreting():
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    return None


if HAS_TRITON:

    @triton.jit
    def _rates(GN, ETA, THETA, ALPHA, GATES, o_gn, o_eta, o_th, o_al, o_g, idx, m, max_norm: tl.constexpr,
               HAS_GATES: tl.constexpr, FLOOR: tl.constexpr):
        """One block's inputs (each at its own row offset) and gated rates; padding: flat decay, zero gate."""
        gn = tl.load(GN + o_gn + idx, mask=m, other=1.0)
        eta = tl.load(ETA + o_eta + idx, mask=m, other=1.0)
        th = tl.load(THETA + o_th + idx, mask=m, other=0.0)
        al = tl.load(ALPHA + o_al + idx, mask=m, other=0.0)
        if HAS_GATES:
            g = tl.load(GATES + o_g + idx, mask=m, other=0.0)
        else:
            g = tl.where(m, 1.0, 0.0)
        ratio = max_norm / (gn + 1e-6)
        clip = tl.minimum(ratio, 1.0)
        ee = 1 - g * (1 - eta)
        om = 1 - g * al                                    # 1 - alpha'
        u = tl.where(m, tl.log(tl.maximum(ee, FLOOR)), 0.0)
        v = tl.where(m, tl.log(tl.maximum(om, FLOOR)), 0.0)
        return gn, eta, th, al, g, ratio, clip, ee, om, u, v

    @triton.jit
    def _row_offsets(H, sgn_b, sgn_h, se_b, se_h, st_b, st_h, sa_b, sa_h, sg_b, sg_h):
        """This program's row (batch * H + head) and the row's offset in each of the five inputs."""
        row = tl.program_id(0)
        b, h = row // H, row % H
        return row, b * sgn_b + h * sgn_h, b * se_b + h * se_h, b * st_b + h * st_h, b * sa_b + h * sa_h, \
            b * sg_b + h * sg_h

    @triton.jit
    def _fwd_kernel(GN, ETA, THETA, ALPHA, GATES, C_OUT, D_OUT, R_OUT, GAMMA, BETA, PC, C, H, sgn_b, sgn_h, se_b, se_h,
                    st_b, st_h, sa_b, sa_h, sg_b, sg_h, max_norm: tl.constexpr, HAS_GATES: tl.constexpr,
                    BLOCK: tl.constexpr, FLOOR: tl.constexpr):
        row, o_gn, o_eta, o_th, o_al, o_g = _row_offsets(H, sgn_b, sgn_h, se_b, se_h, st_b, st_h, sa_b, sa_h,
                                                         sg_b, sg_h)
        off_out = row * C
        offs = tl.arange(0, BLOCK)
        upper = offs[None, :] >= offs[:, None]               # [t, s]: s >= t
        zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        Q, Y, R = zero, zero, zero                           # suffix sums after the block; later blocks' r
        nb = tl.cdiv(C, BLOCK)
        for kk in range(0, nb):
            idx = (nb - 1 - kk) * BLOCK + offs
            m = idx < C
            gn, eta, th, al, g, ratio, clip, ee, om, u, v = _rates(GN, ETA, THETA, ALPHA, GATES, o_gn, o_eta, o_th,
                                                                   o_al, o_g, idx, m, max_norm, HAS_GATES, FLOOR)
            te = g * th * clip
            ub, vb = tl.sum(u, 0), tl.sum(v, 0)
            qb = ub - tl.cumsum(u, 0)                        # sum over later tokens of the block
            yb = vb - tl.cumsum(v, 0)
            w = g * tl.exp(Y + yb)
            d = te * tl.exp(Q + qb)
            dec = tl.exp(tl.where(upper, qb[:, None] - qb[None, :], -1e30))
            r = tl.sum(dec * w[None, :], 1) + tl.exp(qb) * R
            tl.store(C_OUT + off_out + idx, te * r, mask=m)
            tl.store(D_OUT + off_out + idx, d, mask=m)
            tl.store(R_OUT + off_out + idx, r, mask=m)
            first = offs == 0
            R = tl.exp(tl.sum(tl.where(first, u, 0.0), 0)) * tl.sum(tl.where(first, r, 0.0), 0)
            Q += ub
            Y += vb
        tl.store(GAMMA + row, R)        # gamma = r_0 exp(log eta'_0): the carry after block 0
        tl.store(BETA + row, tl.exp(Y))
        tl.store(PC + row, tl.exp(Q))

    @triton.jit
    def _bwd_kernel(GN, ETA, THETA, ALPHA, GATES, R_IN, GC, GD, GGAMMA, GBETA, GP, DGN, DETA, DTHETA, DALPHA,
                    DGATES, C, H,
                    sgn_b, sgn_h, se_b, se_h, st_b, st_h, sa_b, sa_h, sg_b, sg_h, max_norm: tl.constexpr,
                    HAS_GATES: tl.constexpr, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
        row, o_gn, o_eta, o_th, o_al, o_g = _row_offsets(H, sgn_b, sgn_h, se_b, se_h, st_b, st_h, sa_b, sa_h,
                                                         sg_b, sg_h)
        off_out = row * C
        offs = tl.arange(0, BLOCK)
        lower = offs[None, :] <= offs[:, None]               # [s, t]: t <= s
        zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        nb = tl.cdiv(C, BLOCK)
        LU, LV = zero, zero
        for k in range(0, nb):                               # totals of the log decays
            idx = k * BLOCK + offs
            m = idx < C
            _, _, _, _, _, _, _, _, _, u, v = _rates(GN, ETA, THETA, ALPHA, GATES, o_gn, o_eta, o_th, o_al,
                                                     o_g, idx, m, max_norm, HAS_GATES, FLOOR)
            LU += tl.sum(u, 0)
            LV += tl.sum(v, 0)
        p_c, beta_c = tl.exp(LU), tl.exp(LV)
        g_gamma = tl.load(GGAMMA + row)
        g_beta = tl.load(GBETA + row)
        g_p = tl.load(GP + row)
        PU, PV, A, CQ, CY = zero, zero, zero, zero, zero   # prefix sums before the block; A at the previous token
        for k in range(0, nb):
            idx = k * BLOCK + offs
            m = idx < C
            gn, eta, th, al, g, ratio, clip, ee, om, u, v = _rates(GN, ETA, THETA, ALPHA, GATES, o_gn, o_eta, o_th,
                                                                   o_al, o_g, idx, m, max_norm, HAS_GATES, FLOOR)
            te = g * th * clip
            pu = tl.cumsum(u, 0)                             # within the block, inclusive
            pv = tl.cumsum(v, 0)
            q = LU - (PU + pu)
            y = LV - (PV + pv)
            ey = tl.exp(y)
            eq = tl.exp(q)
            w = g * ey
            d = te * eq
            r = tl.load(R_IN + off_out + idx, mask=m, other=0.0)
            gc = tl.load(GC + off_out + idx, mask=m, other=0.0)
            gd = tl.load(GD + off_out + idx, mask=m, other=0.0)
            start = idx == 0
            g_r = gc * te + tl.where(start, g_gamma * tl.exp(u), 0.0)
            g_te = gc * r + gd * eq
            dec = tl.exp(tl.where(lower, pu[:, None] - pu[None, :], -1e30))
            A_blk = tl.sum(dec * g_r[None, :], 1) + tl.exp(pu) * A
            g_q = gd * d + g_r * r - w * A_blk
            g_y = w * A_blk
            g_u = CQ + (tl.cumsum(g_q, 0) - g_q) + g_p * p_c + tl.where(start, g_gamma * r * tl.exp(u), 0.0)
            g_v = CY + (tl.cumsum(g_y, 0) - g_y) + g_beta * beta_c
            g_ee = tl.where(ee >= FLOOR, g_u / ee, 0.0)
            g_om = tl.where(om >= FLOOR, g_v / om, 0.0)
            g_clip = g_te * g * th
            g_gn = tl.where(ratio <= 1.0, -g_clip * max_norm / ((gn + 1e-6) * (gn + 1e-6)), 0.0)
            tl.store(DGN + off_out + idx, g_gn, mask=m)
            tl.store(DETA + off_out + idx, g_ee * g, mask=m)
            tl.store(DTHETA + off_out + idx, g_te * g * clip, mask=m)
            tl.store(DALPHA + off_out + idx, -g_om * g, mask=m)
            if HAS_GATES:
                g_g = -g_ee * (1 - eta) + g_te * th * clip - g_om * al + A_blk * ey
                tl.store(DGATES + off_out + idx, g_g, mask=m)
            last = offs == BLOCK - 1
            A = tl.sum(tl.where(last, A_blk, 0.0), 0)
            PU += tl.sum(u, 0)
            PV += tl.sum(v, 0)
            CQ += tl.sum(g_q, 0)
            CY += tl.sum(g_y, 0)


def _rows(t: Tensor) -> tuple[Tensor, int, int]:
    """t `(B, H, C)` with unit stride along C (copied if not) and its (batch, head) strides."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def _new(like: Tensor, *shape: int) -> Tensor:
    out = like.new_empty(shape)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _inputs(gnorm, eta, theta, alpha, gates):
    """The five inputs with unit stride along C (gates stand-in: gnorm) and their ten (batch, head) strides."""
    ts, strides = [], []
    for t in (gnorm, eta, theta, alpha, gnorm if gates is None else gates):
        t, sb, sh = _rows(t)
        ts.append(t)
        strides += [sb, sh]
    return ts, strides


def _fwd_impl(gnorm, eta, theta, alpha, gates, max_grad_norm):
    B, H, C = gnorm.shape
    ts, strides = _inputs(gnorm, eta, theta, alpha, gates)
    c, d, r = (_new(gnorm, B, H, C) for _ in range(3))
    gamma, beta_c, p_c = (_new(gnorm, B, H) for _ in range(3))
    # the max norm is a compile-time constant: inductor would hand a Python float over as fp64
    _fwd_kernel[(B * H,)](*ts, c, d, r, gamma, beta_c, p_c, C, H, *strides, max_norm=float(max_grad_norm),
                          HAS_GATES=gates is not None, BLOCK=BLOCK, FLOOR=LOG_FLOOR, **LAUNCH)
    return c, d, r, gamma, beta_c, p_c


def _bwd_impl(gnorm, eta, theta, alpha, gates, r, g_c, g_d, g_gamma, g_beta, g_p, max_grad_norm):
    B, H, C = gnorm.shape
    ts, strides = _inputs(gnorm, eta, theta, alpha, gates)
    outs = [_new(gnorm, B, H, C) for _ in range(5 if gates is not None else 4)]
    d_gates = outs[4] if gates is not None else outs[0]  # not written without gates
    g_c, g_d, g_gamma, g_beta, g_p = (t.contiguous() for t in (g_c, g_d, g_gamma, g_beta, g_p))
    _bwd_kernel[(B * H,)](*ts, r, g_c, g_d, g_gamma, g_beta, g_p, *outs[:4], d_gates, C, H, *strides,
                          max_norm=float(max_grad_norm), HAS_GATES=gates is not None, BLOCK=BLOCK, FLOOR=LOG_FLOOR,
                          **LAUNCH)
    return outs


class _UpdateCoefficients(torch.autograd.Function):
    """The kernels with their backward; a plain autograd.Function, traced by dynamo inside the compiled chunk
    step (see memory_grads_triton._TokenGradients for why not a custom op)."""

    @staticmethod
    def forward(ctx, gnorm, eta, theta, alpha, gates, max_grad_norm):
        c, d, r, gamma, beta_c, p_c = _fwd_impl(gnorm, eta, theta, alpha, gates, max_grad_norm)
        ctx.max_grad_norm = max_grad_norm
        ctx.has_gates = gates is not None
        ctx.save_for_backward(gnorm, eta, theta, alpha, *(() if gates is None else (gates,)), r)
        return c, d, gamma, beta_c, p_c

    @staticmethod
    def backward(ctx, g_c, g_d, g_gamma, g_beta, g_p):
        saved = ctx.saved_tensors
        gnorm, eta, theta, alpha = saved[:4]
        gates = saved[4] if ctx.has_gates else None
        r = saved[-1]

        def z(g, like):
            return torch.zeros_like(like) if g is None else g

        row = gnorm[..., 0]
        outs = _bwd_impl(gnorm, eta, theta, alpha, gates, r, z(g_c, gnorm), z(g_d, gnorm), z(g_gamma, row),
                         z(g_beta, row), z(g_p, row), ctx.max_grad_norm)
        return (*outs[:4], outs[4] if gates is not None else None, None)


def update_coefficients_triton(gnorm: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, gates: Tensor | None,
                               max_grad_norm: float):
    """The Triton path of `update_coefficients` (inputs checked by the caller)."""
    return _UpdateCoefficients.apply(gnorm, eta, theta, alpha, gates, max_grad_norm)
