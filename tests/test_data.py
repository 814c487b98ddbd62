"""The training data: packing, splits, file reading, tokenizers, synthetic mixture, resumable sharded loading."""

import glob
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from memsparse.train.data import (
    DataConfigError,
    MemSparseDataModule,
    SyntheticSpec,
    load_documents,
    split_documents,
)
from memsparse.train.packing import (
    IGNORE_INDEX,
    MixtureDataset,
    PackedTextDataset,
    SyntheticTaskDataset,
    pack_stream,
)
from memsparse.train.sampler import ResumableDataLoader, ResumableDistributedSampler

from memsparse.tokenizer import ByteTokenizer


def _registry_available() -> bool:
    try:
        from memsparse.eval.tasks import get_task

        get_task("passkey")
        return True
    except Exception:
        return False


needs_registry = pytest.mark.skipif(not _registry_available(), reason="memsparse.eval.tasks not importable yet")


def _write_docs(tmp_path, n=8, size=120):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta\n", "theta"]
    paths = []
    for i in range(n):
        text = f"doc{i} " + " ".join(rng.choice(words, size // 6))
        p = tmp_path / f"d{i}.txt"
        p.write_text(text)
        paths.append(p)
    return paths


def _dm(tmp_path, **kw):
    kw.setdefault("files", [str(tmp_path / "*.txt")])
    kw.setdefault("seq_len", 32)
    kw.setdefault("batch_size", 2)
    kw.setdefault("tokenizer_dir", str(tmp_path / "tok"))
    dm = MemSparseDataModule(**kw)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- packing


def test_packing_windows_labels_and_padding():
    stream = pack_stream([np.array([1, 2, 3]), np.array([4, 5])], eos_id=9)
    assert stream.tolist() == [1, 2, 3, 9, 4, 5, 9]
    ds = PackedTextDataset(stream, seq_len=4, pad_id=8, eos_id=9)
    assert len(ds) == 2  # ceil((7 - 1) / 4)
    a, b = ds[0], ds[1]
    assert a["input_ids"].tolist() == [1, 2, 3, 9] and a["labels"].tolist() == [2, 3, 9, 4]
    assert a["doc_ids"].tolist() == [0, 0, 0, 0]  # the eos closes document 0
    assert b["input_ids"].tolist() == [4, 5, 9, 8] and b["labels"].tolist() == [5, 9, -100, -100]
    assert b["doc_ids"].tolist() == [0, 0, 0, -1]
    # every stream token after the first is a label exactly once
    labels = torch.cat([a["labels"], b["labels"]])
    assert labels[labels != IGNORE_INDEX].tolist() == stream[1:].tolist()


def test_packed_batches_shapes_and_eos_boundaries(tmp_path):
    paths = _write_docs(tmp_path)
    dm = _dm(tmp_path, val_fraction=0.0)
    tok = dm.tokenizer
    assert dm.vocab_size == tok.vocab_size == 259
    items = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    for it in items:
        assert it["input_ids"].shape == it["labels"].shape == it["doc_ids"].shape == (32,)
        # labels are inputs shifted by one inside the sequence
        real = it["labels"] != IGNORE_INDEX
        assert torch.equal(it["labels"][:-1][real[:-1]], it["input_ids"][1:][real[:-1]])
        # a new document starts right after every eos
        ends = (it["input_ids"] == tok.eos_id).nonzero().flatten().tolist()
        for e in ends:
            if e + 1 < 32 and it["doc_ids"][e + 1] >= 0:
                assert it["doc_ids"][e + 1] == it["doc_ids"][e] + 1
    inputs = torch.cat([it["input_ids"] for it in items])
    assert int((inputs == tok.eos_id).sum()) == len(paths)  # one eos per document (text file)
    texts = sorted(p.read_text() for p in paths)
    stream = [t for it in items for t in it["input_ids"].tolist() if t != tok.pad_id]
    decoded = sorted(tok.decode(stream[i:j]) for i, j in zip(
        [0] + [k + 1 for k, t in enumerate(stream) if t == tok.eos_id][:-1],
        [k for k, t in enumerate(stream) if t == tok.eos_id]))
    assert decoded == texts


# ----------------------------------------------------------------------------------------------- split


def test_split_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(200)]
    tr, va = split_documents(docs, 0.2, seed=3)
    tr2, va2 = split_documents(list(reversed(docs)), 0.2, seed=3)
    assert sorted(tr) == sorted(tr2) and sorted(va) == sorted(va2)  # by content, not position
    assert not set(tr) & set(va) and set(tr) | set(va) == set(docs)
    assert 20 <= len(va) <= 60
    assert set(split_documents(docs, 0.2, seed=4)[1]) != set(va)
    assert split_documents(["a", "b"], 0.01, seed=0)[1]  # both sides non-empty
    assert split_documents(docs, 0.0)[1] == []


def test_datamodule_split_and_val_loader(tmp_path):
    _write_docs(tmp_path, n=12)
    a, b = _dm(tmp_path, val_fraction=0.3), _dm(tmp_path, val_fraction=0.3)
    assert a.documents() == b.documents()
    tr, va = a.documents()
    assert va and not set(tr) & set(va)
    vb = next(iter(a.val_dataloader()))
    assert vb["input_ids"].shape[1] == 32


# ----------------------------------------------------------------------------------------------- files


def test_reads_text_jsonl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("line one\nline two\n\nstill doc a\n")
    (tmp_path / "b.txt").write_text("doc b")
    assert sorted(load_documents([str(tmp_path / "*.txt")])) == ["doc b", "line one\nline two\n\nstill doc a\n"]

    rows = [{"content": "json one", "id": 1}, {"content": "json two\nwith newline", "id": 2}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents([str(tmp_path / "x.jsonl")], text_field="content") == [r["content"] for r in rows]

    pq.write_table(pa.table({"body": ["pq one", "pq two", None]}), tmp_path / "y.parquet")
    assert load_documents([str(tmp_path / "y.parquet")], text_field="body") == ["pq one", "pq two"]

    dm = _dm(tmp_path, files=[str(tmp_path / "y.parquet")], text_field="body", val_fraction=0.0)
    assert sorted(dm.documents()[0]) == ["pq one", "pq two"]


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents([missing])
    dm = MemSparseDataModule(files=[str(tmp_path / "absent.txt")], tokenizer_dir=str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        dm.setup()


def test_missing_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"text_field 'text'.*columns: \['body'\]"):
        load_documents([str(tmp_path / "x.jsonl")])


# ----------------------------------------------------------------------------------------------- tokenizer


def test_bpe_trained_on_train_docs_saved_and_reloaded(tmp_path):
    _write_docs(tmp_path, n=10, size=600)
    a = _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3)
    tok_dir = tmp_path / "tok"
    assert a.tokenizer.kind == "bpe" and (tok_dir / "tokenizer.json").exists()
    meta = json.loads((tok_dir / "memsparse_tokenizer_data.json").read_text())
    assert meta["train_documents"] == len(a.documents()[0])  # trained on the training documents only
    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    b = _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime  # reloaded, not retrained
    text = "".join(a.documents()[1])
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    assert torch.equal(a.train_dataset[0]["input_ids"], b.train_dataset[0]["input_ids"])
    assert a.vocab_size == b.vocab_size == 300 >= a.tokenizer.vocab_size
    c = _dm(tmp_path, tokenizer=str(tok_dir), val_fraction=0.3)  # a saved tokenizer by path
    assert c.tokenizer.encode(text) == a.tokenizer.encode(text)
    with pytest.raises(ValueError, match="vocab_size=300"):
        _dm(tmp_path, tokenizer="bpe", vocab_size=320)
    with pytest.raises(ValueError, match="split_digits=True.*bpe_split_digits=False"):
        _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3, bpe_split_digits=False)


@pytest.mark.parametrize("split", [True, False])
def test_bpe_digits_one_token_each(split):
    from memsparse.tokenizer import train_bpe

    docs = [f"x = {n} + {n * 7} # 32684 32684 32684 {n:05d}\n" * 3 for n in range(300)]
    tok = train_bpe(iter(docs), 400, split_digits=split)
    for text in ("The pass key is 32684. Remember it.", "a = 3.14159e10\n\tf(12, 007)"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in tok.encode(" 32684")]
    if split:
        assert pieces[-5:] == list("32684") and all(len(p.strip()) <= 1 for p in pieces)
    else:  # without the split the corpus's frequent number is merged
        assert len(pieces) < 5


def test_bpe_digit_groups_cut_numbers_into_short_runs(tmp_path):
    from memsparse.tokenizer import train_bpe

    docs = [f"x = {n} + {n * 7} # 32684 32684 32684 {n:05d}\n" * 3 for n in range(300)]
    tok = train_bpe(iter(docs), 400, split_digits=False, digit_group=2)
    for text in ("The pass key is 32684. Remember it.", "a = 3.14159e10\n\tf(12, 007)"):
        assert tok.decode(tok.encode(text)) == text
    pieces = [tok.decode([i]) for i in tok.encode(" 32684")]
    assert "".join(pieces) == " 32684" and all(len(p.strip()) <= 2 for p in pieces)  # the merged BPE: one token
    assert pieces[0].startswith(" 3")  # the space stays with the first run
    with pytest.raises(ValueError, match="digit_group"):
        train_bpe(iter(docs), 400, split_digits=True, digit_group=2)
    _write_docs(tmp_path, n=10, size=600)
    with pytest.raises(ValueError, match="data.bpe_digit_group.*bpe_split_digits false"):
        _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3, bpe_digit_group=2)
    with pytest.raises(ValueError, match="data.bpe_digit_group"):
        _dm(tmp_path, tokenizer="bpe", vocab_size=300, bpe_split_digits=False, bpe_digit_group=-1)
    a = _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3, bpe_split_digits=False, bpe_digit_group=3)
    with pytest.raises(ValueError, match="digit_group=3.*bpe_digit_group=0"):  # the saved BPE keeps its runs
        _dm(tmp_path, tokenizer="bpe", vocab_size=300, val_fraction=0.3, bpe_split_digits=False)
    assert a.tokenizer.vocab_size <= 300


# ----------------------------------------------------------------------------------------------- synthetic


@dataclass
class _S:
    prompt_ids: list
    answer_ids: list
    answer: str


class _VarAnswerTask:
    """Answer length depends on the seed (1..3 digits): exercises the exact-fit loop."""

    name = "dummy"

    def generate(self, length, depth, seed, tokenizer):
        rng = np.random.default_rng(seed)
        ans = str(rng.integers(10 ** (1 + seed % 3)))
        return _S(rng.integers(97, 123, length).tolist(), tokenizer.encode(" " + ans), ans)

    def min_length(self, tokenizer):
        return 1

    def max_answer_tokens(self, tokenizer):
        return 4


def test_synthetic_exact_lengths_and_answer_labels():
    tok = ByteTokenizer()
    ds = SyntheticTaskDataset(_VarAnswerTask(), 50, [20, 32], seq_len=32, tokenizer=tok, seed=1, source=1)
    lengths = set()
    for i in range(50):
        it = ds[i]
        length, _, _ = ds.params(i)
        lengths.add(length)
        n_real = int((it["doc_ids"] >= 0).sum())
        assert n_real == min(length + 1, 32)  # prompt + answer + eos == length + 1 tokens
        lab = it["labels"][it["labels"] != IGNORE_INDEX].tolist()
        assert lab[-1] == tok.eos_id and tok.decode(lab[:-1]).startswith(" ")
        assert (it["labels"][length:] == IGNORE_INDEX).all()
    assert lengths == {20, 32}
    full = SyntheticTaskDataset(_VarAnswerTask(), 5, [32], 32, tok, seed=1, source=1, loss="all")[0]
    assert (full["labels"] != IGNORE_INDEX).sum() == 32
    assert torch.equal(ds[7]["input_ids"], ds[7]["input_ids"])  # deterministic per index
    assert not torch.equal(ds[7]["input_ids"], ds[7 + 50]["input_ids"])  # another epoch, another sample


@needs_registry
def test_synthetic_asks_insert_labelled_answers_after_the_needle():
    tok = ByteTokenizer()
    one = SyntheticTaskDataset("passkey", 12, [700, 1024], 1024, tok, seed=3, source=1)
    three = SyntheticTaskDataset("passkey", 12, [700, 1024], 1024, tok, seed=3, source=1, asks=3)
    question = tok.encode("\nWhat is the pass key? The pass key is")
    for i in range(12):
        length, _, _ = three.params(i)
        a, b = one[i], three[i]
        n = int((b["doc_ids"] >= 0).sum())
        assert n == min(length + 1, 1024)  # still exactly prompt + answers + eos
        ids, lab = b["input_ids"][:n].tolist(), b["labels"]
        text = tok.decode(ids)
        key = text[text.index("The pass key is ") + 16:][:5]
        starts = [j + len(question) for j in range(n) if ids[j:j + len(question)] == question]
        assert len(starts) == 3 and starts[0] > text.index(f"{key} is the pass key.")  # all after the needle
        answer = tok.encode(" " + key)
        labelled = (lab != IGNORE_INDEX).nonzero().flatten().tolist()
        expected = [s - 1 + k for s in starts for k in range(len(answer))] + [starts[-1] - 1 + len(answer)]
        assert labelled == expected  # every answer (its targets), and the eos after the last one
        for s in starts[:2]:
            assert ids[s:s + len(answer)] == answer
        # the key: twice in the needle, then once per answer; asks=1 is the plain sample with the same key
        assert text.count(key) == 5 and tok.decode(a["input_ids"][a["doc_ids"] >= 0].tolist()).count(key) == 3
    with pytest.raises(ValueError, match="asks must be an integer >= 1"):
        SyntheticTaskDataset("passkey", 2, [700], 1024, tok, seed=3, source=1, asks=0)
    with pytest.raises(ValueError, match="too short for asks=4"):
        SyntheticTaskDataset("passkey", 2, [320], 1024, tok, seed=3, source=1, asks=4)
    with pytest.raises(ValueError, match="needs a needle task"):
        SyntheticTaskDataset(_VarAnswerTask(), 2, [32], 32, tok, seed=1, source=1, asks=2)


@needs_registry
def test_synthetic_asks_that_do_not_fit_are_a_config_error(tmp_path):
    _write_docs(tmp_path, n=6, size=600)
    with pytest.raises(DataConfigError, match=r"data\.synthetic\[0\].*too short for asks=3"):
        _dm(tmp_path, seq_len=320, synthetic=[SyntheticSpec("passkey", 0.5, [300], asks=3)])
    with pytest.raises(DataConfigError, match=r"data\.synthetic\[0\]\.asks.*>= 1"):
        _dm(tmp_path, seq_len=320, synthetic=[SyntheticSpec("passkey", 0.5, [300], asks=0)])


@needs_registry
def test_synthetic_mixture_proportions_lengths_determinism(tmp_path):
    _write_docs(tmp_path, n=30, size=1200)
    kw = dict(seq_len=320, batch_size=2, val_fraction=0.1, synthetic_loss="answer",
              synthetic=[SyntheticSpec("passkey", 0.3, [300, 320]), SyntheticSpec("passkey", 0.2, [])])
    a, b = _dm(tmp_path, **kw), _dm(tmp_path, **kw)
    src = Counter(a.train_dataset.sources().tolist())
    n = len(a.train_dataset)
    assert abs(src[1] / n - 0.3) < 0.05 and abs(src[2] / n - 0.2) < 0.05 and src[0] > 0
    assert Counter(a.val_dataset.sources().tolist())[1] > 0
    offset = src[0]
    for i in range(offset, offset + 6):
        x, y = a.train_dataset[i], b.train_dataset[i]
        for k in x:
            assert torch.equal(x[k], y[k])
        assert int(x["source"]) == 1
        n_real = int((x["doc_ids"] >= 0).sum())
        assert n_real - 1 in (300, 320) or n_real == 320
        lab = x["labels"][x["labels"] != IGNORE_INDEX].tolist()
        assert lab[-1] == a.tokenizer.eos_id and a.tokenizer.decode(lab[:-1]).strip().isdigit()
    last = a.train_dataset[n - 1]
    assert int(last["source"]) == 2 and int((last["doc_ids"] >= 0).sum()) == 320  # fills seq_len exactly
    only = _dm(tmp_path, seq_len=300, val_fraction=0.0, synthetic_samples=10,
               synthetic=[SyntheticSpec("passkey", 1.0, [])])
    assert len(only.train_dataset) == 10 and set(only.train_dataset.sources().tolist()) == {1}


@needs_registry
def test_synthetic_loader_workers_match_main_process(tmp_path):
    _write_docs(tmp_path, n=10, size=600)
    kw = dict(seq_len=300, batch_size=2, val_fraction=0.0, synthetic=[SyntheticSpec("passkey", 0.5, [])])
    ref = [b["input_ids"] for _, b in zip(range(4), _dm(tmp_path, **kw).train_dataloader())]
    got = [b["input_ids"] for _, b in zip(range(4), _dm(tmp_path, num_workers=2, **kw).train_dataloader())]
    assert all(torch.equal(x, y) for x, y in zip(ref, got))


# ----------------------------------------------------------------------------------------------- resume, DDP


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i  # raw index (epoch offset included)


def _loader(n=23, bs=3, rank=0, world=1, seed=0):
    ds = _Ids(n)
    return ResumableDataLoader(ds, ResumableDistributedSampler(ds, bs, world, rank, seed=seed, epoch_indices=True))


def _run(loader, epochs, start_epoch=0):
    out = []
    for e in range(start_epoch, epochs):
        loader.sampler.set_epoch(e)
        out += [b.tolist() for b in loader]
    return out


def test_sampler_state_roundtrip_identical_continuation():
    full = _run(_loader(), 3)
    per_epoch = len(_loader())
    assert per_epoch == 7 and len(full) == 21
    assert full[:7] != full[7:14]  # reshuffled per epoch
    assert sorted(i % 23 for b in full[:7] for i in b) == sorted(set(i % 23 for b in full[:7] for i in b))
    for stop in (0, 3, 7, 10):
        a = _loader()
        seen, epoch = [], 0
        while len(seen) < stop:  # consume exactly `stop` batches (a `for` loop would fetch one more)
            a.sampler.set_epoch(epoch)
            it = iter(a)
            seen += [next(it).tolist() for _ in range(min(per_epoch, stop - len(seen)))]
            epoch += 1
        state = a.state_dict()
        b = _loader()
        b.load_state_dict(state)
        epoch = b.sampler.epoch
        rest = [x.tolist() for x in b]  # the rest of the interrupted epoch
        rest += _run(b, 3, start_epoch=epoch + 1)
        assert seen + rest == full, stop
    # the same seed gives the same order; another seed another
    assert _run(_loader(seed=0), 1) == full[:7] and _run(_loader(seed=1), 1) != full[:7]


def test_ddp_shards_disjoint_equal_length():
    world = 3
    loaders = [_loader(n=40, bs=4, rank=r, world=world) for r in range(world)]
    assert len({len(dl) for dl in loaders}) == 1 and len(loaders[0]) == 3
    for epoch in (0, 1):
        shards = [set(i for b in _run(dl, epoch + 1, epoch) for i in b) for dl in loaders]
        assert all(len(s) == 12 for s in shards)
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])


def test_datamodule_loader_rank_shards(tmp_path):
    _write_docs(tmp_path, n=10, size=600)
    dm = _dm(tmp_path, val_fraction=0.0, batch_size=2)
    first = [next(iter(dm.build_train_loader(rank=r, world_size=2)))["input_ids"] for r in range(2)]
    assert not torch.equal(first[0], first[1])
    assert len(dm.build_train_loader(rank=0, world_size=2)) == len(dm.build_train_loader(rank=1, world_size=2))


# ----------------------------------------------------------------------------------------------- Lightning resume


def _fit(tmp_path, dm_kwargs, max_steps, ckpt_path=None, every=None, estimated=False, name="run"):
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"][:, :6].tolist())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            if estimated:  # builds the train loader before the checkpoint is restored (Lightning #20550)
                assert self.trainer.estimated_stepping_batches > 0
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callbacks = [ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path / name)
    model = Recorder()
    dm = MemSparseDataModule(**dm_kwargs)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


# mid-epoch, at the epoch's end, in the second epoch; and with the loader built before the restore
@pytest.mark.parametrize(("stop", "estimated"), [(3, False), (5, False), (7, False), (3, True), (5, True)])
def test_lightning_exact_resume(tmp_path, stop, estimated):
    _write_docs(tmp_path, n=8, size=60)
    kw = dict(files=[str(tmp_path / "*.txt")], seq_len=32, batch_size=3, val_fraction=0.0,
              tokenizer_dir=str(tmp_path / "tok"))
    full = _fit(tmp_path, kw, max_steps=14, name="full")
    per_epoch = len(MemSparseDataModule(**kw).build_train_loader())
    assert per_epoch == 5 and full[:per_epoch] != full[per_epoch : 2 * per_epoch]
    first = _fit(tmp_path, kw, max_steps=stop, every=stop, estimated=estimated, name="a")
    assert first == full[:stop]
    ckpt = glob.glob(str(tmp_path / "a" / f"*step={stop}.ckpt"))
    assert ckpt, list((tmp_path / "a").iterdir())
    state = torch.load(ckpt[0], weights_only=False)
    assert state["MemSparseDataModule"]["train_loader"]["batch"] in (stop % per_epoch, per_epoch)
    resumed = _fit(tmp_path, kw, max_steps=14, ckpt_path=ckpt[0], estimated=estimated, name="b")
    assert resumed == full[stop:]


def test_built_from_yaml_by_jsonargparse(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MemSparseDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  seq_len: 64\n  tokenizer: byte\n  synthetic:\n"
        "    - {task: passkey, proportion: 0.25, lengths: [64]}\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert dm.seq_len == 64 and dm.synthetic == [SyntheticSpec("passkey", 0.25, [64])]
    assert dm.hparams["synthetic"] == [{"task": "passkey", "proportion": 0.25, "lengths": [64], "asks": 1,
                                        "depths": [0.0, 1.0]}]


@needs_registry
def test_synthetic_depths_range_places_every_needle_in_it():
    tok = ByteTokenizer()
    full = SyntheticTaskDataset("passkey", 40, [1024], 1024, tok, seed=3, source=1)
    far = SyntheticTaskDataset("passkey", 40, [1024], 1024, tok, seed=3, source=1, depths=(0.0, 0.25))
    explicit = SyntheticTaskDataset("passkey", 40, [1024], 1024, tok, seed=3, source=1, depths=(0.0, 1.0))
    assert all(torch.equal(full[i]["input_ids"], explicit[i]["input_ids"]) for i in range(5))  # default unchanged
    d_full = [full.params(i)[1] for i in range(40)]
    d_far = [far.params(i)[1] for i in range(40)]
    assert max(d_far) <= 0.25 and max(d_full) > 0.5
    assert d_far == pytest.approx([0.25 * d for d in d_full])  # the same draws, scaled into the range
    pos = []
    for i in range(10):
        text = tok.decode(far[i]["input_ids"].tolist())
        pos.append(text.index("is the pass key.") / len(text))
    assert max(pos) < 0.35  # every needle in the first part of the haystack


def test_synthetic_depths_out_of_range_are_a_config_error(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.synthetic\[0\]\.depths.*0 <= lo <= hi <= 1"):
        _dm(tmp_path, seq_len=320, synthetic=[SyntheticSpec("passkey", 0.5, [300], depths=[0.5, 0.2])])
    with pytest.raises(DataConfigError, match=r"data\.synthetic\[0\]\.depths"):
        _dm(tmp_path, seq_len=320, synthetic=[SyntheticSpec("passkey", 0.5, [300], depths=[0.0])])


def test_interleaved_mixture_deals_parts_in_proportion():
    """MixtureDataset(interleave=True): the same items as the concatenation, each prefix holding every part in
    proportion to its size (an unshuffled validation loader cut short sees the whole mixture)."""

    class Part(torch.utils.data.Dataset):
        def __init__(self, source, n):
            self.source, self.n = source, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"source": torch.tensor(self.source), "i": torch.tensor(i % self.n)}

    parts = [Part(0, 6), Part(1, 30), Part(2, 12)]
    plain, mixed = MixtureDataset(parts), MixtureDataset(parts, interleave=True)
    items = sorted((int(mixed[j]["source"]), int(mixed[j]["i"])) for j in range(len(mixed)))
    assert items == sorted((int(plain[j]["source"]), int(plain[j]["i"])) for j in range(len(plain)))
    assert [int(mixed[j]["source"]) for j in range(len(mixed))] == mixed.sources().tolist()
    for n in (8, 16, 24):  # a prefix of n items: each part's share within one item of n * len(part) / 48
        c = Counter(mixed.sources()[:n].tolist())
        assert all(abs(c[k] - n * len(p) / 48) <= 1 for k, p in enumerate(parts))
    assert set(plain.sources()[:16].tolist()) == {0, 1}  # the concatenation's prefix misses part 2
    assert int(mixed[len(mixed) + 1]["i"]) == int(mixed[1]["i"])  # the epoch wraps as before


@needs_registry
def test_validation_cut_short_sees_every_synthetic_task(tmp_path):
    """The val split is interleaved: its first batches hold every task of the mixture (limit_val_batches)."""
    _write_docs(tmp_path, n=30, size=1200)
    dm = _dm(tmp_path, seq_len=320, batch_size=2, val_fraction=0.2, synthetic_samples=200, synthetic_loss="answer",
             synthetic=[SyntheticSpec("passkey", 0.5, [300]), SyntheticSpec("passkey", 0.2, [320])])
    first = next(iter(torch.utils.data.DataLoader(dm.val_dataset, batch_size=12, shuffle=False)))
    assert set(first["source"].tolist()) >= {1, 2}
