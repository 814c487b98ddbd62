"""A plain textbook causal transformer (dense SDPA attention, RMSNorm, SwiGLU MLP, rotary positions): the baseline
the learnability guard trains beside MemSparseLM. It exposes what `memsparse.eval.harness.stream_generate` calls
(`config.segment`, `init_state`, `stream`, `generate`); its state is simply the tokens seen so far."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def rotary(x, theta=10000.0):
    """Rotate-half rotary embedding of x `(B, H, L, D)` at positions 0..L-1."""
    d = x.shape[-1]
    pos = torch.arange(x.shape[2], dtype=torch.float32, device=x.device)
    ang = pos[:, None] / theta ** (torch.arange(0, d, 2, device=x.device) / d)[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads, self.norm1, self.norm2 = heads, nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.out(o.transpose(1, 2).reshape(B, L, C))
        a, b = self.w12(self.norm2(x)).chunk(2, -1)
        return x + self.w3(F.silu(a) * b)


class ReferenceLM(nn.Module):
    """Decoder-only LM: forward(ids `(B, L)`, labels `(B, L)` aligned, -100 ignored) -> namespace(loss, logits)."""

    def __init__(self, vocab_size=259, dim=64, depth=2, heads=4, hidden=172):
        super().__init__()
        self.config = SimpleNamespace(segment=1, vocab_size=vocab_size)
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)

    def forward(self, input_ids, labels=None, return_logits=True):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.norm(x) @ self.embed.weight.t()
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return SimpleNamespace(loss=loss, logits=logits)

    def init_state(self, batch_size=1, total_length=None, device=None):
        return torch.zeros(batch_size, 0, dtype=torch.long, device=device or self.embed.weight.device)

    @torch.no_grad()
    def stream(self, input_ids, state=None, return_logits="all"):
        """Append input_ids `(B, n)` to the state; recompute the whole prefix -> (logits all | last | None, state)."""
        state = torch.cat([self.init_state(len(input_ids)) if state is None else state, input_ids], 1)
        logits = self(state).logits[:, -input_ids.shape[1]:]
        return {"all": logits, "last": logits[:, -1:], "none": None}[return_logits], state

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, *, eos_id=None, state=None):
        """Greedy decoding after the prompt -> (new ids `(B, m)`, state)."""
        logits, state = self.stream(input_ids, state, return_logits="last")
        out = []
        for _ in range(max_new_tokens):
            out.append(logits[:, -1].argmax(-1))
            if eos_id is not None and bool((torch.stack(out, 1) == eos_id).any(1).all()):
                break
            logits, state = self.stream(out[-1][:, None], state, return_logits="last")
        return (torch.stack(out, 1) if out else input_ids[:, :0]), state
