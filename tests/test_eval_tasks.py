"""Synthetic long-context tasks (memsparse.eval.tasks) and the stdlib corpus (memsparse.corpus)."""

import json
import pickle
import re
import sysconfig
import time

import numpy as np
import pytest
from memsparse.eval.tasks import (
    TASKS,
    Sample,
    Task,
    contains_fraction,
    exact_match,
    get_task,
    list_tasks,
    register_task,
)
from memsparse.eval.tasks.base import answer_text
from memsparse.eval.tasks.niah_multikey import NiahMultiKey
from memsparse.eval.tasks.niah_single import NiahSingle

from memsparse import corpus
from memsparse.tokenizer import ByteTokenizer, train_bpe

EXPECTED = {
    "passkey",
    "passkey_balanced",
    "passkey_balanced_full",
    "niah_single",
    "niah_single_noise",
    "niah_single_essay",
    "niah_single_kv",
    "niah_multikey",
    "niah_multikey_pair",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "multihop_graph",
    "assoc_recall",
}
# unregistered variants: other value/key kinds and haystacks go through the same checks
VARIANTS = {
    "v_words_noise": NiahSingle("v_words_noise", haystack="noise", values="words"),
    "v_uuid_kv": NiahSingle("v_uuid_kv", haystack="kv", keys="uuids", values="uuids"),
    "v_multikey_kv_words": NiahMultiKey("v_multikey_kv_words", haystack="kv", values="words"),
}
ALL = sorted(EXPECTED) + sorted(VARIANTS)


def task_of(name: str) -> Task:
    return VARIANTS[name] if name in VARIANTS else get_task(name)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus.read_documents(corpus.stdlib_source_files(30)), vocab_size=400)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


# ----------------------------------------------------------------------------- oracles on the decoded prompt


def _question_keys(q: str) -> list[str]:
    m = re.search(r" for (.+?) mentioned in the provided text\?", q) or re.search(r"values of (.+?)\?", q)
    return re.split(r", | and ", m.group(1))


def oracle(task: Task, text: str, q: str):
    """Solve the task by reading the decoded prompt only (the question is its tail)."""
    name = task.name
    if name.startswith("passkey"):
        (v,) = set(re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text))
        return v
    if name == "variable_tracking":
        value = re.search(r"assigned the value (\d+) in the text", q).group(1)
        held, order = set(), []
        stmts = re.findall(r"VAR (\w+) = (VAR )?(\w+)\.", text)
        for var, ref, src in stmts:  # chains appear in order
            if (not ref and src == value) or (ref and src in held):
                held.add(var)
                order.append(var)
        return order
    if name == "multihop_graph":
        edges = dict(re.findall(r"Node (\w+) links to node (\w+)\.", text))
        m = re.search(r"Starting at node (\w+) and following the links (\d+) times", q)
        node = m.group(1)
        for _ in range(int(m.group(2))):
            node = edges[node]
        return node
    if name == "assoc_recall":
        out = []
        for k in _question_keys(q):
            (v,) = set(re.findall(rf"(?<![\w-]){re.escape(k)}: (\d+)\.", text))
            out.append(v)
        return out
    # NIAH family
    keys = _question_keys(q)
    vals = {k: re.findall(rf"special magic \w+ for {re.escape(k)} is: (\S+?)\.(?:\s|$)", text) for k in keys}
    if "multiquery" in name:
        return [vals[k][0] for k in keys]
    if "multivalue" in name:
        return vals[keys[0]]
    (v,) = vals[keys[0]]
    return v


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert set(list_tasks()) >= EXPECTED
    assert list_tasks() == sorted(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'.*passkey.*variable_tracking"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task(NiahSingle("passkey"))
    extra = register_task(NiahSingle("_test_extra", haystack="noise"))
    try:
        assert get_task("_test_extra") is extra
    finally:
        TASKS.pop("_test_extra")


# ----------------------------------------------------------------------------- lengths, depth, determinism


@pytest.mark.parametrize("name", ALL)
def test_exact_length_and_answer(name, tok):
    task = task_of(name)
    lo = task.min_length(tok)
    for length in (lo, lo + 1, lo + 37, 3001, 12345, 65536):
        s = task.generate(length, 0.5, seed=length, tokenizer=tok)
        assert isinstance(s, Sample) and (s.task, s.length, s.depth, s.seed) == (task.name, length, 0.5, length)
        assert len(s.prompt_ids) == length
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in s.prompt_ids[:2000])
        assert s.answer_ids == tok.encode(answer_text(s.answer))
        assert 0 < len(s.answer_ids) <= task.max_answer_tokens(tok)
        json.dumps(s.meta)
    for seed in range(12):  # min_length is a bound over seeds, not a lucky one
        assert len(task.generate(lo, seed / 11, seed, tok).prompt_ids) == lo


@pytest.mark.parametrize("name", ALL)
def test_needles_at_requested_depth(name, tok):
    task = task_of(name)
    for depth in (0.0, 0.1, 0.5, 0.77, 1.0):
        s = task.generate(6000, depth, seed=3, tokenizer=tok)
        m = s.meta
        pos, lens = m["needle_positions"], m["needle_lengths"]
        for p, n, text in zip(pos, lens, m["needle_texts"]):  # each needle is intact at its position
            assert tok.decode(s.prompt_ids[p : p + n]) == text
            assert m["haystack_start"] <= p and p + n <= m["haystack_end"]
        # the anchored needle (index 0): its offset in the filler alone is depth * filler, up to a unit
        before = sum(n for p, n in zip(pos, lens) if p < pos[0])
        offset = pos[0] - m["haystack_start"] - before
        assert abs(offset - depth * m["filler_tokens"]) <= m["max_gap"] / 2 + 1, (depth, offset, m)
        if depth in (0.0, 1.0):
            assert offset == depth * m["filler_tokens"]


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed(name, tok):
    task = task_of(name)
    a, b, c = (task.generate(5000, 0.4, seed, tok) for seed in (7, 7, 8))
    assert a.prompt_ids == b.prompt_ids and a.answer == b.answer and a.meta == b.meta
    assert a.prompt_ids != c.prompt_ids and a.answer != c.answer
    # the same seed keeps its content across lengths (comparable grid cells); multi-value answers
    # are listed in order of appearance, which the layout decides
    other = task.generate(task.min_length(tok) + 500, 0.9, 7, tok).answer
    assert (sorted(other) == sorted(a.answer)) if isinstance(other, list) else other == a.answer


@pytest.mark.parametrize("name", ALL)
def test_oracle_recovers_answer(name, tok):
    task = task_of(name)
    for seed, depth, length in ((0, 0.0, 2500), (1, 0.5, 4000), (2, 1.0, 9000)):
        s = task.generate(length, depth, seed, tok)
        text = tok.decode(s.prompt_ids)
        assert oracle(task, text, s.meta["question"]) == s.answer
        assert task.score(answer_text(s.answer), s) == 1.0
        assert task.score("", s) == 0.0


@pytest.mark.parametrize("name", ["passkey", "niah_single_essay", "niah_single_kv"])
def test_tasks_pickle(name, tok):
    task = get_task(name)
    a = task.generate(3000, 0.5, 1, tok)
    clone = pickle.loads(pickle.dumps(task))
    assert clone.generate(3000, 0.5, 1, tok).prompt_ids == a.prompt_ids


def test_one_million_token_passkey_is_fast():
    tok, task = ByteTokenizer(), get_task("passkey")
    task.generate(1000, 0.5, 0, tok)
    t = time.perf_counter()
    s = task.generate(1_000_000, 0.37, 0, tok)
    assert time.perf_counter() - t < 2.0
    assert len(s.prompt_ids) == 1_000_000
    p = s.meta["needle_positions"][0]
    assert tok.decode(s.prompt_ids[p : p + s.meta["needle_lengths"][0]]) == s.meta["needle_texts"][0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_min_length_and_depth_errors(name, tok):
    task = get_task(name)
    lo = task.min_length(tok)
    with pytest.raises(ValueError, match=f"below min_length {lo}"):
        task.generate(lo - 1, 0.5, 0, tok)
    with pytest.raises(ValueError, match="depth"):
        task.generate(lo + 100, 1.5, 0, tok)


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown value kind 'colours'.*numbers"):
        NiahSingle("x", values="colours")
    with pytest.raises(ValueError, match="unknown haystack 'poems'"):
        NiahSingle("x", haystack="poems")


# ----------------------------------------------------------------------------- scorers


def test_exact_match_scorer():
    assert exact_match("71432", "71432") == 1.0
    assert exact_match("  71432.\nThe grass is green", "71432") == 1.0
    assert exact_match("Hungry-Tiger", "hungry-tiger") == 1.0
    assert exact_match("714321", "71432") == 0.0
    assert exact_match("ab-cd-ef", "ab-cd") == 0.0
    assert exact_match("the pass key is 71432", "71432") == 0.0
    assert exact_match("", "71432") == 0.0


def test_partial_credit_scorer():
    ans = ["1234567", "7654321", "1111111", "2222222"]
    assert contains_fraction("1234567, 7654321, 1111111, 2222222", ans) == 1.0
    assert contains_fraction("2222222 and 1234567", ans) == 0.5
    assert contains_fraction("12345678, 76543210", ans) == 0.0  # no credit for a longer number
    assert contains_fraction("nothing", ans) == 0.0
    task = get_task("niah_multiquery")
    s = Sample([0], ans, [0], task.name, 1, 0.5, 0)
    assert task.score(" 1234567, 9999999, 1111111", s) == 0.5
    s1 = Sample([0], "7654321", [0], "niah_single", 1, 0.5, 0)
    assert get_task("niah_single").score(" 7654321, and more", s1) == 1.0


# ----------------------------------------------------------------------------- corpus


def test_stdlib_corpus_deterministic():
    files = corpus.stdlib_source_files()
    assert len(files) > 100 and files == corpus.stdlib_source_files()
    assert corpus.stdlib_source_files(5) == files[:5]
    root = corpus.stdlib_dir()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any(set(r.split("/")) & {"test", "tests", "site-packages", "idlelib"} for r in rel)
    docs = list(corpus.read_documents(files[:3]))
    assert len(docs) == 3 and all(isinstance(d, str) and d for d in docs)


def test_prose_paragraphs():
    paras = corpus.prose_paragraphs()
    assert len(paras) > 200 and paras == corpus.prose_paragraphs()
    assert corpus.prose_paragraphs(10) == paras[:10]
    for p in paras:
        assert len(p) >= 200 and p == " ".join(p.split()) and ">>>" not in p


def test_missing_stdlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="standard library sources not found"):
        corpus.stdlib_dir()


# ----------------------------------------------------------------------------- token-balanced keys


def test_token_balanced_keys_favour_rare_tokens():
    from memsparse.eval.tasks.kinds import TokenBalancedNumbers

    # a merged-digit BPE that has seen " 31337" often: that key is one token no other key contains
    bpe = train_bpe(["x = 31337 + 31337\n" * 50 + "y = 12 + 34\n" * 20], vocab_size=300, split_digits=False)
    assert len(bpe.encode(" 31337")) == 1
    kind = TokenBalancedNumbers(5, balance=0.5)
    p = kind.probabilities(bpe)
    assert p.shape == (90000,) and abs(p.sum() - 1) < 1e-9
    assert p[31337 - 10000] > 100 / 90000  # the single-token key: far above the uniform 1/90000
    a = [kind.draw_for(np.random.default_rng(7), bpe)[0] for _ in range(2)]
    assert a[0] == a[1] and 10000 <= int(a[0]) <= 99999  # deterministic per rng
    uniform = TokenBalancedNumbers(5, balance=0.0).probabilities(bpe)
    assert np.allclose(uniform, 1 / 90000)
    bal = TokenBalancedNumbers(5, balance=0.5)
    assert pickle.loads(pickle.dumps(bal)).probabilities(bpe)[31337 - 10000] == p[31337 - 10000]
    with pytest.raises(ValueError, match="balance must be in"):
        TokenBalancedNumbers(5, balance=1.5)
    with pytest.raises(ValueError, match="at most"):
        TokenBalancedNumbers(8)
    # the task trains the rare key often; plain passkey almost never draws it
    task = get_task("passkey_balanced")
    n = task.min_length(bpe) + 20
    hits = sum(task.generate(n, 0.5, seed=i, tokenizer=bpe).answer == "31337" for i in range(400))
    assert hits >= 3
    assert get_task("passkey").generate(n, 0.5, seed=1, tokenizer=bpe).answer != "31337"
    full = get_task("passkey_balanced_full")
    assert full.values.probabilities(bpe)[31337 - 10000] > 1.9 * p[31337 - 10000]  # balance 1.0 against 0.5
