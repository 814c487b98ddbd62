"""The opt-in Hopper-oriented variants of the sparse-attention kernels (kernels/sparse_attention_hopper.py: a
persistent grid ordered longest-row-first, tensor-descriptor (TMA) loads, warp-specialization configs) against the
float64 oracle and the fp32 reference, forward and backward (and the same grid with a dynamic, atomic-counter
schedule), with the same checks as the default kernels
(tests/test_sparse_attention_kernel.py: outputs poisoned with NaN, lse -inf on rows that see nothing, GQA, odd
lengths, Lq < Lk, duplicates and junk padding, document masks with boundaries inside blocks, three tilings).

On CPU the kernels run through the Triton interpreter, which runs the tensor descriptors (zero fill past the
tensor's edge included) but none of the GPU's TMA hardware, pipelining or warp specialization. On a GPU the same
checks run compiled and autotuned (the "ws" configs included; tensor descriptors need compute capability 9.0+):
    TRITON_INTERPRET=0 MEMSPARSE_SPARSE_ATTENTION_TEST_DEVICE=cuda python -m pytest -n 0 \\
        tests/test_sparse_attention_variants.py -m ''
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from memsparse.kernels import sparse_attention_hopper as hop  # noqa: E402
from memsparse.kernels import sparse_attention_triton as tri  # noqa: E402
from memsparse.kernels.sparse_attention import ENV_VAR, sparse_attention  # noqa: E402
from test_sparse_attention_kernel import check_case, fwd_bwd, make_lists, rel  # noqa: E402

DEV = os.environ.get("MEMSPARSE_SPARSE_ATTENTION_TEST_DEVICE", "cpu")
VARIANTS = ["persistent", "tma", "persistent+tma", "merged", "merged+tma"]


def _skip_reason(variant: str) -> str | None:
    if DEV == "cpu":
        if not tri.interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        return None
    if not torch.cuda.is_available():
        return f"MEMSPARSE_SPARSE_ATTENTION_TEST_DEVICE={DEV} but CUDA is not available"
    if "tma" in variant and torch.cuda.get_device_capability()[0] < 9:
        return "tensor-descriptor (TMA) loads need compute capability 9.0+"
    return None


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tri, "POISON_OUTPUTS", True)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(tri.BWD_ENV_VAR, raising=False)
    monkeypatch.delenv(hop.PROGRAMS_ENV_VAR, raising=False)
    monkeypatch.delenv("MEMSPARSE_SPARSE_ATTENTION_VARIANT", raising=False)
    monkeypatch.setattr(hop, "PERSISTENT_PROGRAMS", None)


def run(case, variant, **kw):
    reason = _skip_reason(variant)
    if reason:
        pytest.skip(reason)
    check_case(*case, variant=variant, device=DEV, **kw)


# (B, Hq, Hkv, Lq, Lk, D, bs, kind): GQA 1/2/4, odd lengths (a partial last block), Lq < Lk (query blocks
# straddling key blocks), random lists with duplicates, junk padding and empty rows, full lists (future blocks
# masked), windows, empty lists.
CASES = [
    (2, 4, 2, 70, 90, 32, 16, "random"),
    (1, 4, 1, 100, 100, 32, 32, "full"),
    (1, 4, 1, 61, 61, 16, 16, "window"),
    (1, 2, 2, 50, 50, 16, 16, "random"),
    (1, 4, 2, 33, 47, 16, 16, "empty"),
]


# Every case through "persistent+tma" (both means at once); "persistent" (pointer loads in the persistent loop) and
# "tma" (one program per item) run the random and empty lists in the fast set, the rest with -m slow.
ORACLE_PARAMS = [pytest.param(c, v, id="-".join(map(str, c)) + "-" + v,
                              marks=() if v == "persistent+tma" or c[-1] in ("random", "empty") and c[0] == 2 or
                              c[-1] == "empty" else pytest.mark.slow)
                 for v in VARIANTS for c in CASES]


@pytest.mark.parametrize("case,variant", ORACLE_PARAMS)
def test_variant_matches_oracle(case, variant):
    run(case, variant, seed=5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_document_masks(variant):
    """key_start with shared keys: document boundaries inside, at and around block edges, one shorter than a block."""
    run((2, 4, 1, 61, 93, 16, 16, "window"), variant, docs=True, shared=16, seed=6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_non_causal_custom_scale(variant):
    run((1, 4, 2, 40, 77, 16, 16, "random"), variant, causal=False, scale=0.3, seed=3)


@pytest.mark.parametrize("variant", ["persistent+tma", pytest.param("tma", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_variant_half_precision(variant, dtype):
    run((1, 4, 2, 60, 80, 32, 16, "window"), variant, dtype=dtype, seed=11)


@pytest.mark.parametrize("tiles,bs,G", [((16, 16), 32, 1), ((64, 16), 16, 4),
                                        pytest.param((32, 16), 64, 2, marks=pytest.mark.slow)])
def test_variant_tilings(monkeypatch, tiles, bs, G):
    """BLOCK_N < block_size, BLOCK_M < block_size, and row tiles spanning GQA heads (the dK/dV kernel's Q/dO
    descriptor then reads several heads per tile, and rows of the next KV group are zeroed)."""
    if DEV != "cpu":
        pytest.skip("tile sizes are fixed only under the interpreter (the GPU autotunes them)")
    monkeypatch.setattr(hop, "INTERPRET_CONFIG", {"fwd": tiles, "dq": tiles, "dkdv": tiles[::-1]})
    run((1, 2 * G, 2, 75, 99, 16, bs, "random"), "persistent+tma", seed=bs + G)
    # the merged backward: dK/dV and dQ programs of different tile shapes in one launch
    run((1, 2 * G, 2, 75, 99, 16, bs, "random"), "merged+tma", seed=bs + G)


@pytest.mark.parametrize("programs", [1, 2, 5, 1000])
def test_persistent_program_counts(monkeypatch, programs):
    """Any number of persistent programs, fewer or more than the work items, covers every item once."""
    monkeypatch.setattr(hop, "PERSISTENT_PROGRAMS", programs)
    run((1, 4, 2, 70, 90, 32, 16, "random"), "persistent", seed=programs)


@pytest.mark.parametrize("variant", ["dynamic", "dynamic+tma"])
@pytest.mark.parametrize("case,docs", [((2, 4, 2, 70, 90, 32, 16, "random"), False),
                                       ((2, 4, 1, 61, 93, 16, 16, "window"), True)],
                         ids=["random", "documents"])
def test_dynamic_schedule(monkeypatch, variant, case, docs):
    """Items taken from an atomic counter cover every item once (the interpreter runs programs one after
    another, so there the first program takes them all; on a GPU they interleave)."""
    monkeypatch.setattr(hop, "PERSISTENT_PROGRAMS", 2)
    run(case, variant, docs=docs, shared=16 if docs else 0, seed=13)


def test_ws_configs_and_fused_backward(monkeypatch):
    """"+ws" (loops marked warp-specialized; the interpreter ignores the mark) gives the same function, and the
    variants take the default fused backward under MEMSPARSE_SPARSE_ATTENTION_BWD=fused."""
    run((2, 4, 2, 70, 90, 32, 16, "random"), "persistent+tma+ws", seed=2)
    monkeypatch.setenv(tri.BWD_ENV_VAR, "fused")
    run((2, 4, 2, 70, 90, 32, 16, "random"), "persistent+tma", seed=2)


def test_variants_agree_with_default_kernel():
    """Same inputs: every variant equals the default kernel's values and gradients to fp32 rounding."""
    if _skip_reason("persistent+tma"):
        pytest.skip(_skip_reason("persistent+tma"))
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 45, 32, generator=gen).to(DEV)
    k, v = torch.randn(1, 2, 61, 32, generator=gen).to(DEV), torch.randn(1, 2, 61, 32, generator=gen).to(DEV)
    do = torch.randn(1, 4, 45, 32, generator=gen, dtype=torch.float64).to(DEV)
    dlse = torch.randn(1, 4, 45, generator=gen, dtype=torch.float64).to(DEV)
    idx, cnt = (t.to(DEV) for t in make_lists(1, 2, 45, 61, 16, "random", gen))

    def fn(variant):
        return lambda *t: sparse_attention(*t, idx, cnt, block_size=16, return_lse=True, impl="triton",
                                           variant=variant)

    base = fwd_bwd(fn("default"), q, k, v, do, dlse)
    for variant in VARIANTS + ["persistent+ws", "dynamic", "dynamic+tma+ws"]:
        got = fwd_bwd(fn(variant), q, k, v, do, dlse)
        for a, b in zip(got, base):
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)) and rel(a[fin], b[fin]) <= 1e-5, variant


def test_parse_variant():
    assert hop.parse_variant("default") == frozenset()
    assert hop.parse_variant("tma+persistent") == {"persistent", "tma"}
    assert hop.parse_variant("Persistent+TMA+ws") == {"persistent", "tma", "ws"}
    assert hop.parse_variant("dynamic+tma") == {"dynamic", "tma"}
    assert hop.parse_variant("merged+tma") == {"merged", "tma"}
    for bad in ("warp", "persistent+x", "ws", "+", "persistent+dynamic", "merged+persistent", "merged+ws"):
        with pytest.raises(ValueError, match="variant"):
            hop.parse_variant(bad)
    q = torch.randn(1, 2, 32, 16)
    idx, cnt = torch.zeros(1, 2, 2, 1, dtype=torch.int32), torch.ones(1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="variant"):
        sparse_attention(q, q, q, idx, cnt, block_size=16, variant="fast")
    # the reference path takes a valid variant and ignores it
    o = sparse_attention(q, q, q, idx, cnt, block_size=16, impl="reference", variant="persistent")
    assert torch.equal(o, sparse_attention(q, q, q, idx, cnt, block_size=16, impl="reference"))


def test_persistent_programs_setting(monkeypatch):
    cpu = torch.device("cpu")
    assert hop.persistent_programs(cpu) == 3
    monkeypatch.setattr(hop, "PERSISTENT_PROGRAMS", 7)
    assert hop.persistent_programs(cpu) == 7
    monkeypatch.setenv(hop.PROGRAMS_ENV_VAR, "2")
    assert hop.persistent_programs(cpu) == 2
    monkeypatch.setenv(hop.PROGRAMS_ENV_VAR, "0")
    with pytest.raises(ValueError, match="persistent programs"):
        hop.persistent_programs(cpu)


def test_tma_ready_keeps_aligned_views_and_copies_the_rest():
    t = torch.randn(2, 8, 3, 16).transpose(1, 2)  # (B, H, L, D) view of a (B, L, H, D) tensor: strides 16B-aligned
    assert hop._tma_ready(t) is t
    odd = torch.randn(2 * 3 * 5 * 16 + 1)[1:].view(2, 3, 5, 16)  # base 4 bytes past an allocation: misaligned
    fixed = hop._tma_ready(odd)
    assert fixed is not odd and fixed.is_contiguous() and fixed.data_ptr() % 16 == 0 and torch.equal(fixed, odd)
    expanded = torch.randn(1, 1, 5, 16).expand(1, 3, 5, 16)  # stride 0 over heads
    fixed = hop._tma_ready(expanded)
    assert fixed.stride(1) > 0 and torch.equal(fixed, expanded)


def test_non_contiguous_inputs_through_descriptors():
    """(B, L, H, D)-laid-out q/k/v (what a model's projections give) go through the 4-D descriptors as views."""
    if _skip_reason("persistent+tma"):
        pytest.skip(_skip_reason("persistent+tma"))
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 45, 4, 32, generator=gen).to(DEV).transpose(1, 2)
    k = torch.randn(1, 61, 2, 32, generator=gen).to(DEV).transpose(1, 2)
    v = torch.randn(1, 61, 2, 32, generator=gen).to(DEV).transpose(1, 2)
    do = torch.randn(1, 4, 45, 32, generator=gen, dtype=torch.float64).to(DEV)
    dlse = torch.randn(1, 4, 45, generator=gen, dtype=torch.float64).to(DEV)
    idx, cnt = (t.to(DEV) for t in make_lists(1, 2, 45, 61, 16, "window", gen))

    def fn(variant):
        return lambda *t: sparse_attention(*t, idx, cnt, block_size=16, return_lse=True, impl="triton",
                                           variant=variant)

    base = fwd_bwd(fn("default"), q.contiguous(), k.contiguous(), v.contiguous(), do, dlse)
    got = fwd_bwd(fn("persistent+tma"), q, k, v, do, dlse)
    for a, b in zip(got, base):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)) and rel(a[fin], b[fin]) <= 1e-5


def test_persistent_order_is_longest_row_first():
    """The plan's forward/dQ order (what a persistent program walks, item w -> ORDER[w // NRT]) is a permutation of
    the query lists by kept-block count, descending; the reverse lists' order for dK/dV likewise."""
    gen = torch.Generator().manual_seed(4)
    Lq, Lk, bs = 100, 130, 16
    idx, cnt = (t.to(DEV) for t in make_lists(2, 3, Lq, Lk, bs, "random", gen))
    cnt_c, _, order, keys, npart = tri.sparse_attention_plan(idx, cnt, Lq, Lk, bs, True)
    assert sorted(order.tolist()) == list(range(cnt_c.numel()))
    c = cnt_c[order.long()]
    assert (c[:-1] >= c[1:]).all() and c[0] == cnt.clamp(0, idx.shape[-1]).max()
    off, _, _, order_k = tri._reverse_from_keys(keys, npart)
    lengths = (off[1:] - off[:-1])[order_k.long()]
    assert sorted(order_k.tolist()) == list(range(lengths.numel())) and (lengths[:-1] >= lengths[1:]).all()


@pytest.mark.parametrize("variant", ["persistent+tma", "dynamic"])
def test_nan_in_one_kv_group_stays_there(variant):
    """A NaN in the queries of KV group 1 leaves group 0's outputs and dK/dV finite and equal to the default
    kernel's: the dK/dV kernel's descriptor tiles span heads (G * block < BLOCK_M), and rows of the next group are
    zeroed, not only weighted by 0."""
    if _skip_reason(variant):
        pytest.skip(_skip_reason(variant))
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(1, 2, 40, 16, generator=gen)
    q[:, 1, 5] = float("nan")
    k, v = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    do = torch.randn(1, 2, 40, 16, generator=gen, dtype=torch.float64)
    dlse = torch.zeros(1, 2, 40, dtype=torch.float64)
    idx, cnt = make_lists(1, 2, 40, 40, 16, "causal", gen)
    q, k, v, do, dlse, idx, cnt = (t.to(DEV) for t in (q, k, v, do, dlse, idx, cnt))

    def fn(name):
        return lambda *t: sparse_attention(*t, idx, cnt, block_size=16, return_lse=True, impl="triton",
                                           variant=name)

    got, want = fwd_bwd(fn(variant), q, k, v, do, dlse), fwd_bwd(fn("default"), q, k, v, do, dlse)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        a0, b0 = a[:, 0], b[:, 0]
        assert torch.isfinite(b0).all() and torch.isfinite(a0).all(), name
        assert rel(a0, b0) <= 1e-5, name


@pytest.fixture
def variant_calls(monkeypatch) -> list[str]:
    """The `variant` of every call that reaches the opt-in kernels (`sparse_attention_variant`), in order."""
    calls = []
    real = hop.sparse_attention_variant

    def spy(*a, **kw):
        calls.append(kw["variant"])
        return real(*a, **kw)

    monkeypatch.setattr(hop, "sparse_attention_variant", spy)
    return calls


def test_variant_from_environment(monkeypatch, variant_calls):
    """variant=None takes MEMSPARSE_SPARSE_ATTENTION_VARIANT (how a whole model runs a variant unchanged); an
    explicit variant wins; unset, the default kernels run."""
    from memsparse.kernels.sparse_attention import VARIANT_ENV_VAR

    calls = variant_calls
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 32, 16, generator=gen).to(DEV)
    idx, cnt = (t.to(DEV) for t in make_lists(1, 2, 32, 32, 16, "causal", gen))

    def fn(**kw):
        return sparse_attention(q, q, q, idx, cnt, block_size=16, impl="triton", **kw)

    base = fn()
    assert calls == []
    monkeypatch.setenv(VARIANT_ENV_VAR, "dynamic+tma")
    assert rel(fn(), base) <= 1e-5 and calls == ["dynamic+tma"]
    fn(variant="default")
    assert calls == ["dynamic+tma"]
    monkeypatch.setenv(VARIANT_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="variant"):
        fn()


def test_auto_variant_is_merged_with_grouped_query_heads_only(monkeypatch, variant_calls):
    """variant "auto" (or MEMSPARSE_SPARSE_ATTENTION_VARIANT=auto): the merged backward where it was measured faster
    (Hq > Hkv), the default kernels with as many KV heads as query heads."""
    from memsparse.kernels.sparse_attention import VARIANT_ENV_VAR

    calls = variant_calls
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 32, 16, generator=gen).to(DEV)
    kv = torch.randn(1, 2, 32, 16, generator=gen).to(DEV)
    idx, cnt = (t.to(DEV) for t in make_lists(1, 2, 32, 32, 16, "causal", gen))
    gqa = sparse_attention(q, kv, kv, idx, cnt, block_size=16, impl="triton", variant="auto")
    assert calls == ["merged"]
    assert rel(gqa, sparse_attention(q, kv, kv, idx, cnt, block_size=16, impl="triton")) <= 1e-5
    idx4, cnt4 = (t.to(DEV) for t in make_lists(1, 4, 32, 32, 16, "causal", gen))
    monkeypatch.setenv(VARIANT_ENV_VAR, "auto")
    sparse_attention(q, q, q, idx4, cnt4, block_size=16, impl="triton")
    assert calls == ["merged"]  # Hq == Hkv: the default kernels


def test_tma_allocator_is_set_in_every_thread_context():
    """Triton keeps its scratch allocator in a ContextVar: one set in the forward's thread is unset in autograd's
    backward thread (the TMA variants' first GPU run failed so). Each context that launches gets one; a user's own
    allocator is kept. (Only the bookkeeping: nothing is allocated on the CPU.)"""
    import contextvars
    import threading

    import triton
    from triton.runtime import _allocation

    def in_fresh_context(fn):
        box = []
        t = threading.Thread(target=lambda: box.append(contextvars.Context().run(fn)))
        t.start()
        t.join()
        return box[0]

    def launch_then_get():
        hop._ensure_allocator(torch.device("cuda"))
        return _allocation._allocator.get()

    first, second = in_fresh_context(launch_then_get), in_fresh_context(launch_then_get)
    assert not isinstance(first, _allocation.NullAllocator) and not isinstance(second, _allocation.NullAllocator)

    def user_allocator_kept():
        def mine(size, alignment, stream):
            raise AssertionError("not called here")

        triton.set_allocator(mine)
        hop._ensure_allocator(torch.device("cuda"))
        return _allocation._allocator.get() is mine

    assert in_fresh_context(user_allocator_kept)
    assert in_fresh_context(lambda: (hop._ensure_allocator(torch.device("cpu")), _allocation._allocator.get())[1]) \
        is _allocation._NULL_ALLOCATOR
