"""benchmarks/key_tokenization.py: key statistics are counted over every key, sample keys are memsparse-eval's."""

from __future__ import annotations

import json

import pytest
from load_script import load_benchmark
from memsparse.eval.harness import sample_seed
from memsparse.eval.tasks import get_task

from memsparse.tokenizer import ByteTokenizer, train_bpe

key_tok = load_benchmark("key_tokenization")


def test_byte_tokenizer_keys_are_all_alike():
    stats, enc, share = key_tok.key_statistics(ByteTokenizer(), digits=3)
    assert stats["keys"] == 900 and stats["tokens_per_key"] == {"4": 900}  # " " and 3 digit bytes
    assert stats["single_token_keys"] == 0 and all(v == 0 for v in stats["share_rarest_below"].values())


def test_a_merged_key_is_a_single_rare_token():
    # a corpus that repeats one number: the BPE merges " 123" into one token that no other key contains
    tok = train_bpe(iter(["the value 123 and 123 again, 123 " * 50, "other words 4 5 6 7 8 9 0"]), 300,
                    split_digits=False)
    stats, enc, share = key_tok.key_statistics(tok, digits=3)
    assert len(enc[123]) == 1 and share[enc[123][0]] == 1
    assert stats["single_token_keys"] >= 1 and stats["share_rarest_below"]["0.01"] > 0
    split = train_bpe(iter(["the value 123 and 123 again, 123 " * 50]), 300, split_digits=True)
    s2, _, _ = key_tok.key_statistics(split, digits=3)
    assert s2["single_token_keys"] == 0 and set(s2["tokens_per_key"]) == {"4"}


def test_sample_keys_are_the_eval_harness_keys(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path / "tok")
    out = key_tok.main(["--tokenizer", str(tmp_path / "tok"), "--samples", "3", "--out", str(tmp_path / "k.json")])
    task = get_task("passkey")
    want = [task.generate(1024, 0.0, sample_seed(0, i), tok).answer for i in range(3)]
    assert [r["key"] for r in out["samples"]] == want
    assert json.loads((tmp_path / "k.json").read_text())["samples"][2]["key"] == want[2]
    with pytest.raises(SystemExit, match="does not exist"):
        key_tok.main(["--tokenizer", str(tmp_path / "missing")])


def test_balanced_draws_favour_the_single_token_key():
    tok = train_bpe(iter(["the value 123 and 123 again, 123 " * 50, "other words 4 5 6 7 8 9 0"]), 300,
                    split_digits=False)
    rows = [{"key": "123"}, {"key": "456"}]
    key_tok.add_balanced_draws(rows, tok, digits=3, balance=0.5, draws=1000)
    assert rows[0]["balanced_expected"] > 50 * rows[1]["balanced_expected"] > 0  # its own class vs. a crowded one
    assert rows[0]["balanced_expected"] == pytest.approx(1000 * rows[0]["balanced_p"])
    uniform = [{"key": "123"}]
    key_tok.add_balanced_draws(uniform, tok, digits=3, balance=0.0, draws=900)
    assert uniform[0]["balanced_expected"] == pytest.approx(1.0)
