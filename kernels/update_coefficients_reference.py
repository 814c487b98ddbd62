"""Reference (plain PyTorch) for the memory's chunk-update coefficients; the Triton kernels are checked against it.

The chunk-parallel write (memsparse.memory, Titans sec. 3.2) folds momentum and forgetting over a chunk of C
tokens into per-token coefficients. With per-token clip_t = min(max_norm / (gnorm_t + 1e-6), 1), gate g_t and
    eta'_t = 1 - g_t (1 - eta_t),  theta'_t = g_t theta_t clip_t,  alpha'_t = g_t alpha_t,
    P_t = prod_{s<=t} eta'_s,  beta_t = prod_{s<=t} (1 - alpha'_s)      (logs floored at LOG_FLOOR)
the chunk's update is  S_C = P_C S_0 - sum_t d_t a_t (x) dz_t,  M_C = beta_C M_0 + gamma S_0 - sum_t c_t a_t (x) dz_t
with  c_t = theta'_t sum_{s>=t} g_s (beta_C / beta_s)(P_s / P_t),  d_t = theta'_t P_C / P_t,
      gamma = sum_s g_s (beta_C / beta_s) P_s.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_FLOOR = 1e-12
SUFFIX_BLOCK = 64


def effective_rates(eta: Tensor, theta: Tensor, alpha: Tensor, gates: Tensor | None, clip: Tensor):
    """The gated rates (eta', theta', alpha', g) of the module docstring; gates None means g = 1."""
    g = torch.ones_like(eta) if gates is None else gates
    return 1 - g * (1 - eta), g * theta * clip, g * alpha, g


def decayed_suffix_sums(w: Tensor, log_p: Tensor, block: int = SUFFIX_BLOCK) -> Tensor:
    """R_t = sum_{s>=t} w_s exp(log_p_s - log_p_t) along the last dim, for w >= 0 and log_p non-increasing
    (log cumulative products of rates in [0, 1]): `(..., C)` -> `(..., C)`.

    Blocked like chunked linear attention: exact within blocks of `block` tokens through a block x block decay
    matrix, then across blocks through an (n_blocks x n_blocks) one. Every exponent is <= 0, so the sums are
    stable in linear space however fast the decay, and no C x C matrix is ever built.
    """
    C = w.shape[-1]
    bs = min(block, C)
    nb = -(-C // bs)
    if nb * bs != C:  # pad: zero weight, flat decay (keeps log_p non-increasing)
        pad = nb * bs - C
        w = torch.cat([w, w.new_zeros(*w.shape[:-1], pad)], -1)
        log_p = torch.cat([log_p, log_p[..., -1:].expand(*log_p.shape[:-1], pad)], -1)
    w, lp = w.unflatten(-1, (nb, bs)), log_p.unflatten(-1, (nb, bs))                # (..., nb, bs)
    i = torch.arange(bs, device=w.device)  # masks from index comparisons: compiled, they fuse into their users
    upper = i[:, None] <= i[None, :]                                               # [t, s]: s >= t
    expo = lp.unsqueeze(-2) - lp.unsqueeze(-1)                                     # [t, s] = lp_s - lp_t
    local = (torch.exp(torch.where(upper, expo, -math.inf)) * w.unsqueeze(-2)).sum(-1)  # within the block
    if nb == 1:
        return local.flatten(-2)[..., :C]
    lp_end = lp[..., -1]                                                           # log P at each block's end
    # ... at the previous block's end; block 0 has none and its v is never used, but its exponent must still be
    # <= 0: relative to its own end it reached e^+88 (fp32 inf, then 0 * inf = NaN in every c) once the decays
    # within the first block multiplied below e^-88, e.g. momentum retention ~0.2 over 64 tokens.
    lp_prev = torch.cat([lp[..., :1, 0], lp_end[..., :-1]], -1)
    v = local[..., 0] * torch.exp(lp[..., 0] - lp_prev)        # block k's sum relative to block k-1's end
    j = torch.arange(nb, device=w.device)
    later = j[:, None] < j[None, :]                                                # [j, k]: k > j
    cross = torch.exp(torch.where(later, lp_prev.unsqueeze(-2) - lp_end.unsqueeze(-1), -math.inf))
    tail = (cross * v.unsqueeze(-2)).sum(-1)                   # sum over later blocks, relative to block j's end
    return (local + torch.exp(lp_end.unsqueeze(-1) - lp) * tail.unsqueeze(-1)).flatten(-2)[..., :C]


def update_coefficients_reference(gnorm: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, gates: Tensor | None,
                                  max_grad_norm: float):
    """The chunk-update coefficients of the module docstring. gnorm, eta, theta, alpha, gates `(B, H, C)` ->
    c, d `(B, H, C)` and gamma, beta_C, P_C `(B, H)`. Ratios from cumulative log sums, the suffix sums blocked
    (`decayed_suffix_sums`), so long chunks never under- or overflow."""
    clip = torch.clamp(max_grad_norm / (gnorm + 1e-6), max=1.0)
    eta_e, theta_e, alpha_e, rho = effective_rates(eta, theta, alpha, gates, clip)
    log_p = torch.cumsum(torch.log(eta_e.clamp_min(LOG_FLOOR)), -1)          # log P_s
    log_b = torch.cumsum(torch.log((1 - alpha_e).clamp_min(LOG_FLOOR)), -1)  # log beta_s
    w = rho * torch.exp(log_b[..., -1:] - log_b)                             # g_s beta_C / beta_s
    r = decayed_suffix_sums(w, log_p)                                        # sum_{s>=t} w_s P_s / P_t
    c = theta_e * r
    d = theta_e * torch.exp(log_p[..., -1:] - log_p)
    gamma = r[..., 0] * torch.exp(log_p[..., 0])                             # sum_s w_s P_s
    return c, d, gamma, torch.exp(log_b[..., -1]), torch.exp(log_p[..., -1])
