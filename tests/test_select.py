"""Block selection, budget policies and the reference block-sparse attention (vs a float64 dense oracle)."""

import math

import pytest
import torch
from memsparse.kernels import (
    LengthScaled,
    attention_flops,
    dense_block_mask,
    parse_policy,
    select_blocks,
    sparse_attention_reference,
)


def dense_oracle(q, k, v, mask, scale):
    """float64 masked softmax attention; fully masked rows -> 0. mask (B, Hkv, Lq, Lk)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    m = mask.repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~m, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, torch.logsumexp(s, -1)


def random_lists(B, Hkv, nq, nk, mb, gen):
    idx = torch.randint(0, nk, (B, Hkv, nq, mb), generator=gen).sort(-1).values  # duplicates likely
    cnt = torch.randint(0, mb + 1, (B, Hkv, nq), generator=gen)
    idx[..., -1] = -1 * (cnt < mb)[..., None].squeeze(-1)  # padding values beyond count are ignored
    return idx.int(), cnt.int()


@pytest.mark.parametrize("G,D,bs,Lq,Lk", [(1, 64, 16, 50, 50), (2, 128, 16, 37, 70), (4, 64, 32, 65, 65),
                                          (2, 16, 8, 1, 29), (1, 32, 64, 100, 130)])
def test_reference_equals_dense_oracle(G, D, bs, Lq, Lk):
    gen = torch.Generator().manual_seed(G * 1000 + Lq)
    B, Hkv = 2, 2
    q = torch.randn(B, Hkv * G, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    idx, cnt = random_lists(B, Hkv, nq, nk, min(4, nk), gen)
    cnt[0, 0, 0] = 0  # an empty list
    scale = D ** -0.5
    out, lse = sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, return_lse=True)
    ref, ref_lse = dense_oracle(q, k, v, dense_block_mask(idx, cnt, Lq, Lk, bs), scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-6)
    assert torch.isinf(lse[~finite]).all() and (lse[~finite] < 0).all()
    # gradients (incl. through lse), no NaN anywhere
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o, l = sparse_attention_reference(qq, kk, vv, idx, cnt, block_size=bs, return_lse=True)
    (o.sum() + torch.where(torch.isfinite(l), l, torch.zeros_like(l)).sum()).backward()
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    o2, l2 = dense_oracle(q2, k2, v2, dense_block_mask(idx, cnt, Lq, Lk, bs), scale)
    (o2.sum() + torch.where(torch.isfinite(l2), l2, torch.zeros_like(l2)).sum()).backward()
    for a, b in ((qq, q2), (kk, k2), (vv, v2)):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8)


def test_reference_rejects_bad_input():
    q, k = torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4)
    idx, cnt = torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        sparse_attention_reference(q, k, k, idx, cnt, block_size=8)
    with pytest.raises(ValueError, match="block_indices must be"):
        sparse_attention_reference(torch.randn(1, 2, 8, 4), k, k, idx[:, :1], cnt, block_size=8)
    with pytest.raises(ValueError, match="longer than k"):
        sparse_attention_reference(torch.randn(1, 2, 9, 4), k, k, idx, cnt, block_size=8)


def _qk(L, Lk=None, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, L, D, generator=g), torch.randn(1, Hkv, Lk or L, D, generator=g)


def test_dense_policy_is_full_causal_attention():
    q, k = _qk(70)
    idx, cnt = select_blocks(q, k, block_size=16, policy="dense")
    torch.testing.assert_close(dense_block_mask(idx, cnt, 70, 70, 16),
                               torch.ones(70, 70, dtype=torch.bool).tril().expand(1, 2, 70, 70))
    # Lq < Lk: queries aligned to the end
    q, k = _qk(20, 90)
    idx, cnt = select_blocks(q, k, block_size=16, policy="dense")
    assert (dense_block_mask(idx, cnt, 20, 90, 16) == torch.ones(90, 90, dtype=torch.bool).tril()[-20:]).all()


def test_fixed_keeps_exactly_k():
    q, k = _qk(160)
    idx, cnt = select_blocks(q, k, block_size=16, policy="fixed:3")
    visible = torch.arange(1, 11)
    assert cnt[0, 0].tolist() == torch.clamp(visible, max=3).tolist()
    for m in range(10):  # sorted, unique, causal, diagonal + sink always kept
        row = idx[0, 1, m, : cnt[0, 1, m]].tolist()
        assert row == sorted(set(row)) and row[-1] == m and row[0] == 0 and all(0 <= j <= m for j in row)


def test_top_p_holds_mass_and_respects_bounds():
    q, k = _qk(256, D=32, seed=3)
    p = 0.8
    idx, cnt, info = select_blocks(q, k, block_size=16, policy=f"top_p:p={p},min=2,max=9", return_info=True)
    mass = torch.softmax(info["scores"].masked_fill(
        torch.arange(16)[None, :] > torch.arange(16)[:, None], -math.inf), -1)
    for h in range(2):
        for m in range(16):
            c = int(cnt[0, h, m])
            assert min(2, m + 1) <= c <= 9
            if c < 9 and c > min(2, m + 1):  # not clamped by a bound: the kept set holds >= p of the mass
                kept = idx[0, h, m, :c].long()
                assert mass[0, h, m, kept].sum() >= p - 1e-6


def test_top_p_forced_mass_0_counts_the_candidates_only():
    """A sink block whose pooled score dominates holds p of the mass alone: with forced_mass=1 (the default)
    top_p keeps the forced blocks only; with forced_mass=0 the candidates' own mass decides, so it keeps more."""
    q, k = _qk(256, D=32, seed=3)
    q[..., 0] += 3.0  # every query leans on dimension 0, and the sink block's keys (block 0) lie along it
    k[:, :, :16, 0] = 20.0
    kw = dict(block_size=16, return_info=True)
    _, cnt1, info = select_blocks(q, k, policy="top_p:p=0.8,min=1", **kw)
    _, cnt0, _ = select_blocks(q, k, policy="top_p:p=0.8,min=1,forced_mass=0", **kw)
    late = slice(8, 16)  # query blocks with several candidates
    assert torch.equal(cnt1[..., late], info["forced_blocks"][late].expand_as(cnt1[..., late]).int())
    assert bool((cnt0[..., late] > cnt1[..., late]).all())
    assert parse_policy("top_p:p=0.8,forced_mass=0").spec() == "top_p:p=0.8,min=1,forced_mass=0"
    with pytest.raises(ValueError, match="forced_mass 0 or 1"):
        parse_policy("top_p:p=0.8,forced_mass=2")


def test_length_scaled_keeps_smaller_fraction_when_longer():
    pol = LengthScaled(c=8.0, min_tokens=32)
    fracs = []
    for L in (256, 1024, 4096):
        q, k = _qk(L, D=16)
        idx, cnt, info = select_blocks(q, k, block_size=16, policy=pol, return_info=True)
        fracs.append(float(cnt[..., -1].double().mean() / info["visible_blocks"][-1]))
    assert fracs[0] > fracs[1] > fracs[2]
    assert fracs[2] < 0.2


def test_selection_is_causal():
    """A block's selection never depends on its own or later queries (pooled previous-block queries)."""
    q, k = _qk(128, D=16, seed=5)
    idx, cnt = select_blocks(q, k, block_size=16, policy="fixed:3")
    q2 = q.clone()
    q2[:, :, 64:] = torch.randn_like(q2[:, :, 64:]) * 10  # blocks 4.. change
    idx2, cnt2 = select_blocks(q2, k, block_size=16, policy="fixed:3")
    assert torch.equal(idx[:, :, :5], idx2[:, :, :5])  # block 4 is chosen by block 3's queries


def test_window_and_sink_blocks():
    q, k = _qk(128)
    mkb = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    idx, cnt = select_blocks(q, k, block_size=16, policy="dense", min_key_block=mkb, sink_blocks=1)
    for m in range(8):
        row = set(idx[0, 0, m, : cnt[0, 0, m]].tolist())
        assert row == {0} | set(range(int(mkb[m]), m + 1))


def test_parse_policy_and_flops():
    assert parse_policy("fixed:16").k == 16
    assert parse_policy("top_p:p=0.95,min=2,max=64").max == 64
    assert parse_policy("length_scaled:c=10,min_tokens=128").min_tokens == 128
    for bad, msg in (("nope", "unknown budget policy"), ("fixed:k=x", "not a number"),
                     ("top_p:q=1", "no argument"), ("top_p:p=1.5", "0 < p <= 1"), ("", "non-empty")):
        with pytest.raises(ValueError, match=msg):
            parse_policy(bad)
    assert attention_flops(torch.tensor([[2, 3]]), 16, 64, 2) == 5 * 4 * 16 * 16 * 64 * 2


def test_host_width_hint_gives_the_same_selection():
    q, k = _qk(256, D=16, seed=7)
    mkb = torch.clamp(torch.arange(16) - 4, min=0)  # a window of 5 blocks
    for pol in ("dense", "fixed:3", "length_scaled:c=4,min_tokens=16", "top_p:p=0.8"):
        a_idx, a_cnt = select_blocks(q, k, block_size=16, policy=pol, min_key_block=mkb)
        b_idx, b_cnt = select_blocks(q, k, block_size=16, policy=pol, min_key_block=mkb, max_visible_blocks=6)
        assert torch.equal(a_cnt, b_cnt) and b_idx.shape[-1] <= 6
        w = b_idx.shape[-1]
        assert torch.equal(a_idx[..., :w].masked_fill(a_idx[..., :w] < 0, -1), b_idx)


@pytest.mark.parametrize("L", [64, 100, 16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_pool_is_the_mean_of_each_block(L, dtype):
    """Block means in fp32 (the last, partial block averaged over its own rows), from any layout of keys."""
    from memsparse.kernels.block_select import block_pool

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, L, generator=g).to(dtype).transpose(1, 3)  # (2, L, 3, 5) -> (2, 3, L, 5)-ish view
    x = x.transpose(1, 2)                                                  # (2, 3, L, 5), not contiguous
    got = block_pool(x, 16)
    xd = x.double()
    want = torch.stack([xd[:, :, i:i + 16].mean(2) for i in range(0, L, 16)], 2)
    assert got.dtype == torch.float32 and got.shape == (2, 3, math.ceil(L / 16), 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
