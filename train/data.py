"""The training data: local documents (or the stdlib's own sources), a tokenizer, packing, synthetic tasks.

`MemSparseDataModule` is built by LightningCLI from YAML (`data:` section). Batches are dicts:
`input_ids` (B, seq_len), `labels` (B, seq_len) with -100 where no loss is taken, `doc_ids` (B, seq_len)
(document index inside each sequence, -1 on padding) and `source` (B,) (0 text, 1 + k synthetic task k).
Labels are already shifted: `labels[:, t]` is the token after `input_ids[:, t]`.

Everything is local: `datasets` runs offline (the environment variables below are set before it is
imported), the default corpus is the Python standard library's source, and the synthetic long-context
tasks are generated in code from the `memsparse.eval.tasks` registry.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from memsparse.config import ConfigError  # noqa: E402
from memsparse.tokenizer import ByteTokenizer, load_tokenizer, train_bpe  # noqa: E402

from .packing import (  # noqa: E402
    MixtureDataset,
    PackedTextDataset,
    SyntheticTaskDataset,
    encode_documents,
    pack_stream,
)
from .sampler import ResumableDataLoader, ResumableDistributedSampler  # noqa: E402

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FORMATS = ("auto", "text", "json", "parquet")
_TOKENIZER_META = "memsparse_tokenizer.json"  # written by Tokenizer.save
_DATA_META = "memsparse_tokenizer_data.json"  # ours: what the BPE was trained on
_TEST_SEED_OFFSET = 7919  # the test split's hash seed is `seed + this` (independent of the validation split)


@dataclass
class SyntheticSpec:
    """One task of the synthetic mixture.

    task: a name in `memsparse.eval.tasks`; proportion: its share of all training sequences (the text gets
    what the tasks leave); lengths: sequence lengths (tokens, <= seq_len) drawn uniformly per sample
    (empty: [seq_len], which fills every sequence exactly); asks: how often a sample asks its question (> 1: the
    question and its answer are also inserted asks - 1 times between the last needle and the end, each answer
    labelled, so a long row trains several answers at several distances); depths: [lo, hi], the range the needle's
    depth is drawn from uniformly (0: the start of the haystack, farthest from the question; 1: its end); [0, 0.25]
    at 2K puts every key 1.5-2K tokens back, beyond what attention relays through the retrieval recipes' layers.
    """

    task: str
    proportion: float
    lengths: list[int] = field(default_factory=list)
    asks: int = 1
    depths: list[float] = field(default_factory=lambda: [0.0, 1.0])


class DataConfigError(ConfigError):
    """A data setting that cannot work with the data given (reported by `memsparse-train` as one line)."""


class DataFileNotFoundError(DataConfigError, FileNotFoundError):
    """A data path, glob or directory that names no data file."""


# ---------------------------------------------------------------------------------------------- files


def resolve_files(patterns: Sequence[str], key: str = "data.files") -> list[Path]:
    """Paths, globs (`**` recursive) or directories -> sorted unique files; DataFileNotFoundError (a
    FileNotFoundError) naming the setting `key` and the pattern that matches nothing."""
    out: set[Path] = set()
    for pattern in patterns:
        p = Path(os.path.expanduser(str(pattern)))
        if p.is_dir():
            found = [q for q in p.rglob("*") if q.is_file() and _infer_format(q, strict=False)]
            if not found:
                suffixes = ", ".join(TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
                shown = repr(str(pattern)) + ("" if p.is_absolute() else f" ({p.absolute()})")
                raise DataFileNotFoundError(f"the directory {shown} holds no data file (files ending in {suffixes})",
                                            key=key)
        elif p.is_file():
            found = [p]
        else:
            found = [Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file()]
        if not found:
            raise DataFileNotFoundError(f"no data file matches {str(pattern)!r} (resolved as {p.absolute()})", key=key)
        out.update(q.absolute() for q in found)
    return sorted(out)


def _infer_format(path: Path, strict: bool = True) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in (("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    if strict:
        raise DataConfigError(f"cannot tell the format of {path} from its suffix; set data.data_format to 'text', "
                              "'json' or 'parquet'")
    return None


def load_documents(
    files: Sequence[str], data_format: str = "auto", text_field: str = "text", cache_dir: str | None = None,
    key: str = "data.files",
) -> list[str]:
    """Read local files through `datasets`, offline: one document per text file, per JSON line/record,
    per Parquet row (its `text_field`). Empty documents are dropped; order: formats, then sorted paths.
    `key` is the setting that named the files (in error messages)."""
    if data_format not in FORMATS:
        raise DataConfigError(f"must be one of {', '.join(FORMATS)}, got {data_format!r}", key="data.data_format")
    paths = resolve_files(files, key)
    groups: dict[str, list[str]] = {}
    for p in paths:
        fmt = data_format if data_format != "auto" else _infer_format(p)
        groups.setdefault(fmt, []).append(str(p))

    import datasets  # after the offline variables are set

    datasets.config.HF_HUB_OFFLINE = True  # even if `datasets` was imported before us
    datasets.config.HF_DATASETS_OFFLINE = True
    docs: list[str] = []
    for fmt in sorted(groups):
        group = groups[fmt]
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=group, sample_by="document", encoding_errors="replace",
                                       split="train", cache_dir=cache_dir)
            column = "text"
        else:
            ds = datasets.load_dataset(fmt, data_files=group, split="train", cache_dir=cache_dir)
            column = text_field
            if column not in ds.column_names:
                shown = group if len(group) <= 3 else group[:3] + [f"... ({len(group)} files)"]
                raise DataConfigError(
                    f"data.text_field {column!r} is not a column of {shown}; columns: {ds.column_names}")
        docs.extend(str(t) for t in ds[column] if t is not None and str(t) != "")
    return docs


def default_documents(limit: int | None = None) -> list[str]:
    """The default corpus: the Python standard library's own .py sources (the first `limit` files)."""
    from memsparse.corpus import read_documents, stdlib_source_files

    return [d for d in read_documents(stdlib_source_files(limit)) if d]


def _doc_hash(doc: str, seed: int) -> int:
    h = hashlib.blake2b(doc.encode("utf-8", errors="replace"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little")


def split_documents(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by a seeded hash of each document's content (order-independent; duplicates land
    together). With val_fraction > 0 and >= 2 documents, both sides get at least one document; below 2 documents
    all are training documents (`MemSparseDataModule` then holds out the document's last tokens instead)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or len(docs) < 2:
        return list(docs), []
    u = [_doc_hash(d, seed) / 2.0**64 for d in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[min(range(len(u)), key=u.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(u)), key=u.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def split_tokens(stream: np.ndarray, val_fraction: float, what: str = "the text") -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams: the last `val_fraction` of `stream` (at least 2 tokens, one label) is validation;
    DataConfigError when either side would have no label."""
    n = len(stream)
    n_val = max(2, round(val_fraction * n))
    if n - n_val < 2:
        raise DataConfigError(f"{what} has {n} tokens: too few to hold out val_fraction={val_fraction} of them for "
                              "validation and train on the rest; give more text, data.val_files or val_fraction: 0")
    return stream[: n - n_val], stream[n - n_val :]


def read_prompts(path: str | None) -> list[str]:
    """The prompts of `predict_file`: .jsonl -> each line's "prompt"; else each non-empty line (`\\n` -> newline)."""
    if not path:
        raise DataConfigError("memsparse-train predict needs prompts: set data.predict_file (a text file, one prompt "
                              'per line, or a .jsonl file with a "prompt" per line)')
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DataConfigError(f"data.predict_file {path} does not exist or is not a file")
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    prompts: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.name.lower().endswith((".jsonl", ".ndjson")):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataConfigError(f"{path}:{n}: not a JSON line ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise DataConfigError(f'{path}:{n}: expected an object with a "prompt" string')
            prompts.append(rec["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise DataConfigError(f"data.predict_file {path} holds no prompt")
    return prompts


class PromptDataset:
    """Prompts for generation: item i is {"index", "prompt", "input_ids"}, the ids led by the end-of-text token
    (in training a document starts after one)."""

    def __init__(self, prompts: Sequence[str], tokenizer: Any) -> None:
        self.prompts, self.tokenizer = list(prompts), tokenizer

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(self.prompts[i])]
        return {"index": i, "prompt": self.prompts[i], "input_ids": torch.tensor(ids, dtype=torch.long)}


def _fingerprint(docs: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for d in docs:
        h.update(hashlib.blake2b(d.encode("utf-8", errors="replace"), digest_size=16).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- DataModule


class MemSparseDataModule(LightningDataModule):
    """Local documents + synthetic long-context tasks, tokenized and packed into (B, seq_len) batches.

    Args:
        files: data files, globs or directories (text: one document per file; JSON lines / Parquet: one per
            record). None or empty: the Python standard library's sources (`stdlib_limit` files).
        val_files: explicit validation files (then `val_fraction` is not used to split `files`).
        data_format: "auto" (by suffix), "text", "json" or "parquet".
        text_field: the column holding the text in JSON / Parquet files.
        stdlib_limit: how many stdlib files the default corpus reads (None: all, ~650 files / 11 MB).
        tokenizer: "byte", "bpe" (trained on the training documents, saved in `tokenizer_dir`, reloaded
            from there if present), or the path of a saved tokenizer.
        vocab_size: BPE vocabulary size (specials included); ignored for "byte" (259).
        bpe_split_digits: a BPE trained here makes every digit a token of its own (numbers copy digit by digit;
            a saved BPE keeps the way it was trained, and asking for the other way is an error).
        bpe_digit_group: n > 0 (with bpe_split_digits false): numbers are cut into runs of at most n digits
            before the BPE learns its merges, so no key is a rare merged token (`train_bpe`'s digit_group).
        tokenizer_dir: where the BPE is saved/loaded; None: `<trainer.default_root_dir>/tokenizer` (stable
            across resumes, unlike the versioned log dir), or `./outputs/tokenizer` without a trainer.
        seq_len: tokens per sequence (inputs and labels are both seq_len long).
        batch_size: sequences per batch and per rank.
        val_fraction: share of documents held out (by a seeded content hash); with fewer than 2 documents (one
            text file), the last `val_fraction` of the text's tokens instead. 0: no validation.
        test_fraction: share of documents held out as the test split of `memsparse-train test` (split off before
            validation, with its own hash seed; one document: its last `test_fraction` of tokens). Set it in the fit
            run as well, so that training never sees the test split. 0: no test split.
        predict_file: prompts for `memsparse-train predict`: a text file (one prompt per non-empty line, `\\n` in
            a line stands for a newline) or a .jsonl file (one object per line with a "prompt" string).
        predict_output: where predictions go (JSON lines); None: `<trainer.default_root_dir>/predictions.jsonl`.
        predict_max_new_tokens, predict_temperature, predict_top_k: decoding of each continuation (greedy at
            temperature 0; it stops early at the end-of-text token).
        seed: seeds the split, the per-epoch shuffle and the synthetic samples.
        synthetic: the synthetic task mixture (proportions of all training sequences, sum <= 1).
        synthetic_loss: "answer" (loss on the answer tokens and the eos after them) or "all".
        synthetic_samples: synthetic sequences per epoch when the proportions sum to 1 (no text).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        cache_dir: the `datasets` cache (None: its default).
    """

    def __init__(
        self,
        files: list[str] | None = None,
        val_files: list[str] | None = None,
        data_format: str = "auto",
        text_field: str = "text",
        stdlib_limit: int | None = None,
        tokenizer: str = "byte",
        vocab_size: int = 8192,
        bpe_split_digits: bool = True,
        bpe_digit_group: int = 0,
        tokenizer_dir: str | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        seed: int = 0,
        synthetic: list[SyntheticSpec] | None = None,
        synthetic_loss: str = "answer",
        synthetic_samples: int = 1024,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str | None = None,
        predict_file: str | None = None,
        predict_output: str | None = None,
        predict_max_new_tokens: int = 64,
        predict_temperature: float = 0.0,
        predict_top_k: int | None = None,
    ) -> None:
        super().__init__()
        def check(ok: bool, key: str, allowed: str, value: Any) -> None:
            if not ok:
                raise DataConfigError(f"must be {allowed}, got {value!r}", key=f"data.{key}")

        check(data_format in FORMATS, "data_format", "one of " + ", ".join(FORMATS), data_format)
        check(synthetic_loss in ("answer", "all"), "synthetic_loss", "answer or all", synthetic_loss)
        check(seq_len >= 2, "seq_len", "an integer >= 2", seq_len)
        check(batch_size >= 1, "batch_size", "an integer >= 1", batch_size)
        check(0.0 <= val_fraction < 1.0, "val_fraction", "in [0, 1)", val_fraction)
        check(0.0 <= test_fraction < 1.0, "test_fraction", "in [0, 1)", test_fraction)
        check(predict_max_new_tokens >= 1, "predict_max_new_tokens", "an integer >= 1", predict_max_new_tokens)
        check(predict_temperature >= 0, "predict_temperature", ">= 0", predict_temperature)
        check(synthetic_samples >= 1, "synthetic_samples", "an integer >= 1", synthetic_samples)
        check(vocab_size >= 1, "vocab_size", "an integer >= 1", vocab_size)
        check(num_workers >= 0, "num_workers", "an integer >= 0", num_workers)
        specs = []
        for k, s in enumerate(synthetic or []):
            try:
                specs.append(s if isinstance(s, SyntheticSpec) else SyntheticSpec(**s))
            except TypeError as e:
                raise DataConfigError(f"expected task, proportion, lengths, asks and depths ({e})",
                                      key=f"data.synthetic[{k}]") from None
        for k, s in enumerate(specs):
            where = f"data.synthetic[{k}]"
            check(s.proportion > 0, f"synthetic[{k}].proportion", "> 0", s.proportion)
            check(all(isinstance(n, int) and n >= 2 for n in s.lengths), f"synthetic[{k}].lengths",
                  "a list of integers >= 2", s.lengths)
            check(isinstance(s.asks, int) and not isinstance(s.asks, bool) and s.asks >= 1, f"synthetic[{k}].asks",
                  "an integer >= 1", s.asks)
            d = s.depths
            check(isinstance(d, (list, tuple)) and len(d) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d)
                  and 0.0 <= d[0] <= d[1] <= 1.0, f"synthetic[{k}].depths", "[lo, hi] with 0 <= lo <= hi <= 1", d)
            if s.lengths and max(s.lengths) > seq_len:
                raise DataConfigError(
                    f"data.seq_len={seq_len} is shorter than the samples of synthetic task {s.task!r} "
                    f"({where}.lengths={s.lengths}): lower {where}.lengths to <= {seq_len} as well (e.g. "
                    f"--data.synthetic '[{{task: {s.task}, proportion: {s.proportion:g}, lengths: [{seq_len}]}}]'), "
                    f"or keep data.seq_len >= {max(s.lengths)}")
        if specs:
            from memsparse.eval.tasks import get_task

            for k, s in enumerate(specs):
                try:
                    get_task(s.task)
                except ValueError as e:
                    raise DataConfigError(str(e), key=f"data.synthetic[{k}].task") from None
        total = sum(s.proportion for s in specs)
        if total > 1.0 + 1e-9:
            raise DataConfigError(f"the proportions sum to {total:g}, more than 1 (the text gets what the tasks leave)",
                                  key="data.synthetic")
        self.save_hyperparameters(ignore=["synthetic"])
        self.hparams["synthetic"] = [asdict(s) for s in specs]  # plain dicts: YAML-safe
        self.files, self.val_files = list(files or []), list(val_files or [])
        self.data_format, self.text_field, self.stdlib_limit = data_format, text_field, stdlib_limit
        self.tokenizer_spec, self.tokenizer_dir = tokenizer, tokenizer_dir
        self.seq_len, self.batch_size, self.val_fraction, self.seed = seq_len, batch_size, val_fraction, seed
        self.synthetic, self.synthetic_loss, self.synthetic_samples = specs, synthetic_loss, synthetic_samples
        self.text_share = 0.0 if total >= 1.0 - 1e-9 else 1.0 - total
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers, self.cache_dir = persistent_workers, cache_dir
        self.test_fraction, self.predict_file, self.predict_output = test_fraction, predict_file, predict_output
        self.predict_max_new_tokens, self.predict_temperature = predict_max_new_tokens, predict_temperature
        self.predict_top_k = predict_top_k

        # The vocabulary the model must cover is known now (CLI links can read it at instantiation):
        # byte -> 259; a saved tokenizer -> its size; bpe -> the requested size (the trained one is <=).
        self.tokenizer: Any = None
        self.tokenizer_path: str | None = None
        if tokenizer == "byte":
            self.tokenizer = ByteTokenizer()
            self.vocab_size = self.tokenizer.vocab_size
        elif tokenizer == "bpe":
            self.vocab_size = vocab_size
        else:
            try:
                self.tokenizer = load_tokenizer(tokenizer)
            except (OSError, ValueError) as e:
                raise DataConfigError(f"must be byte, bpe or the directory of a saved tokenizer; {e}",
                                      key="data.tokenizer") from None
            self.tokenizer_path = str(tokenizer)
            self.vocab_size = self.tokenizer.vocab_size
        self._requested_vocab = vocab_size
        self.bpe_split_digits = bpe_split_digits
        check(isinstance(bpe_digit_group, int) and bpe_digit_group >= 0, "bpe_digit_group", "an integer >= 0",
              bpe_digit_group)
        if bpe_digit_group and bpe_split_digits:
            raise DataConfigError(f"bpe_digit_group={bpe_digit_group} cuts numbers into runs, bpe_split_digits=true "
                                  "into single digits: set data.bpe_split_digits false to use digit runs",
                                  key="data.bpe_digit_group")
        self.bpe_digit_group = bpe_digit_group

        self.train_dataset: MixtureDataset | None = None
        self.val_dataset: MixtureDataset | None = None
        self.test_dataset: MixtureDataset | None = None
        self.predict_dataset: PromptDataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._pending_loader_state: dict[str, Any] | None = None
        self._docs: tuple[list[str], list[str]] | None = None
        self.split_by_tokens = False  # set by `documents`: one document, its last val_fraction of tokens held out
        self.test_by_tokens = False  # likewise for test_fraction
        self._test_docs: list[str] = []

    # ---- documents and tokenizer

    def documents(self) -> tuple[list[str], list[str]]:
        """(train, val) documents: the files (or the stdlib corpus), split deterministically."""
        if self._docs is None:
            docs = (load_documents(self.files, self.data_format, self.text_field, self.cache_dir)
                    if self.files else default_documents(self.stdlib_limit))
            self.test_by_tokens = len(docs) == 1 and self.test_fraction > 0
            docs, self._test_docs = split_documents(docs, self.test_fraction, self.seed + _TEST_SEED_OFFSET)
            if self.val_files:
                train = docs
                val = load_documents(self.val_files, self.data_format, self.text_field, self.cache_dir,
                                     key="data.val_files")
            else:
                train, val = split_documents(docs, self.val_fraction, self.seed)
                self.split_by_tokens = len(docs) == 1 and self.val_fraction > 0
            if not train:
                raise DataConfigError(f"no training documents in data.files={self.files or 'stdlib'} (after holding "
                                      f"out data.test_fraction={self.test_fraction} and data.val_fraction="
                                      f"{self.val_fraction}): give more data")
            self._docs = (train, val)
        return self._docs

    def tokenizer_documents(self) -> list[str]:
        """What a BPE is trained on: the training documents (split by tokens: the document's first
        1 - val_fraction of characters, so the held-out end is not seen)."""
        train, _ = self.documents()
        keep = (1.0 - self.val_fraction if self.split_by_tokens else 1.0) * (
            1.0 - self.test_fraction if self.test_by_tokens else 1.0)
        if keep < 1.0:
            return [train[0][: max(1, round(len(train[0]) * keep))]]
        return train

    def resolve_tokenizer_dir(self) -> Path:
        if self.tokenizer_dir is not None:
            return Path(self.tokenizer_dir)
        root = getattr(self.trainer, "default_root_dir", None) if self.trainer is not None else None
        return Path(root or "outputs") / "tokenizer"

    def _build_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        directory = self.resolve_tokenizer_dir()
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        if not (directory / _TOKENIZER_META).exists() and (not distributed or trainer.is_global_zero):
            train_docs = self.tokenizer_documents()
            tok = train_bpe(iter(train_docs), self._requested_vocab, split_digits=self.bpe_split_digits,
                            digit_group=self.bpe_digit_group)
            tok.save(directory)
            (directory / _DATA_META).write_text(json.dumps(
                {"vocab_size": self._requested_vocab, "split_digits": self.bpe_split_digits,
                 "digit_group": self.bpe_digit_group,
                 "train_documents": len(train_docs),
                 "train_fingerprint": _fingerprint(train_docs)}))
        if distributed:
            trainer.strategy.barrier("memsparse_tokenizer")
        self._load_saved_bpe(directory)

    def _load_saved_bpe(self, directory: Path) -> None:
        tok = load_tokenizer(directory)
        if tok.kind != "bpe":
            raise DataConfigError(f"{directory} holds a {tok.kind!r} tokenizer, but data.tokenizer=bpe was asked for: "
                                  "set another data.tokenizer_dir")
        meta_path = directory / _DATA_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("vocab_size", tok.vocab_size) != self._requested_vocab or tok.vocab_size > self._requested_vocab:
            raise DataConfigError(
                f"the BPE saved in {directory} was trained with vocab_size={meta.get('vocab_size', tok.vocab_size)}"
                f", but data.vocab_size={self._requested_vocab} is asked for: remove it or set another "
                "data.tokenizer_dir")
        if meta.get("split_digits", self.bpe_split_digits) != self.bpe_split_digits:  # older BPEs: not recorded
            raise DataConfigError(
                f"the BPE saved in {directory} was trained with split_digits={meta['split_digits']}, but "
                f"data.bpe_split_digits={self.bpe_split_digits} is asked for: set it to {meta['split_digits']}, "
                "remove the directory or set another data.tokenizer_dir")
        if meta.get("digit_group", self.bpe_digit_group) != self.bpe_digit_group:
            raise DataConfigError(
                f"the BPE saved in {directory} was trained with digit_group={meta['digit_group']}, but "
                f"data.bpe_digit_group={self.bpe_digit_group} is asked for: set it to {meta['digit_group']}, "
                "remove the directory or set another data.tokenizer_dir")
        if "train_fingerprint" in meta:
            train_docs = self.tokenizer_documents()
            if meta["train_fingerprint"] != _fingerprint(train_docs):
                import warnings

                warnings.warn(f"reusing the BPE saved in {directory}, which was trained on other training "
                              "documents than the current ones", stacklevel=3)
        self.tokenizer, self.tokenizer_path = tok, str(directory)

    # ---- datasets

    def prepare_data(self) -> None:
        """Fail early (on rank 0) when a data file is missing."""
        if self.files:
            resolve_files(self.files)
        if self.val_files:
            resolve_files(self.val_files)

    def setup(self, stage: str | None = None) -> None:
        """Tokenizer (trained if needed), packed text and synthetic datasets (for "predict": the prompts);
        idempotent."""
        if stage == "predict":
            self._build_tokenizer()
            if self.predict_dataset is None:
                self.predict_dataset = PromptDataset(read_prompts(self.predict_file), self.tokenizer)
            return
        if stage == "test" and self.test_fraction == 0:
            raise DataConfigError("memsparse-train test evaluates a held-out test split: set data.test_fraction "
                                  "(e.g. 0.05), the same as in the fit run, so that training never saw it")
        if self.train_dataset is not None:
            return
        self._build_tokenizer()
        tok = self.tokenizer
        tasks = self._tasks()

        def text_dataset(docs: list[str]) -> PackedTextDataset:
            stream = pack_stream(encode_documents(tok, docs), tok.eos_id)
            return PackedTextDataset(stream, self.seq_len, tok.pad_id, tok.eos_id)

        train_docs, val_docs = self.documents() if self.text_share > 0 else ([], [])
        test_docs = self._test_docs if self.text_share > 0 else []
        if self.text_share > 0 and (self.split_by_tokens or self.test_by_tokens):
            stream = pack_stream(encode_documents(tok, train_docs), tok.eos_id)
            what, n = f"the one document of {self.files}", len(stream)
            test_ids = np.zeros(0, dtype=np.int32)
            if self.test_by_tokens:
                stream, test_ids = split_tokens(stream, self.test_fraction, what)
            if self.split_by_tokens:
                train_ids, val_ids = split_tokens(stream, self.val_fraction, what)
            else:
                train_ids, val_ids = stream, pack_stream(encode_documents(tok, val_docs), tok.eos_id)
            train_text = PackedTextDataset(train_ids, self.seq_len, tok.pad_id, tok.eos_id)
            val_text = PackedTextDataset(val_ids, self.seq_len, tok.pad_id, tok.eos_id)
            test_text = PackedTextDataset(test_ids, self.seq_len, tok.pad_id, tok.eos_id)
            rank_zero_info(f"data: one document of {n} tokens, split by tokens: {len(train_ids)} train, then "
                           f"{len(val_ids)} validation, then {len(test_ids)} test (val_fraction={self.val_fraction}, "
                           f"test_fraction={self.test_fraction})")
        else:
            train_text, val_text = text_dataset(train_docs), text_dataset(val_docs)
            test_text = text_dataset(test_docs)
        with_val = bool(self.val_files) or self.val_fraction > 0
        if self.text_share > 0:
            scale_train = len(train_text) / self.text_share
            scale_val = len(val_text) / self.text_share
        else:
            scale_train = float(self.synthetic_samples)
            scale_val = max(1.0, self.val_fraction * self.synthetic_samples) if with_val else 0.0

        def synthetic_parts(scale: float, stream: int) -> list[SyntheticTaskDataset]:
            parts = []
            for k, (spec, task) in enumerate(zip(self.synthetic, tasks)):
                n = max(1, round(scale * spec.proportion)) if scale > 0 else 0
                try:
                    parts.append(SyntheticTaskDataset(
                        task, n, spec.lengths or [self.seq_len], self.seq_len, tok, self.seed, source=1 + k,
                        stream=stream, loss=self.synthetic_loss, vary_by_epoch=stream == 0, asks=spec.asks,
                        depths=(float(spec.depths[0]), float(spec.depths[1]))))
                except ValueError as e:  # a sample that cannot fit its lengths: the user's setting, one line
                    raise DataConfigError(str(e), key=f"data.synthetic[{k}]") from None
            return parts

        self.train_dataset = MixtureDataset([train_text, *synthetic_parts(scale_train, 0)])
        # interleaved: validation cut short by limit_val_batches still sees every part of the mixture
        self.val_dataset = (MixtureDataset([val_text, *synthetic_parts(scale_val, 1)], interleave=True)
                            if with_val else None)
        if self.test_fraction > 0:
            scale_test = (len(test_text) / self.text_share if self.text_share > 0
                          else max(1.0, self.test_fraction * self.synthetic_samples))
            self.test_dataset = MixtureDataset([test_text, *synthetic_parts(scale_test, 2)], interleave=True)

    def _tasks(self) -> list[Any]:
        """The mixture's tasks, by name (SyntheticTaskDataset looks them up; checked here for a clear error)."""
        if not self.synthetic:
            return []
        try:
            from memsparse.eval.tasks import get_task
        except ImportError as e:
            raise ImportError(f"the synthetic mixture needs the task registry memsparse.eval.tasks: {e}") from e
        for s in self.synthetic:
            get_task(s.task)
        return [s.task for s in self.synthetic]

    # ---- loaders

    def train_dataloader(self) -> ResumableDataLoader:
        return self.build_train_loader()

    def build_train_loader(self, rank: int | None = None, world_size: int | None = None) -> ResumableDataLoader:
        """The resumable train loader for `rank` of `world_size` (default: the trainer's, else 0 of 1)."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        rank = rank if rank is not None else (trainer.global_rank if trainer is not None else 0)
        world_size = world_size if world_size is not None else (trainer.world_size if trainer is not None else 1)
        n = len(self.train_dataset)
        if n // world_size < self.batch_size:
            what = "data.files" if self.files else f"the stdlib corpus (data.stdlib_limit={self.stdlib_limit})"
            raise DataConfigError(
                f"too little training data: {what} gives {n} training sequence(s) of data.seq_len={self.seq_len} "
                f"tokens, fewer than data.batch_size={self.batch_size} x {world_size} process(es): add data, or "
                "lower data.batch_size or data.seq_len")
        sampler = ResumableDistributedSampler(self.train_dataset, self.batch_size, num_replicas=world_size,
                                              rank=rank, shuffle=True, seed=self.seed, epoch_indices=True)
        loader = ResumableDataLoader(
            self.train_dataset, sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0)
        if trainer is not None:
            loader.consumed_fn = self._consumed_batches
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers and self.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        if len(self.test_dataset) == 0:
            raise DataConfigError(f"the test split (test_fraction={self.test_fraction}) is empty: raise "
                                  "data.test_fraction or give more data")
        return DataLoader(self.test_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory)

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch (prompts differ in length): {"index", "prompt", "input_ids" (L,)}."""
        if self.predict_dataset is None:
            self.setup("predict")
        return DataLoader(self.predict_dataset, batch_size=None, shuffle=False)

    def _consumed_batches(self) -> int | None:
        """Batches of the current epoch the fit loop has consumed (the fetcher's prefetch excluded)."""
        trainer = self.trainer
        if trainer is None or self._train_loader is None or trainer.state.fn != "fit":
            return None
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        n = trainer.num_training_batches
        if not math.isinf(n) and ready >= n:  # epoch done (also when limit_train_batches cut it short)
            return self._train_loader.sampler.batches_per_epoch  # type: ignore[attr-defined]
        return int(ready)

    # ---- checkpointed state (beside Lightning's own loader state; see `state_dict`)

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position, and the tokenizer used.

        Lightning checkpoints and restores the loader itself (it is `_Stateful`); this copy is applied when
        the loader is built, which covers a loader built before Lightning restores its state (Lightning
        issue 20550, e.g. `trainer.estimated_stepping_batches` in `configure_optimizers` on some versions).
        """
        state: dict[str, Any] = {"tokenizer_path": self.tokenizer_path, "vocab_size": self.vocab_size}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loader_state = state_dict.get("train_loader")
        if loader_state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(loader_state)
        else:
            self._pending_loader_state = dict(loader_state)
