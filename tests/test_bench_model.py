"""benchmarks/bench_model.py on CPU: its memsparse model with the retrieval recipes' grouped heads, and a bad
--kv-heads refused in one line before anything runs (the timing itself is GPU-only)."""

from __future__ import annotations

import pytest
from load_script import load_benchmark

bm = load_benchmark("bench_model")


def test_kv_heads_reach_the_model():
    assert bm.memsparse_mac(1024, 512, 2048, "dense").config.kv_heads == 8
    model = bm.memsparse_mac(1024, 512, 2048, "dense", kv_heads=4)
    assert (model.config.heads, model.config.kv_heads) == (8, 4)


@pytest.mark.parametrize("bad", ["3", "0", "16"])
def test_a_kv_head_count_that_does_not_divide_the_heads_is_refused(bad):
    with pytest.raises(SystemExit, match="--kv-heads must divide the 8 query heads"):
        bm.main(["--kv-heads", bad, "--systems", "memsparse"])
