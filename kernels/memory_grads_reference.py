"""Plain-PyTorch reference of the per-token memory gradients (depth-2 MLP): the contract of the Triton kernels.

Autograd through this function is the reference for the kernels' backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5


def token_gradients_mlp2_reference(k: Tensor, v: Tensor, w0: Tensor, w1: Tensor, gain: Tensor):
    """Per-token gradients of l_t = 1/2 ||k_t + LN(silu(k_t W0) W1) * gain - v_t||^2 at (W0, W1).

    k, v `(B, H, C, D)`; w0 `(B, H, D, F)`, w1 `(B, H, F, D)`; gain `(H, D)`. Returns (acts, dzs, loss, gnorm):
    acts = [k, a1], dzs = [dz0, dz1] with grad_{W_i} l_t = acts[i][t]^T dzs[i][t]; loss and gnorm (Frobenius
    norm over both layers) `(B, H, C)`.
    """
    z0 = torch.matmul(k, w0)
    a1 = F.silu(z0)
    z1 = torch.matmul(a1, w1)
    zc = z1 - z1.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    n = zc * rstd
    dy = k + n * gain[None, :, None, :] - v
    dn = dy * gain[None, :, None, :]
    dz1 = rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
    s = torch.sigmoid(z0)
    dz0 = torch.matmul(dz1, w1.transpose(-1, -2)) * (s * (1 + z0 * (1 - s)))
    sq = k.pow(2).sum(-1) * dz0.pow(2).sum(-1) + a1.pow(2).sum(-1) * dz1.pow(2).sum(-1)
    return [k, a1], [dz0, dz1], 0.5 * dy.pow(2).sum(-1), torch.sqrt(sq + 1e-20)
