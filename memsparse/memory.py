"""Titans-style neural long-term memory: per-head MLP fast weights written by gradient steps.

Memory function (per head, fast weights W_1..W_L; Titans sec. 3.1 with residual + norm):
    M(x) = x + LN(W_L phi(... phi(x W_1))) * gain
Write rule for token t with key k_t, value v_t (Titans eqs. 13-14), loss l_t = 1/2 ||M(k_t) - v_t||^2:
    S_t = eta_t S_{t-1} - theta_t * grad_W l_t          (momentum = past surprise)
    M_t = (1 - alpha_t) M_{t-1} + S_t                   (forgetting)
A per-token gate g_t in [0, 1] scales a token's whole step: eta' = 1 - g (1 - eta), theta' = g theta,
alpha' = g alpha and M_t = (1 - alpha'_t) M_{t-1} + g_t S_t, so g = 0 leaves memory and momentum untouched.

Two implementations of the same rule, both public:
- `write_sequential_reference`: a token loop with autograd gradients (obviously correct, slow);
- `write_chunked`: chunk-parallel (Titans sec. 3.2). Inside a chunk all gradients are taken at the
  chunk-start weights W_0. For an MLP the per-token gradient of layer i is an outer product
  a_{i,t} (x) dz_{i,t}, so with the momentum/forgetting recurrence unrolled,
      S_C = P_C S_0 - sum_t d_t a_t (x) dz_t,      M_C = beta_C M_0 + gamma S_0 - sum_t c_t a_t (x) dz_t,
  where P = cumprod(eta'), beta = cumprod(1 - alpha'), d_t = theta'_t P_C / P_t,
  c_t = theta'_t sum_{s>=t} g_s (beta_C / beta_s)(P_s / P_t), gamma = sum_s g_s (beta_C / beta_s) P_s.
  The sums become two weighted matmuls per layer: no per-token weight gradient is ever materialised.
  Ratios are computed in log space from cumulative sums, so long chunks never under/overflow; the suffix sums
  in c_t are blocked (`decayed_suffix_sums` in kernels/update_coefficients_reference.py: 64 x 64 decay
  matrices, no C x C one). The coefficients come from `memsparse.kernels.update_coefficients` (PyTorch
  reference; Triton kernels opt-in).
Every token's gradient is clipped to `max_grad_norm` (a bound on the update, against the NaNs seen in
titans-pytorch issue 29); fast weights and their updates are kept in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MemoryConfig
from .kernels.memory_grads import resolve_impl as resolve_memory_grads_impl
from .kernels.memory_grads import token_gradients_mlp2
from .kernels.update_coefficients import resolve_impl as resolve_coefficients_impl
from .kernels.update_coefficients import update_coefficients
from .kernels.update_coefficients_reference import effective_rates as _effective_rates

_LN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MemoryState:
    """Fast weights and momentum of one memory, one per sequence in the batch.

    weights[i], momentum[i]: fp32 `(B, H, d_in_i, d_out_i)`; step: int64 `(B,)` tokens written so far.
    Initialised from the module's learned initial weights (`NeuralMemory.init_state`), momentum zero.
    """

    weights: list[Tensor]
    momentum: list[Tensor]
    step: Tensor

    def detach(self) -> MemoryState:
        return MemoryState([w.detach() for w in self.weights], [s.detach() for s in self.momentum],
                           self.step.detach())

    def clone(self) -> MemoryState:
        return MemoryState([w.clone() for w in self.weights], [s.clone() for s in self.momentum], self.step.clone())

    def to(self, device) -> MemoryState:
        return MemoryState([w.to(device) for w in self.weights], [s.to(device) for s in self.momentum],
                           self.step.to(device))

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"weights.{i}": w for i, w in enumerate(self.weights)}
        out.update({f"momentum.{i}": s for i, s in enumerate(self.momentum)})
        out["step"] = self.step
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> MemoryState:
        n = sum(1 for k in sd if k.startswith("weights."))
        if n == 0 or "step" not in sd:
            raise ValueError("not a MemoryState state dict: expected keys weights.N, momentum.N, step")
        return cls([sd[f"weights.{i}"] for i in range(n)], [sd[f"momentum.{i}"] for i in range(n)], sd["step"])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.weights, *self.momentum, self.step])


@dataclass
class WriteStats:
    """Per-token surprise of a write, measured at the chunk-start weights, and the surprise gate applied to
    each token (None when the write had no surprise gate): `(B, H, N)` each."""

    loss: Tensor
    grad_norm: Tensor
    gate: Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------------
def _act(z: Tensor, activation: str) -> Tensor:
    return F.silu(z) if activation == "silu" else F.gelu(z)


def _act_grad(z: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def memory_forward(weights: list[Tensor], x: Tensor, gain: Tensor, activation: str = "silu",
                   return_cache: bool = False):
    """Apply the memory M to x `(B, H, N, D)` with fast weights `(B, H, d_in, d_out)`; gain `(H, D)`.

    Returns y `(B, H, N, D)` (and the activations needed for the closed-form backward).
    """
    acts, zs = [x], []
    a = x
    for i, w in enumerate(weights):
        z = torch.matmul(a, w)
        zs.append(z)
        if i < len(weights) - 1:
            a = _act(z, activation)
            acts.append(a)
    z = zs[-1]
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + _LN_EPS)
    n = zc * rstd
    y = x + n * gain[None, :, None, :]
    if return_cache:
        return y, (acts, zs, n, rstd)
    return y


def token_gradients(weights: list[Tensor], k: Tensor, v: Tensor, gain: Tensor, activation: str = "silu",
                    impl: str = "auto"):
    """Closed-form per-token gradients of l_t = 1/2 ||M(k_t) - v_t||^2 at `weights`, as outer-product factors.

    Returns (a, dz, loss, grad_norm): lists a[i] `(B, H, N, d_in_i)`, dz[i] `(B, H, N, d_out_i)` with
    grad_{W_i} l_t = a[i][t]^T dz[i][t]; loss and grad_norm (Frobenius, all layers) `(B, H, N)`.
    A depth-2 silu memory can run the fused Triton kernels (`memsparse.kernels.memory_grads`; forward and
    second-order backward), everything else this PyTorch code; `impl` as in `grads_impl`.
    """
    if grads_impl(weights, k, activation, impl) == "triton":
        return token_gradients_mlp2(k, v, weights[0], weights[1], gain, activation, impl="triton")
    y, (acts, zs, n, rstd) = memory_forward(weights, k, gain, activation, return_cache=True)
    dy = y - v
    loss = 0.5 * dy.pow(2).sum(-1)
    dn = dy * gain[None, :, None, :]
    dz = rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
    dzs: list[Tensor] = [dz]
    for i in range(len(weights) - 1, 0, -1):
        da = torch.matmul(dz, weights[i].transpose(-1, -2))
        dz = da * _act_grad(zs[i - 1], activation)
        dzs.insert(0, dz)
    sq = sum(a.pow(2).sum(-1) * d.pow(2).sum(-1) for a, d in zip(acts, dzs))
    return acts, dzs, loss, torch.sqrt(sq + 1e-20)


def grads_impl(weights: list[Tensor], k: Tensor, activation: str, impl: str = "auto") -> str:
    """Which path `token_gradients` takes: "triton" (the fused kernels: depth 2, silu, CUDA; see
    `memsparse.kernels.memory_grads`) or "reference".
    impl "auto" | "triton" | "reference" (auto also reads MEMSPARSE_MEMORY_GRADS_IMPL). Resolved outside the
    compiled step functions, which take the answer as a constant."""
    if impl == "reference":
        return impl
    if len(weights) != 2:
        if impl == "triton":
            raise ValueError(f"the memory-gradient kernels need a depth-2 memory, got depth {len(weights)}")
        return "reference"
    return resolve_memory_grads_impl(k, weights[0].shape[-1], activation, impl)


def _apply_chunk(weights: list[Tensor], momentum: list[Tensor], a_list: list[Tensor], dz_list: list[Tensor],
                 gnorm: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, gates: Tensor | None,
                 max_grad_norm: float, coef_impl: str = "reference",
                 reset: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Fold momentum and forgetting into per-token coefficients and apply the chunk's update (module docstring).
    coef_impl: the resolved path of `update_coefficients` ("reference" or "triton"). reset `(B,)` bool (optional):
    those rows' chunk starts from zero momentum, whatever `momentum` holds: the momentum enters the update only
    through gamma S_0 and P_C S_0, so their two `(B, H)` factors are zeroed instead of the momentum tensors."""
    c, d, gamma, beta_c, p_c = update_coefficients(gnorm, eta, theta, alpha, gates, max_grad_norm, impl=coef_impl)
    gamma, beta_c, p_c = (x[..., None, None] for x in (gamma, beta_c, p_c))
    if reset is not None:
        r4 = reset[:, None, None, None]
        gamma, p_c = torch.where(r4, 0.0, gamma), torch.where(r4, 0.0, p_c)
    cd = torch.stack([c, d], -1)                                              # (B, H, C, 2)
    new_w, new_s = [], []
    for w0, s0, a, dz in zip(weights, momentum, a_list, dz_list):
        # sum_t a_t (x) (c_t dz_t) and sum_t a_t (x) (d_t dz_t) as one matmul, the coefficients on the narrower
        # factor (fewer bytes to scale, and to differentiate in backward): a^T [c dz | d dz] or [c a | d a]^T dz
        if a.shape[-1] < dz.shape[-1]:
            lhs = (a.unsqueeze(-2) * cd.unsqueeze(-1)).flatten(-2)            # (B, H, C, 2 * d_in)
            gc, gd = torch.matmul(lhs.transpose(-1, -2), dz).chunk(2, -2)
        else:
            rhs = (dz.unsqueeze(-2) * cd.unsqueeze(-1)).flatten(-2)           # (B, H, C, 2 * d_out)
            gc, gd = torch.matmul(a.transpose(-1, -2), rhs).chunk(2, -1)
        new_w.append(beta_c * w0 + gamma * s0 - gc)
        new_s.append(p_c * s0 - gd)
    return new_w, new_s


def soft_gate(grad_norm: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """The learned surprise gate g = sigmoid(scale_h * log(grad_norm) + bias_h): grad_norm `(B, H, N)`,
    scale/bias `(H,)` -> `(B, H, N)` in [0, 1]."""
    return torch.sigmoid(scale[:, None] * torch.log(grad_norm + 1e-6) + bias[:, None])


def _write_step(weights: list[Tensor], momentum: list[Tensor], k: Tensor, v: Tensor, eta: Tensor, theta: Tensor,
                alpha: Tensor, gates: Tensor | None, gain: Tensor, gate_scale: Tensor, gate_bias: Tensor,
                activation: str, max_grad_norm: float, impl: str = "reference", coef_impl: str = "reference",
                reset: Tensor | None = None, init_weights: list[Tensor] | None = None):
    """One chunk with the learned soft surprise gate, as one function (compiled whole, so its elementwise work
    fuses across the gradient, gate and update pieces). Returns (new_w, new_s, loss, grad_norm, gate); the last
    three are statistics, detached (gradients reach the gate's parameters through the update). impl, coef_impl:
    the resolved paths of the per-token gradients and of the update coefficients (`_write_impl`). reset `(B,)`
    bool (optional, with init_weights): those rows start the chunk from init_weights and zero momentum (packed
    documents), inside the same compiled function."""
    weights = _reset_weights(weights, reset, init_weights)
    a_list, dz_list, loss, gnorm = token_gradients(weights, k, v, gain, activation, impl)
    g = soft_gate(gnorm, gate_scale.to(gnorm.dtype), gate_bias.to(gnorm.dtype))
    all_gates = g if gates is None else gates * g
    new_w, new_s = _apply_chunk(weights, momentum, a_list, dz_list, gnorm, eta, theta, alpha, all_gates,
                                max_grad_norm, coef_impl, reset)
    # the statistics leave detached: the compiled backward then takes no (zero-filled) gradient for them
    return new_w, new_s, loss.detach(), gnorm.detach(), g.detach()


def _reset_weights(weights: list[Tensor], reset: Tensor | None, init_weights: list[Tensor] | None) -> list[Tensor]:
    """The rows `reset` `(B,)` bool of the fast weights back at `init_weights` (one where per weight tensor)."""
    if reset is None:
        return weights
    r4 = reset[:, None, None, None]
    return [torch.where(r4, w0, w) for w0, w in zip(init_weights, weights)]


_COMPILED: dict[object, object] = {}
# inductor options of memsparse's compiled functions (torch.compile(options=...)); read when each is first compiled
INDUCTOR_OPTIONS: dict[str, object] = {}


def use_compiled(flag: bool, x: Tensor) -> bool:
    """Whether a config's compile flag applies to this call: CUDA training only (inference-mode tensors, as in
    Lightning's validation, don't mix with compiled graphs)."""
    return flag and x.is_cuda and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def compile_cached(fn):
    """fn under torch.compile (static shapes), compiled once and cached."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, options=dict(INDUCTOR_OPTIONS) or None)
    return _COMPILED[fn]


def _read_fn(use: bool):
    """memory_forward, optionally under torch.compile (its elementwise tail and LayerNorm fuse)."""
    return compile_cached(memory_forward) if use else memory_forward


def _chunk_fns(use: bool):
    """(token_gradients, _apply_chunk, _write_step), optionally under torch.compile (with a `gate_fn` the
    gate runs eagerly between the first two; the soft gate of `gate_params` is inside `_write_step`)."""
    fns = (token_gradients, _apply_chunk, _write_step)
    return tuple(compile_cached(f) for f in fns) if use else fns


def write_chunk(state: MemoryState, k: Tensor, v: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor,
                gates: Tensor | None, gain: Tensor, activation: str, max_grad_norm: float, gate_fn=None,
                compiled: bool = False, gate_params: tuple[Tensor, Tensor] | None = None):
    """One chunk-parallel write of C tokens (k, v `(B, H, C, D)`; rates/gates `(B, H, C)`), closed form.

    Tokens are optionally gated by their surprise (multiplied into `gates`): `gate_fn(WriteStats) -> (B, H, C)`
    any function, or `gate_params` = (scale, bias) `(H,)` of `soft_gate`, which runs inside the fused step.
    `compiled` runs the closed-form pieces under torch.compile. Returns (new_state, WriteStats).
    """
    impls = _write_impl(state.weights, k, activation, gate_fn, gate_params)
    new_w, new_s, stats = _chunk_update(state.weights, state.momentum, k, v, eta, theta, alpha, gates, gain,
                                        activation, max_grad_norm, gate_fn, compiled, gate_params, *impls)
    return MemoryState(new_w, new_s, state.step + k.shape[2]), stats


def _write_impl(weights, k, activation, gate_fn, gate_params) -> tuple[str, str]:
    """Once per write: the gate arguments checked and the paths of the per-token gradients and of the update
    coefficients resolved (here, not inside the compiled functions: they read the environment)."""
    if gate_fn is not None and gate_params is not None:
        raise ValueError("give gate_fn or gate_params, not both")
    return grads_impl(weights, k, activation), resolve_coefficients_impl(k)


def _chunk_update(weights, momentum, k, v, eta, theta, alpha, gates, gain, activation, max_grad_norm, gate_fn,
                  compiled, gate_params, impl, coef_impl="reference", reset=None, init_weights=None):
    """write_chunk on the fast weights and momentum alone, `impl` and `coef_impl` from `_write_impl`: (new
    weights, new momentum, WriteStats). reset `(B,)` bool (optional): those rows start from init_weights and zero
    momentum (`write_chunked`)."""
    grads_fn, apply_fn, step_fn = _chunk_fns(compiled)
    if gate_params is not None:
        rk = () if reset is None else (reset, init_weights)  # without a reset: the same call (and graph) as before
        new_w, new_s, loss, gnorm, g = step_fn(weights, momentum, k, v, eta, theta, alpha, gates, gain,
                                               *gate_params, activation, max_grad_norm, impl, coef_impl, *rk)
        return new_w, new_s, WriteStats(loss, gnorm, g)
    weights = _reset_weights(weights, reset, init_weights)
    a_list, dz_list, loss, gnorm = grads_fn(weights, k, v, gain, activation, impl)
    g = None
    if gate_fn is not None:
        g = gate_fn(WriteStats(loss, gnorm))
        gates = g if gates is None else gates * g
    new_w, new_s = apply_fn(weights, momentum, a_list, dz_list, gnorm, eta, theta, alpha, gates, max_grad_norm,
                            coef_impl, *(() if reset is None else (reset,)))
    return new_w, new_s, WriteStats(loss, gnorm, g)


def _check_write_inputs(state: MemoryState, k: Tensor, v: Tensor, rates: dict[str, Tensor],
                        gates: Tensor | None, chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if k.dim() != 4:
        raise ValueError(f"k must be (B, H, N, D), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v dtypes differ: k is {k.dtype}, v is {v.dtype}")
    B, H, N, D = k.shape
    w0 = state.weights[0]
    if w0.shape[0] != B or w0.shape[1] != H or w0.shape[2] != D:
        raise ValueError(f"k (B={B}, H={H}, D={D}) does not match the memory state "
                         f"(B={w0.shape[0]}, H={w0.shape[1]}, D={w0.shape[2]})")
    for name, r in rates.items():
        if r.shape != (B, H, N):
            raise ValueError(f"{name} must be (B, H, N) = {(B, H, N)}, got {tuple(r.shape)}")
    if gates is not None and gates.shape != (B, H, N):
        raise ValueError(f"gates must be (B, H, N) = {(B, H, N)}, got {tuple(gates.shape)}")


def project_heads(qkv: Tensor, r: Tensor, heads: int, qk_norm: bool, lr_max: float):
    """The memory's projections per head: qkv `(B, N, 3 * heads * D)` and rate logits r `(B, N, 3 * heads)` ->
    (q, k, v) `(B, heads, N, D)` and (eta, theta, alpha) `(B, heads, N)`, fp32 (float64 stays), head-major and
    contiguous: every per-chunk slice of them is then a plain strided view (no transposing copies inside the
    per-chunk steps; inductor also failed to generate a kernel for the transposed rate layout fused with the
    soft gate, torch 2.11). Keys and queries L2-normalised when qk_norm. Compiled (`memory.compile`), the casts,
    transposes, normalisations and sigmoids are one kernel forward and one backward."""
    B, N, _ = qkv.shape
    q, k, v = _up(qkv).view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).contiguous()
    if qk_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    r_eta, r_theta, r_alpha = _up(r).view(B, N, 3, heads).permute(2, 0, 3, 1).contiguous()
    return q, k, v, torch.sigmoid(r_eta), lr_max * torch.sigmoid(r_theta), torch.sigmoid(r_alpha)


def causal_depthwise_conv(x: Tensor, weight: Tensor, prev: Tensor | None = None, doc_start: Tensor | None = None,
                          pos: int = 0) -> tuple[Tensor, Tensor]:
    """y_t = sum_j weight[:, K-1-j] * x_{t-j} per channel, j = 0..K-1 (taps into `prev` before the span; a tap on a
    token before `doc_start[b, t]`, another document, counts 0). x `(B, N, C)` of tokens [pos, pos+N), weight
    `(C, K)`, prev `(B, K-1, C)` (None: zeros). Returns (y `(B, N, C)` in x's dtype, the last K-1 rows of x,
    prev included, as the next span's prev)."""
    B, N, C = x.shape
    K = weight.shape[1]
    if prev is None:
        prev = x.new_zeros(B, K - 1, C)
    if prev.shape != (B, K - 1, C):
        raise ValueError(f"conv state must be (B, K-1, C) = {(B, K - 1, C)}, got {tuple(prev.shape)}")
    ext = torch.cat([prev.to(x.dtype), x], 1)                           # (B, K-1+N, C): tokens pos-K+1 .. pos+N-1
    w = weight.to(x.dtype)
    t_abs = None if doc_start is None else torch.arange(pos, pos + N, device=x.device)
    y = None
    for j in range(K):  # K is a handful: K shifted multiply-adds, no im2col
        term = ext[:, K - 1 - j:K - 1 - j + N] * w[:, K - 1 - j]
        if t_abs is not None and j:
            term = term * ((t_abs - j)[None, :] >= doc_start).unsqueeze(-1).to(x.dtype)
        y = term if y is None else y + term
    return y, ext[:, ext.shape[1] - (K - 1):]


def causal_softmax_pool(x: Tensor, score: Tensor, lag_bias: Tensor, prev: Tensor | None = None,
                        doc_start: Tensor | None = None, pos: int = 0) -> Tensor:
    """y_t = sum_j softmax_j(score_h . x_{t-j,h} + lag_bias[h, j]) * x_{t-j,h} per head h, j = 0..K-1: a
    content-addressed pick among the last K tokens (a token of another document, before `doc_start[b, t]`, is left
    out; before the span the taps read `prev`, zeros at a stream's start, as `causal_depthwise_conv`'s do).
    x `(B, N, H*D)` of tokens [pos, pos+N), score `(H, D)`, lag_bias `(H, K)`, prev `(B, K-1, H*D)` (None: zeros).
    Returns y `(B, N, H*D)` in x's dtype."""
    B, N, C = x.shape
    H, K = lag_bias.shape
    D = C // H
    if prev is None:
        prev = x.new_zeros(B, K - 1, C)
    ext = torch.cat([prev.to(x.dtype), x], 1)                                    # tokens pos-K+1 .. pos+N-1
    win = torch.stack([ext[:, K - 1 - j:K - 1 - j + N] for j in range(K)], 2).view(B, N, K, H, D)
    s = (_up(win) * _up(score).view(1, 1, 1, H, D)).sum(-1) + _up(lag_bias).t().view(1, 1, K, H)  # fp32 scores
    if doc_start is not None:
        t_abs = torch.arange(pos, pos + N, device=x.device)
        lag = torch.arange(K, device=x.device)
        other_doc = (t_abs[None, :, None] - lag[None, None, :]) < doc_start[:, :, None]   # (B, N, K); lag 0 never
        s = s.masked_fill(other_doc.unsqueeze(-1), float("-inf"))
    w = torch.softmax(s, dim=2).to(x.dtype)                                       # (B, N, K, H)
    return (w.unsqueeze(-1) * win).sum(2).reshape(B, N, C)


def _up(t: Tensor) -> Tensor:
    """At least fp32 (float64 stays float64, for tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _fp32(*ts):
    return [None if t is None else _up(t) for t in ts]


def write_chunked(state: MemoryState, k: Tensor, v: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, *,
                  gain: Tensor, chunk_size: int, gates: Tensor | None = None, activation: str = "silu",
                  max_grad_norm: float = 1.0, gate_fn=None, compiled: bool = False,
                  gate_params: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None,
                  init_weights: list[Tensor] | None = None) -> tuple[MemoryState, WriteStats]:
    """Write N tokens chunk by chunk (chunk-parallel inside each chunk; a partial last chunk is written).

    k, v `(B, H, N, D)`; eta/theta/alpha/gates `(B, H, N)`; the surprise gate is `gate_fn` or `gate_params`
    (see `write_chunk`). Returns (state, stats with `(B, H, N)` tensors). reset `(B,)` bool (optional, with
    `init_weights`, packed documents): those rows start the write from init_weights and zero momentum, inside the
    first chunk's step (no separate ops over the state); the step counter counts on (`state.step + N`): a caller
    that resets rows sets their step itself (`Block`: once per span).
    """
    _check_write_inputs(state, k, v, {"eta": eta, "theta": theta, "alpha": alpha}, gates, chunk_size)
    with torch.autocast(k.device.type, enabled=False):
        k, v, eta, theta, alpha, gates, gain = _fp32(k, v, eta, theta, alpha, gates, gain)
        stats = []
        weights, momentum = state.weights, state.momentum
        impls = _write_impl(weights, k, activation, gate_fn, gate_params)
        # one split per input, not a slice per chunk (a slice's backward fills a zero tensor of the whole input),
        # and no split at all when one chunk covers the input (even a one-piece split costs a copy in backward)
        one = k.shape[2] <= chunk_size
        pieces = [(t,) if one else t.split(chunk_size, dim=2) for t in (k, v, eta, theta, alpha)]
        gate_pieces = ([None] * len(pieces[0]) if gates is None
                       else (gates,) if one else gates.split(chunk_size, dim=2))
        for kc, vc, ec, tc, ac, gc in zip(*pieces, gate_pieces):
            weights, momentum, st = _chunk_update(weights, momentum, kc, vc, ec, tc, ac, gc, gain, activation,
                                                  max_grad_norm, gate_fn, compiled, gate_params, *impls,
                                                  reset, init_weights)
            reset = None  # the first chunk only
            stats.append(st)
        state = MemoryState(weights, momentum, state.step + k.shape[2])
    if not stats:
        empty = k.new_zeros(k.shape[:3])
        return state, WriteStats(empty, empty, None if gate_fn is None and gate_params is None else empty)
    if len(stats) == 1:
        return state, stats[0]
    gate = None if stats[0].gate is None else torch.cat([st.gate for st in stats], -1)
    return state, WriteStats(torch.cat([st.loss for st in stats], -1), torch.cat([st.grad_norm for st in stats], -1),
                             gate)


def write_sequential_reference(state: MemoryState, k: Tensor, v: Tensor, eta: Tensor, theta: Tensor,
                               alpha: Tensor, *, gain: Tensor, chunk_size: int, gates: Tensor | None = None,
                               activation: str = "silu", max_grad_norm: float = 1.0, gate_fn=None,
                               gate_params: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None,
                               init_weights: list[Tensor] | None = None) -> MemoryState:
    """The same write, token by token with autograd gradients taken at each chunk's start weights.

    With chunk_size=1 this is the exact Titans recurrence (gradient at the current weights). reset, init_weights
    as in `write_chunked` (here literally: the rows' weights and momentum replaced before the first token).
    """
    if reset is not None:
        r4 = reset[:, None, None, None]
        state = MemoryState([torch.where(r4, w0, w) for w0, w in zip(init_weights, state.weights)],
                            [torch.where(r4, 0.0, m) for m in state.momentum], state.step)
    if gate_fn is not None and gate_params is not None:
        raise ValueError("give gate_fn or gate_params, not both")
    if gate_params is not None:
        def gate_fn(st: WriteStats, _p=gate_params) -> Tensor:
            return soft_gate(st.grad_norm, _p[0].to(st.grad_norm.dtype), _p[1].to(st.grad_norm.dtype))
    _check_write_inputs(state, k, v, {"eta": eta, "theta": theta, "alpha": alpha}, gates, chunk_size)
    k, v, eta, theta, alpha, gates, gain = _fp32(k, v, eta, theta, alpha, gates, gain)
    W = list(state.weights)
    S = list(state.momentum)
    N = k.shape[2]
    outer_grad = torch.is_grad_enabled()
    if not outer_grad:  # no graph wanted: views of parameters made under no_grad may still say requires_grad
        W, S = [w.detach() for w in W], [m.detach() for m in S]
        k, v, eta, theta, alpha, gain = (t.detach() for t in (k, v, eta, theta, alpha, gain))
        gates = None if gates is None else gates.detach()
    with torch.enable_grad():
        for c0 in range(0, N, chunk_size):
            W0 = [w if w.requires_grad else w.detach().requires_grad_(True) for w in W]
            W = list(W0)
            sl = slice(c0, min(c0 + chunk_size, N))
            if gate_fn is not None:  # surprise of every token of the chunk at the chunk-start weights
                y = memory_forward(W0, k[:, :, sl], gain, activation)
                cl = 0.5 * (y - v[:, :, sl]).pow(2).sum(-1)
                cn = []
                for t in range(sl.start, sl.stop):
                    lt = 0.5 * (memory_forward(W0, k[:, :, t:t + 1], gain, activation) - v[:, :, t:t + 1]).pow(2).sum()
                    gt = torch.autograd.grad(lt, W0, create_graph=True)
                    cn.append(torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in gt) + 1e-20))
                cg = gate_fn(WriteStats(cl, torch.stack(cn, -1)))
                gates_chunk = cg if gates is None else gates[:, :, sl] * cg
            else:
                gates_chunk = None if gates is None else gates[:, :, sl]
            for t in range(c0, min(c0 + chunk_size, N)):
                y = memory_forward(W0, k[:, :, t:t + 1], gain, activation)
                loss = 0.5 * (y - v[:, :, t:t + 1]).pow(2).sum()
                grads = torch.autograd.grad(loss, W0, create_graph=True)
                gn = torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in grads) + 1e-20)  # (B, H)
                clip = torch.clamp(max_grad_norm / (gn + 1e-6), max=1.0)
                g_t = None if gates_chunk is None else gates_chunk[:, :, t - c0]
                e, th, al, rho = _effective_rates(eta[:, :, t], theta[:, :, t], alpha[:, :, t], g_t, clip)
                e, th, al, rho = (x[..., None, None] for x in (e, th, al, rho))
                S = [e * s - th * g for s, g in zip(S, grads)]
                W = [(1 - al) * w + rho * s for w, s in zip(W, S)]
    if not outer_grad:
        W, S = [w.detach() for w in W], [m.detach() for m in S]
    return MemoryState(W, S, state.step + N)


# ----------------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MemoryInputs:
    """Projected inputs of the memory for N tokens: q, k, v `(B, H, N, D)`; eta, theta, alpha `(B, H, N)`."""

    q: Tensor
    k: Tensor
    v: Tensor
    eta: Tensor
    theta: Tensor
    alpha: Tensor

    def slice(self, sl: slice) -> MemoryInputs:
        return MemoryInputs(self.q[:, :, sl], self.k[:, :, sl], self.v[:, :, sl], self.eta[:, :, sl],
                            self.theta[:, :, sl], self.alpha[:, :, sl])

    def split_writes(self, size: int) -> list[MemoryInputs]:
        """k, v and rates in consecutive pieces of `size` tokens (q left empty). One split, not a slice per
        piece: autograd then assembles each input's gradient in one concatenation instead of a full-size
        zero tensor plus an add per slice."""
        ks, vs, es, ts, als = (t.split(size, dim=2) for t in (self.k, self.v, self.eta, self.theta, self.alpha))
        q0 = self.q[:, :, :0]
        return [MemoryInputs(q0, *parts) for parts in zip(ks, vs, es, ts, als)]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Neural long-term memory over model width `dim`: projections, learned rates, the fast-weight MLP.

    Outer (slow) parameters: q/k/v projections, the eta/theta/alpha nets, the memory's initial fast
    weights and output gain, the output projection. Fast weights live in `MemoryState`.
    """

    def __init__(self, dim: int, config: MemoryConfig):
        super().__init__()
        self.config = config.validate()
        H, D = config.heads, config.head_dim
        self.dim, self.heads, self.head_dim = dim, H, D
        self.to_qkv = nn.Linear(dim, 3 * H * D, bias=False)
        self.to_rates = nn.Linear(dim, 3 * H)
        with torch.no_grad():
            self.to_rates.weight.mul_(0.1)
            b = self.to_rates.bias.view(3, H)
            b[0].fill_(_logit(config.momentum_init))
            b[1].fill_(_logit(config.lr_init / config.lr_max))
            b[2].fill_(_logit(config.forget_init))
        dims = [D] + [D * config.expansion] * (config.depth - 1) + [D]
        self.init_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(H, dims[i], dims[i + 1]) / math.sqrt(dims[i])) for i in range(config.depth)]
        )
        self.gain = nn.Parameter(torch.full((H, D), 1 / math.sqrt(D)))
        self.out = nn.Linear(H * D, dim, bias=False)
        # Titans (sec. 4.4) follows modern linear RNNs with a short depthwise convolution after the q/k/v
        # projections: a key then also sees the tokens just before it, so "what came before" -> "what came next"
        # is one association. Initialised to the identity (last tap 1): the model starts as without it; or
        # (conv_init "random") as nn.Conv1d's depthwise default, U(-1/sqrt(K), 1/sqrt(K)), as the short
        # convolutions of delta-rule models start, every tap already mixing in the tokens before; or (conv_init
        # "box") every q/k tap 1/sqrt(K) and v the identity: a query then holds each token of the last K whatever
        # its lag, so a key several tokens back (RULER's question) is in it from the first step, and a value is
        # still its own token.
        self.conv_weight = None
        if config.conv:
            w = torch.zeros(3 * H * D, config.conv)
            if config.conv_init == "random":
                w.uniform_(-config.conv ** -0.5, config.conv ** -0.5)
            elif config.conv_init == "box":  # channels: q, k, v (H * D each)
                w[: 2 * H * D] = config.conv ** -0.5
                w[2 * H * D:, -1] = 1.0
            else:
                w[:, -1] = 1.0
            self.conv_weight = nn.Parameter(w)
        # query_pool: the queries pick among the last K tokens by content (a learned score per head), so that an
        # asked name several tokens back (RULER's niah_multikey question) can enter the query whatever its lag;
        # zeros: the pick starts as the mean of the last K tokens' query projections
        self.pool_score = self.pool_lag_bias = None
        if config.query_pool:
            self.pool_score = nn.Parameter(torch.zeros(H, D))
            self.pool_lag_bias = nn.Parameter(torch.zeros(H, config.conv))

    # -- state ------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> MemoryState:
        """Fresh per-sequence state: fast weights = the learned initial weights (differentiable), momentum 0."""
        weights = self.initial_weights(batch_size, device)
        momentum = [torch.zeros_like(w) for w in weights]
        return MemoryState(weights, momentum, torch.zeros(batch_size, dtype=torch.long, device=weights[0].device))

    def initial_weights(self, batch_size: int, device=None) -> list[Tensor]:
        """The learned initial fast weights, expanded (views, no copy) to `(batch_size, H, d_in, d_out)` fp32: the
        weights of `init_state`, without its momentum and step."""
        device = device or self.gain.device
        return [_up(w).to(device).unsqueeze(0).expand(batch_size, *w.shape) for w in self.init_weights]

    # -- projections ------------------------------------------------------------------------------------
    def project(self, x: Tensor) -> MemoryInputs:
        """x `(B, N, dim)` -> MemoryInputs (keys/queries L2-normalised per head when qk_norm), for tokens with
        nothing before them (the short convolution, if any, sees zeros there)."""
        return self.project_stream(x)[0]

    def project_stream(self, x: Tensor, prev: Tensor | None = None, doc_start: Tensor | None = None,
                       pos: int = 0, src: Tensor | None = None) -> tuple[MemoryInputs, Tensor | None]:
        """x `(B, N, dim)` = tokens [pos, pos+N) -> (MemoryInputs, conv state). With `memory.conv` = K taps:
        prev `(B, K-1, 3*H*D)` is the state of the K-1 tokens before x (the last return; None: zeros), and
        doc_start `(B, N)` (packed documents: each token's document's first absolute position) keeps a tap off
        tokens of an earlier document. The returned state holds the K-1 last tokens' pre-convolution q/k/v;
        None without a convolution. src `(B, N, dim)` (`memory.write_input: embeddings`): the same tokens' input
        to the keys, values and write rates; the queries stay x's."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, dim={self.dim}), got {tuple(x.shape)}")
        if src is None:
            qkv, rates_in = self.to_qkv(x), x
        else:
            if src.shape != x.shape:
                raise ValueError(f"src must have x's shape {tuple(x.shape)}, got {tuple(src.shape)}")
            hd = self.heads * self.head_dim
            w = self.to_qkv.weight
            qkv, rates_in = torch.cat([F.linear(x, w[:hd]), F.linear(src, w[hd:])], -1), src
        state = None
        if self.conv_weight is not None:
            raw = qkv
            qkv, state = causal_depthwise_conv(qkv, self.conv_weight, prev, doc_start, pos)
            if self.pool_score is not None:
                hd = self.heads * self.head_dim
                q = causal_softmax_pool(raw[..., :hd], self.pool_score, self.pool_lag_bias,
                                        None if prev is None else prev[..., :hd], doc_start, pos)
                qkv = torch.cat([q, qkv[..., hd:]], -1)
        tail = compile_cached(project_heads) if self._compiled(x) else project_heads
        return MemoryInputs(*tail(qkv, self.to_rates(rates_in), self.heads, self.config.qk_norm,
                                  self.config.lr_max)), state

    def conv_state(self, batch_size: int, device=None) -> Tensor | None:
        """The convolution state before the first token: zeros `(B, K-1, 3*H*D)`; None without a convolution."""
        if self.conv_weight is None:
            return None
        return torch.zeros(batch_size, self.config.conv - 1, self.conv_weight.shape[0], device=device)

    # -- read / write -----------------------------------------------------------------------------------
    def read(self, state: MemoryState, q: Tensor) -> Tensor:
        """q `(B, H, N, D)` -> M(q) `(B, H, N, D)` in fp32 (read with the state as it stands)."""
        return self._read_weights(state.weights, q)

    def _read_weights(self, weights: list[Tensor], q: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            return _read_fn(self._compiled(q))(weights, _up(q), _up(self.gain), self.config.activation)

    def read_segments(self, states: list[MemoryState], queries: list[Tensor]) -> Tensor:
        """Read piece i of the queries with states[i]: queries[i] `(B, H, n_i, D)` -> `(B, H, sum n_i, D)` fp32.

        Equal to concatenating `read(states[i], queries[i])`, but pieces of equal length are read in one
        batched call (their fast weights stacked), so a span of many segments costs a few launches, not one
        set per segment.
        """
        y = self._read_pieces(states, queries)
        return y if y.dim() == 4 else y.transpose(1, 2).flatten(2, 3)

    def read_out(self, states: list[MemoryState], queries: list[Tensor], init_mask: Tensor | None = None,
                 init_weights: list[Tensor] | None = None, all_queries: Tensor | None = None) -> Tensor:
        """`merge_heads(read_segments(states, queries))` `(B, sum n_i, dim)`, with one copy (layout and cast to
        the projection's input dtype together) between the reads and the output projection. `init_mask`
        `(B, sum n_i)` bool (packed documents): those tokens read the initial memory instead (their document has
        nothing written yet); `init_weights` (optional) are those of `initial_weights`, `all_queries` (optional)
        the queries' concatenation, when the caller has them (saves building them again). With n > 1 pieces of
        equal length, the initial memory is read in the pieces' batched call (`_read_with_initial`)."""
        if init_mask is not None and len(queries) > 1 and len({q.shape[2] for q in queries}) == 1:
            y = self._read_with_initial(states, queries, init_mask, init_weights, all_queries)
        else:
            y = self._read_pieces(states, queries)
        if init_mask is not None and y.dim() == 4:
            q = all_queries if all_queries is not None else torch.cat(queries, 2) if len(queries) > 1 else queries[0]
            init_weights = self.initial_weights(q.shape[0], q.device) if init_weights is None else init_weights
            y = torch.where(init_mask[:, None, :, None], self._read_weights(init_weights, q), y)
        if y.dim() == 5:  # (B, n, H, m, D): the batched read of n equal pieces of m tokens
            B, n, H, m, D = y.shape
            return self.out(self._to_proj_input(y.permute(0, 1, 3, 2, 4)).view(B, n * m, H * D))
        return self.merge_heads(y)

    def _read_with_initial(self, states: list[MemoryState], queries: list[Tensor], init_mask: Tensor,
                           init_weights: list[Tensor] | None, all_queries: Tensor | None) -> Tensor:
        """n pieces of m tokens read with their states, and every token read with the initial weights, in one
        batched call of 2n weight sets (the initial weights stacked n times: views unbound from one expand, so
        backward sums their gradients in one stack and one sum); each token keeps the initial read where
        init_mask `(B, n * m)` says so. `(B, n, H, m, D)` fp32, the batched read's layout (`_read_pieces`)."""
        B, H, m, D = queries[0].shape
        n = len(queries)
        q = all_queries if all_queries is not None else torch.cat(queries, 2)
        init_weights = self.initial_weights(B, q.device) if init_weights is None else init_weights
        weights = [torch.stack([s.weights[j] for s in states] + list(w0.unsqueeze(1).expand(B, n, *w0.shape[1:])
                                                                     .unbind(1)), 1).flatten(0, 1)
                   for j, w0 in enumerate(init_weights)]                                # (B * 2n, H, d_in, d_out)
        # the queries in the pieces' layout, twice: one copy, whose backward is one sum
        q2 = q.unflatten(2, (n, m)).transpose(1, 2).unsqueeze(1).expand(B, 2, n, H, m, D).reshape(B * 2 * n, H, m, D)
        y = self._read_weights(weights, q2).unflatten(0, (B, 2, n))                     # (B, 2, n, H, m, D)
        return torch.where(init_mask.view(B, n, 1, m, 1), y[:, 1], y[:, 0])

    def _to_proj_input(self, y: Tensor) -> Tensor:
        """y contiguous in the dtype the output projection computes in (autocast's, else its weight's)."""
        dev = y.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.out.weight.dtype
        # one copy either way (`.to` ignores memory_format when the dtype already matches)
        return y.contiguous() if y.dtype == dtype else y.to(dtype, memory_format=torch.contiguous_format)

    def _read_pieces(self, states: list[MemoryState], queries: list[Tensor]) -> Tensor:
        """read_segments' reads: `(B, H, N, D)`, or `(B, n, H, m, D)` when the pieces are n reads of m tokens,
        in order, read in one batched call (left in that layout for the caller's one copy)."""
        if len(states) != len(queries):
            raise ValueError(f"{len(states)} states for {len(queries)} query pieces")
        if not queries:
            raise ValueError("read_segments needs at least one query piece")
        if len(queries) == 1:
            return self.read(states[0], queries[0])
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q.shape[2], []).append(i)
        out: list[Tensor | None] = [None] * len(queries)
        for idx in groups.values():
            if len(idx) == 1:
                out[idx[0]] = self.read(states[idx[0]], queries[idx[0]])
                continue
            B, H = queries[idx[0]].shape[:2]
            n = len(idx)
            weights = [torch.stack([states[i].weights[j] for i in idx], 1).flatten(0, 1)
                       for j in range(len(states[idx[0]].weights))]
            q = torch.stack([queries[i] for i in idx], 1).flatten(0, 1)              # (B * n, H, n_i, D)
            y = self._read_weights(weights, q).unflatten(0, (B, n))               # (B, n, H, n_i, D)
            if n == len(queries):  # one group, in order
                return y
            # unbind, not y[:, j]: its backward is one stack, not a zero tensor of y's size per piece
            for i, piece in zip(idx, y.unbind(1)):
                out[i] = piece
        return torch.cat(out, dim=2)

    def _compiled(self, x: Tensor) -> bool:
        return use_compiled(self.config.compile, x)

    def write(self, state: MemoryState, inputs: MemoryInputs, gates: Tensor | None = None, *,
              chunk_size: int | None = None, impl: str = "chunked",
              gate_fn=None, gate_params: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None,
              init_weights: list[Tensor] | None = None) -> tuple[MemoryState, WriteStats | None]:
        """Write the tokens of `inputs` (keys/values/rates) into `state`; gates `(B, N)` or `(B, H, N)` in [0, 1].

        impl "chunked" (training path) or "sequential" (reference; returns stats None). `gate_fn(WriteStats)`
        gates tokens by their surprise at the chunk-start weights (the model's surprise gate); `gate_params`
        (scale, bias) `(H,)` is the learned `soft_gate`, fused into the chunk step. reset `(B,)` bool (packed
        documents): those rows start from the initial weights (`init_weights`, default `initial_weights`) and
        zero momentum, folded into the write; their step is left to the caller (`write_chunked`).
        """
        chunk_size = self.config.chunk_size if chunk_size is None else chunk_size
        gates = self._expand_gates(gates, inputs.k)
        if reset is not None and init_weights is None:
            init_weights = self.initial_weights(inputs.k.shape[0], inputs.k.device)
        kw = dict(gain=self.gain, chunk_size=chunk_size, gates=gates, activation=self.config.activation,
                  max_grad_norm=self.config.max_grad_norm, gate_fn=gate_fn, gate_params=gate_params, reset=reset,
                  init_weights=init_weights)
        if impl == "chunked":
            return write_chunked(state, inputs.k, inputs.v, inputs.eta, inputs.theta, inputs.alpha,
                                 compiled=self._compiled(inputs.k), **kw)
        if impl == "sequential":
            return write_sequential_reference(state, inputs.k, inputs.v, inputs.eta, inputs.theta, inputs.alpha,
                                              **kw), None
        raise ValueError(f"impl must be 'chunked' or 'sequential', got {impl!r}")

    def surprise(self, state: MemoryState, inputs: MemoryInputs) -> WriteStats:
        """Each candidate token's surprise (loss and gradient norm at the current weights), `(B, H, N)`."""
        with torch.autocast(inputs.k.device.type, enabled=False):
            _, _, loss, gnorm = token_gradients(state.weights, _up(inputs.k), _up(inputs.v),
                                                _up(self.gain), self.config.activation)
        return WriteStats(loss, gnorm)

    def _expand_gates(self, gates: Tensor | None, k: Tensor) -> Tensor | None:
        if gates is None:
            return None
        B, H, N, _ = k.shape
        if gates.dim() == 2:
            if gates.shape != (B, N):
                raise ValueError(f"gates must be (B, N) = {(B, N)} or (B, H, N), got {tuple(gates.shape)}")
            gates = gates[:, None, :].expand(B, H, N)
        return _up(gates)

    def merge_heads(self, y: Tensor) -> Tensor:
        """(B, H, N, D) -> output projection `(B, N, dim)`."""
        B, H, N, D = y.shape
        return self.out(self._to_proj_input(y.transpose(1, 2)).view(B, N, H * D))

    # -- the memory layer on its own ----------------------------------------------------------------------
    def forward(self, x: Tensor, state: MemoryState | None = None, gates: Tensor | None = None,
                chunk_size: int | None = None) -> tuple[Tensor, MemoryState]:
        """Memory as a layer: each chunk reads the memory as it stood before the chunk, then is written.

        x `(B, N, dim)` -> (out `(B, N, dim)`, final state).
        """
        chunk_size = self.config.chunk_size if chunk_size is None else chunk_size
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        state = self.init_state(x.shape[0], x.device) if state is None else state
        inp = self.project(x)
        gates = self._expand_gates(gates, inp.k)
        reads = []
        for c0 in range(0, x.shape[1], chunk_size):
            sl = slice(c0, c0 + chunk_size)
            chunk = inp.slice(sl)
            reads.append(self.read(state, chunk.q))
            state, _ = self.write(state, chunk, None if gates is None else gates[:, :, sl], chunk_size=chunk_size)
        y = torch.cat(reads, dim=2)
        return self.merge_heads(y.to(x.dtype)), state
