"""Fused Triton block selection (through TRITON_INTERPRET=1) against the PyTorch `select_blocks`.

Every case runs both paths on the same inputs and checks the counts, the exact index lists (ascending, -1
padded, the same width) and the return_info dict. Outputs are poisoned first (POISON_OUTPUTS), so an element
the kernel fails to write fails the comparison. Scores are random and tie-free (checked), except the +inf of
forced and -inf of other blocks; the one place those ties matter (non-causal, where every block from the
diagonal on is forced and a capped count cuts among them: torch.topk's pick is unspecified there) is compared
up to the forced ties, and the kernel's pick is checked against its stated rule (lower index first).

On a GPU the same checks run compiled (inputs made on the CPU, moved to the device):
    TRITON_INTERPRET=0 MEMSPARSE_SELECT_TEST_DEVICE=cuda python -m pytest tests/test_select_triton.py -m ''
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from memsparse.kernels import block_select_triton as tri  # noqa: E402
from memsparse.kernels import select_blocks  # noqa: E402
from memsparse.kernels.block_select import list_width, resolve_impl  # noqa: E402
from memsparse.kernels.budget import Fixed, parse_policy  # noqa: E402

DEV = os.environ.get("MEMSPARSE_SELECT_TEST_DEVICE", "cpu")
POLICIES = ["dense", "fixed:1", "fixed:3", "length_scaled:c=3,min_tokens=16", "length_scaled:c=4,min_tokens=0",
            "length_scaled:c=0.9,min_tokens=0,exponent=1", "length_scaled:c=2,min_tokens=8,exponent=0.7",
            "top_p:p=0.9", "top_p:p=0.6,min=2,max=5", "top_p:p=0.8,min=1,min_c=1,max_c=4", "top_p:p=1.0",
            "top_p:p=0.05,min=0", "top_p:p=0.95,min=3,max_c=6", "top_p:p=0.8,min=1,forced_mass=0",
            "top_p:p=0.6,min=2,max=5,forced_mass=0"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)


def _masks(nq, nk, bs, Lq, Lk, B, causal, sink, local, min_key_block=None, min_key=None):
    """allowed, forced `(B, NQ, NK)` bool from the rules in select_blocks' docstring, one element at a time."""
    allowed = torch.zeros(B, nq, nk, dtype=torch.bool)
    forced = torch.zeros_like(allowed)
    off = Lk - Lq
    for b in range(B):
        for m in range(nq):
            lo_blk, hi_blk = (off + m * bs) // bs, (off + min((m + 1) * bs, Lq) - 1) // bs
            if min_key is not None:
                win = math.floor(int(min_key[b, m]) / bs)
            else:
                win = None if min_key_block is None else int(min_key_block[m])
            for j in range(nk):
                vis = j <= hi_blk if causal else True
                a = vis and (win is None or j >= win or j < sink)
                loc = j >= lo_blk - (local - 1) and (j <= hi_blk or not causal)
                allowed[b, m, j] = a
                forced[b, m, j] = a and (j < sink or loc)
    return allowed, forced


def _lower_index_first(scores, allowed, forced, counts, kmax):
    """The stated rule: the `count` best by rank (forced +inf, others by score), exact ties to the lower index."""
    B, H, nq, nk = scores.shape
    out = torch.full((B, H, nq, kmax), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for m in range(nq):
                rank = [(math.inf if forced[b, m, j] else float(scores[b, h, m, j]) if allowed[b, m, j]
                         else -math.inf, -j) for j in range(nk)]
                c = int(counts[b, h, m])
                kept = sorted(-nj for _, nj in sorted(rank, reverse=True)[:c])
                out[b, h, m, :c] = torch.tensor(kept, dtype=torch.int32)
    return out


def compare(q, k, *, block_size, policy, forced_ties=False, tied_scores=False, **kw):
    """Both paths on the same inputs: equal counts, info and lists (see the module docstring). forced_ties: lists
    compared up to the choice among forced blocks; tied_scores (test data with exact ties): counts only."""
    on_dev = {n: v.to(DEV) if torch.is_tensor(v) else v for n, v in kw.items()}
    q, k = q.to(DEV), k.to(DEV)
    outs = []
    for impl in ("torch", "triton"):
        idx, cnt, info = select_blocks(q, k, block_size=block_size, policy=policy, return_info=True, impl=impl,
                                       **on_dev)
        outs.append((idx.cpu(), cnt.cpu(), {n: v.cpu() for n, v in info.items()}))
    (idx_t, cnt_t, info_t), (idx_f, cnt_f, info_f) = outs
    scores = info_t["scores"]
    for row in scores.flatten(0, 2) if not tied_scores else ():  # test data: no exact ties in a row's scores
        assert row.unique().numel() == row.numel(), "tied scores in the test data"
    assert idx_f.dtype == cnt_f.dtype == torch.int32 and idx_f.shape == idx_t.shape and cnt_f.shape == cnt_t.shape
    torch.testing.assert_close(cnt_f, cnt_t, rtol=0, atol=0)
    assert info_f.keys() == info_t.keys()
    for name in info_t:
        a, b = info_f[name], info_t[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    B, Hkv, nq, nk = scores.shape
    Lq, Lk = q.shape[2], k.shape[2]
    allowed, forced = _masks(nq, nk, block_size, Lq, Lk, B, kw.get("causal", True), kw.get("sink_blocks", 1),
                             kw.get("local_blocks", 1), kw.get("min_key_block"), kw.get("min_key"))
    assert torch.equal(info_t["visible_blocks"].expand(B, 1, nq).reshape(B, nq), allowed.sum(-1))
    assert torch.equal(idx_f, _lower_index_first(scores, allowed, forced, cnt_t, idx_t.shape[-1]))
    if tied_scores:
        pass
    elif not forced_ties:
        assert torch.equal(idx_f, idx_t)
    else:  # the same non-forced blocks and as many forced ones
        for b in range(B):
            for h in range(Hkv):
                for m in range(nq):
                    c = int(cnt_t[b, h, m])
                    ft = {j for j in idx_t[b, h, m, :c].tolist() if not forced[b, m, j]}
                    ff = {j for j in idx_f[b, h, m, :c].tolist() if not forced[b, m, j]}
                    assert ft == ff
        assert torch.equal(idx_f < 0, idx_t < 0)
    return idx_f, cnt_f


def qk(B, Hq, Hkv, Lq, Lk, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g).to(dtype).to(DEV),
            torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).to(DEV))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_matches(policy):
    # causal, sink 1, local 1, L = 100 (partial last block), GQA 2:1 (more heads and batches: test_variants_match)
    q, k = qk(1, 2, 1, 100, 100, seed=POLICIES.index(policy))
    compare(q, k, block_size=16, policy=policy)


def _window(nq, lag, neg=False):
    w = torch.clamp(torch.arange(nq) - lag, min=0)
    if neg:
        w[0] = -2  # a window starting before the keys (sinks exempt either way)
    return w


def _doc_min_key(B, nq, bs, off, gen):
    """Packed documents: per row and query block, the first visible key, not block-aligned, up to the block's first
    query (one negative: before the keys)."""
    first = off + torch.arange(nq) * bs
    mk = (torch.rand(B, nq, generator=gen) * (first + 1)).long()
    mk[0, -1] = -3
    return mk


# (name, (B, Hq, Hkv, Lq, Lk, bs), select_blocks kwargs builder, policies)
CASES = {
    "sink0_local2": ((1, 2, 2, 96, 96, 16), lambda nq, g: dict(sink_blocks=0, local_blocks=2),
                     ["fixed:3", "top_p:p=0.8,min=1"]),
    "sink2_local2": ((1, 2, 1, 112, 112, 16), lambda nq, g: dict(sink_blocks=2, local_blocks=2),
                     ["length_scaled:c=3,min_tokens=16", "top_p:p=0.6,min=2,max=5"]),
    "window": ((1, 2, 2, 128, 128, 16), lambda nq, g: dict(min_key_block=_window(nq, 3, neg=True)),
               ["fixed:3", "top_p:p=0.8,min=1,min_c=1,max_c=4", "length_scaled:c=3,min_tokens=16"]),
    "window_width_hint": ((1, 2, 1, 160, 160, 16),
                          lambda nq, g: dict(min_key_block=_window(nq, 3), max_visible_blocks=5),
                          ["dense", "top_p:p=0.9", "length_scaled:c=4,min_tokens=0"]),
    "too_small_hint_cuts_lists": ((1, 2, 1, 128, 128, 16), lambda nq, g: dict(max_visible_blocks=3),
                                  ["dense", "top_p:p=1.0"]),
    "documents": ((2, 2, 1, 100, 130, 16),
                  lambda nq, g: dict(min_key=_doc_min_key(2, nq, 16, 30, g),
                                     k_pool=torch.randn(2, 1, 9, 16, generator=g)),
                  ["fixed:3", "top_p:p=0.9,min=1", "length_scaled:c=2,min_tokens=8,exponent=0.7"]),
    "queries_end_of_keys": ((1, 2, 2, 40, 150, 16), lambda nq, g: dict(sink_blocks=1),
                            ["fixed:3", "top_p:p=0.95,min=3,max_c=6"]),
    "decode_one_query": ((2, 4, 2, 1, 77, 8), lambda nq, g: dict(min_key_block=torch.tensor([2])),
                         ["length_scaled:c=3,min_tokens=16", "top_p:p=0.6,min=2,max=5"]),
    "gqa3_batch2_bs32": ((2, 6, 2, 150, 150, 32), lambda nq, g: dict(),
                         ["fixed:1", "top_p:p=0.05,min=0"]),
    "bf16_q_select": ((1, 4, 2, 90, 90, 16),
                      lambda nq, g: dict(q_select=torch.randn(1, 2, nq, 16, generator=g)),
                      ["fixed:3", "top_p:p=0.9"]),
    "non_causal": ((1, 2, 1, 70, 70, 16), lambda nq, g: dict(causal=False),
                   ["dense", "top_p:p=0.9", "fixed:2", "length_scaled:c=3,min_tokens=0"]),
    "non_causal_window_short_q": ((1, 2, 2, 30, 90, 16),
                                  lambda nq, g: dict(causal=False, sink_blocks=0, local_blocks=2,
                                                     min_key_block=torch.tensor([1, 2])),
                                  ["fixed:2", "top_p:p=0.7,min=1,max=3"]),
    "long_row_512": ((1, 1, 1, 16, 16 * 300, 16), lambda nq, g: dict(), ["top_p:p=0.5", "fixed:64"]),
    "long_row_2048": ((1, 1, 1, 16, 16 * 1100, 16), lambda nq, g: dict(), ["fixed:64", "top_p:p=0.5"]),  # slow only
}


def _run_case(name, policy, seed):
    (B, Hq, Hkv, Lq, Lk, bs), make_kw, _ = CASES[name]
    g = torch.Generator().manual_seed(seed)
    q, k = qk(B, Hq, Hkv, Lq, Lk, seed=seed, dtype=torch.bfloat16 if name.startswith("bf16") else torch.float32)
    kw = make_kw(math.ceil(Lq / bs), g)
    forced_ties = bool(not kw.get("causal", True) and parse_policy(policy).name != "dense")
    return compare(q, k, block_size=bs, policy=policy, forced_ties=forced_ties, **kw)


# the default set: every case with one policy (two for some), each policy in a few cases; slow: every pair.
# (The interpreter's tl.sort is slow for long rows: a 2048-wide row alone takes ~15 s.)
DEFAULT = [(name, pols[i % len(pols)]) for i, (name, (_, _, pols)) in enumerate(CASES.items())
           if name != "long_row_2048"]
DEFAULT += [(name, pols[(i + 1) % len(pols)]) for i, (name, (_, _, pols)) in enumerate(CASES.items())
            if name in ("window", "documents", "non_causal", "window_width_hint", "too_small_hint_cuts_lists")]


@pytest.mark.parametrize("name,policy", DEFAULT)
def test_variants_match(name, policy):
    _run_case(name, policy, seed=list(CASES).index(name) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_variants_match_every_policy(name):
    for i, policy in enumerate(CASES[name][2]):
        _run_case(name, policy, seed=100 + i)


@pytest.mark.parametrize("p", [0.8, 0.9])
def test_top_p_tolerance_on_exactly_tied_masses(p):
    # zero selection queries: every scored block holds mass 1/n, so the cumulative mass lands within rounding of
    # p (ten blocks of 0.1 sum to 0.7999999999999999 < 0.8): the 1e-9 tolerance decides the count
    q, k = qk(1, 2, 1, 192, 192, seed=3)
    compare(q, k, block_size=16, policy=f"top_p:p={p},min=0", sink_blocks=0, q_select=torch.zeros(1, 1, 12, 16),
            tied_scores=True)


def test_width_smaller_than_key_blocks_and_the_hint_bound():
    # a window of 4 blocks and its hint: lists narrower than nk, identical to the unhinted ones' prefix
    q, k = qk(1, 2, 1, 192, 192, seed=9)
    mkb = _window(12, 3)
    idx, cnt = compare(q, k, block_size=16, policy="top_p:p=0.9,min=1", min_key_block=mkb, max_visible_blocks=5)
    assert idx.shape[-1] == list_width(parse_policy("top_p:p=0.9,min=1"), 12, 16, 1, 1, 5) == 5 < 12
    idx_full, cnt_full = select_blocks(q, k, block_size=16, policy="top_p:p=0.9,min=1", min_key_block=mkb,
                                       impl="triton")
    assert torch.equal(cnt, cnt_full.cpu()) and torch.equal(idx, idx_full[..., :5].cpu())


def test_model_selection_matches_on_packed_documents(monkeypatch):
    """Every select_blocks call of a tiny model's forward (window, persistent sinks, packed documents: min_key and
    a document key pool, q_select, the width hint) gives the same lists through the kernel."""
    import memsparse.model as model_mod
    from memsparse.config import MemoryConfig, ModelConfig

    calls = []

    def both(q, k, impl="torch", **kw):
        assert impl == "torch"  # ModelConfig.selection_impl's default
        out_t = select_blocks(q, k, **kw)
        out_f = select_blocks(q, k, **kw, impl="triton")
        for a, b in zip(out_t[:2], out_f[:2]):
            assert torch.equal(a, b)
        calls.append(sorted(n for n in kw if kw[n] is not None))
        return out_t

    monkeypatch.setattr(model_mod, "select_blocks", both)
    torch.manual_seed(0)
    for budget in ("top_p:p=0.8,min=1", "length_scaled:c=2,min_tokens=16"):
        cfg = ModelConfig(vocab_size=50, dim=32, depth=1, heads=2, kv_heads=1, head_dim=16, mlp_hidden=32,
                          block_size=16, segment=32, window=64, persistent_tokens=16, budget=budget,
                          memory_layers=[], memory=MemoryConfig(heads=2, head_dim=16, chunk_size=16))
        model = model_mod.MemSparseLM(cfg).eval().to(DEV)
        ids = torch.randint(0, 50, (2, 96), generator=torch.Generator().manual_seed(1))
        doc_ids = torch.zeros(2, 96, dtype=torch.long)
        doc_ids[0, 21:] += 1
        doc_ids[1, 40:] += 1
        doc_ids[1, 75:] += 1
        with torch.no_grad():
            calls.clear()
            model(ids.to(DEV), doc_ids=doc_ids.to(DEV))
            assert calls and all("min_key" in c and "k_pool" in c and "q_select" in c for c in calls)
            calls.clear()
            model(ids.to(DEV))  # one document: the window's min_key_block
            assert calls and all("min_key_block" in c and "q_select" in c for c in calls)


def test_impl_switch(monkeypatch):
    q, k = qk(1, 2, 1, 64, 64, seed=4)
    auto = "triton" if q.is_cuda else "torch"  # auto: the kernel on CUDA only, never in the interpreter
    assert resolve_impl(q, parse_policy("fixed:2"), "auto") == auto
    assert resolve_impl(q, parse_policy("fixed:2")) == "torch"  # select_blocks' default

    class Opaque(Fixed):
        pass

    assert resolve_impl(q, Opaque(k=2), "auto") == "torch"  # no fused form: auto falls back
    with pytest.raises(ValueError, match="impl must be one of"):
        select_blocks(q, k, block_size=16, policy="fixed:2", impl="reference")

    class Custom(Fixed):
        pass

    with pytest.raises(ValueError, match="no fused form"):
        select_blocks(q, k, block_size=16, policy=Custom(k=2), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="not on CUDA"):
        select_blocks(q.cpu(), k.cpu(), block_size=16, policy="fixed:2", impl="triton")


@pytest.mark.skipif(DEV != "cpu", reason="on CUDA auto is the kernel")
def test_auto_never_launches_the_kernel_off_cuda(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(tri, "select_from_scores", boom)
    q, k = qk(1, 2, 1, 64, 64, seed=5)
    a = select_blocks(q, k, block_size=16, policy="top_p:p=0.9", impl="auto")
    b = select_blocks(q, k, block_size=16, policy="top_p:p=0.9")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_model_selection_impl_gives_the_same_logits():
    """ModelConfig.selection_impl="triton" (the fused kernel, here in the interpreter) computes the same model as
    the torch path; an unknown value is a one-line config error naming the key."""
    from memsparse.config import ConfigError, MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM

    kw = dict(vocab_size=50, dim=32, depth=1, heads=2, kv_heads=1, head_dim=16, mlp_hidden=32, block_size=16,
              segment=32, window=64, persistent_tokens=16, budget="top_p:p=0.8,min=1", memory_layers=[0],
              memory=MemoryConfig(heads=2, head_dim=16, chunk_size=16))
    ids = torch.randint(0, 50, (1, 128), generator=torch.Generator().manual_seed(2)).to(DEV)
    logits = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = MemSparseLM(ModelConfig(**kw, selection_impl=impl).validate()).eval().to(DEV)
        with torch.no_grad():
            logits[impl] = model(ids).logits
    assert torch.equal(logits["torch"], logits["triton"])
    with pytest.raises(ConfigError, match="selection_impl"):
        ModelConfig(**kw, selection_impl="cuda").validate()


def test_policy_constants_are_exact_doubles():
    kw = tri.policy_constexprs(parse_policy("top_p:p=0.9,min=2,max=7,min_c=1.5,max_c=24"))
    back = {n: tri.struct.unpack("<d", tri.struct.pack("<q", kw[n]))[0] for n in ("P_BITS", "MIN_C_BITS", "MAX_C_BITS")}
    assert back == {"P_BITS": 0.9, "MIN_C_BITS": 1.5, "MAX_C_BITS": 24.0}
    assert (kw["MIN_BLOCKS"], kw["MAX_BLOCKS"], kw["HAS_MIN_C"], kw["HAS_MAX_C"]) == (2, 7, True, True)
    ls = tri.policy_constexprs(parse_policy("length_scaled:c=12,min_tokens=256,exponent=0.5"))
    assert ls["EXP_MODE"] == 1 and tri.policy_constexprs(parse_policy("length_scaled:exponent=1"))["EXP_MODE"] == 0


def _bench_module():
    from load_script import load_benchmark

    return load_benchmark("bench_select")


def test_bench_checks_then_times_both_impls_on_cpu(tmp_path):
    import json

    bench = _bench_module()
    out = tmp_path / "sel.json"
    assert bench.main(["--device", DEV, "--lengths", "96", "--heads", "2/1", "--head-dim", "16", "--block", "16",
                       "--impl", "torch,triton", "--window", "48", "--reps", "1", "--policies", "top_p:p=0.9,min=2",
                       "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["check_triton"]["rows"] == 6 and row["check_triton"]["list_mismatch_rows"] == 0
    assert row["ms_torch"] > 0 and row["ms_triton"] > 0
    # the check: a swap between equally scored blocks is a tie, anything else a mismatch
    scores = torch.tensor([[[[0.5, 0.2, 0.2, 0.9]]]])
    ref = (torch.tensor([[[[0, 1, 3]]]], dtype=torch.int32), torch.tensor([[[3]]], dtype=torch.int32))
    tie = (torch.tensor([[[[0, 2, 3]]]], dtype=torch.int32), ref[1])
    wrong = (torch.tensor([[[[1, 2, 3]]]], dtype=torch.int32), ref[1])
    assert bench.compare_selections(ref, tie, scores)["tie_rows"] == 1
    res = bench.compare_selections(ref, wrong, scores)
    assert res["list_mismatch_rows"] == 1 and res["tie_rows"] == 0 and res["examples"]
    assert bench.compare_selections(ref, (ref[0], ref[1] - 1), scores)["count_mismatch_rows"] == 1


_COMPILE_SM90 = r'''
import re
from triton import compile as tcompile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from memsparse.kernels import block_select_triton as T
from memsparse.kernels.budget import parse_policy

fn = T._select_kernel
ptr = {"S": "*fp32", "MK": "*i64", "IDX": "*i32", "CNT": "*i32", "VIS": "*i64", "FRC": "*i64", "VTOK": "*i64"}
for policy, window, info, causal, block_nk in [("top_p:p=0.9,min=1,max=32,min_c=1,max_c=24", 2, True, True, 2048),
                                               ("length_scaled:c=2,min_tokens=0,exponent=0.7", 1, False, True, 256),
                                               ("fixed:16", 0, False, False, 64)]:
    cx = dict(BS=64, SINK=1, LOCAL=1, CAUSAL=causal, WINDOW=window, WRITE_INFO=info, BLOCK_NK=block_nk, BLOCK_K=64,
              LIBDEVICE=True, TOL_BITS=T._bits(1e-9), **T.policy_constexprs(parse_policy(policy)))
    sig = {n: ptr.get(n, "fp32" if n == "scale" else "constexpr" if n in cx else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in cx.items()})
    k = tcompile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": T._num_warps(block_nk), "num_stages": 1})
    assert k.asm["cubin"], policy
    ptx = k.asm["ptx"]
    # no approximate fp32 op (fp64 math is libdevice's own, e.g. pow's refined rcp.approx.f64, as in torch's CUDA pow)
    assert not re.search(r"approx(\.ftz)?\.f32|div\.full", ptx), policy
    print("ok", policy)
'''


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The compiled (not interpreted) path: every branch the interpreter cannot check (libdevice calls, the int64
    sort, constexpr doubles) lowers to an H100/H200 cubin, with no approximate float op in it."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok ") == 3
