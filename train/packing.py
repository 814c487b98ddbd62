"""Packing documents into fixed-length training sequences, and the synthetic task samples beside them.

Every item is a dict of equal-shape tensors, so the default collate stacks them into a batch:

- `input_ids` (seq_len,) int64: tokens fed to the model;
- `labels` (seq_len,) int64: the next token at each position, `IGNORE_INDEX` (-100) where no loss is taken
  (padding, and the prompt of a synthetic sample when only its answer is trained);
- `doc_ids` (seq_len,) int64: the document each input position belongs to inside the sequence (0, 1, ...;
  an `eos` closes its document, so the next position starts a new one), -1 on padding;
- `source` () int64: 0 for packed text, 1 + k for the k-th synthetic task of the mixture.

Items are addressed by an integer `index`; datasets that vary per epoch (the synthetic samples) read the
epoch from `index // len(dataset)` (see `ResumableDistributedSampler(epoch_indices=True)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
TEXT_SOURCE = 0


def encode_documents(tokenizer: Any, docs: Iterable[str]) -> list[np.ndarray]:
    """Tokenize each document on its own: a list of int32 arrays (no specials added)."""
    out: list[np.ndarray] = []
    byte_level = getattr(tokenizer, "kind", None) == "byte"
    for text in docs:
        if byte_level:  # same ids as ByteTokenizer.encode, without a Python list per byte
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        out.append(ids)
    return out


def pack_stream(docs_ids: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """Concatenate tokenized documents, each followed by `eos_id`: one int32 stream (N,)."""
    if not docs_ids:
        return np.zeros(0, dtype=np.int32)
    eos = np.array([eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for ids in docs_ids:
        parts.append(ids.astype(np.int32, copy=False))
        parts.append(eos)
    return np.concatenate(parts)


def _item(tokens: np.ndarray, seq_len: int, pad_id: int, eos_id: int, source: int) -> dict[str, torch.Tensor]:
    """`tokens` (<= seq_len + 1,) -> the item dict; padded with `pad_id` (labels ignored there)."""
    n = len(tokens)
    full = np.full(seq_len + 1, pad_id, dtype=np.int64)
    full[:n] = tokens
    inputs, labels = full[:-1].copy(), full[1:].copy()
    labels[max(n - 1, 0) :] = IGNORE_INDEX  # targets beyond the real tokens
    ends = inputs == eos_id
    doc_ids = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    doc_ids[n:] = -1
    return {
        "input_ids": torch.from_numpy(inputs),
        "labels": torch.from_numpy(labels),
        "doc_ids": torch.from_numpy(doc_ids),
        "source": torch.tensor(source, dtype=torch.int64),
    }


class PackedTextDataset(Dataset):
    """Fixed-length windows over one token stream (N,): item i covers stream[i*seq_len : i*seq_len+seq_len+1].

    Consecutive windows overlap by one token, so every stream token after the first is a label exactly
    once; the last window is padded (labels -100 there). Length: ceil((N - 1) / seq_len).
    """

    def __init__(self, stream: np.ndarray, seq_len: int, pad_id: int, eos_id: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = np.ascontiguousarray(stream, dtype=np.int32)
        self.seq_len, self.pad_id, self.eos_id = seq_len, pad_id, eos_id
        n = len(self.stream)
        self._len = 0 if n < 2 else -(-(n - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index) % self._len if self._len else 0
        start = i * self.seq_len
        return _item(self.stream[start : start + self.seq_len + 1], self.seq_len, self.pad_id, self.eos_id,
                     TEXT_SOURCE)


class SyntheticTaskDataset(Dataset):
    """`num_samples` samples of one long-context task, generated lazily and deterministically per index.

    Sample (index, epoch) draws its length from `lengths`, its depth in `depths` ([0, 1]) and its task seed from
    `np.random.default_rng([seed, stream, source, index, epoch])`; the tokens are prompt + answer + eos,
    exactly `length + 1` of them, i.e. `length` labelled positions (length == seq_len fills the sequence;
    shorter samples are padded).
    `loss="answer"` keeps labels only on the answer tokens and the eos after them; `"all"` on every token.
    `asks` > 1 (needle tasks only, training): the question and its answer are also inserted `asks - 1` times into
    the haystack between the last needle and the final question, evenly spaced, and every answer is labelled; the
    row is still exactly `length + 1` tokens (the haystack is shortened to make room).
    """

    def __init__(
        self,
        task: Any,
        num_samples: int,
        lengths: Sequence[int],
        seq_len: int,
        tokenizer: Any,
        seed: int,
        source: int,
        stream: int = 0,
        loss: str = "answer",
        vary_by_epoch: bool = True,
        asks: int = 1,
        depths: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if loss not in ("answer", "all"):
            raise ValueError(f"synthetic_loss must be 'answer' or 'all', got {loss!r}")
        if isinstance(asks, bool) or not isinstance(asks, int) or asks < 1:
            raise ValueError(f"asks must be an integer >= 1, got {asks!r}")
        if not 0.0 <= depths[0] <= depths[1] <= 1.0:
            raise ValueError(f"depths must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(depths)}")
        bad = [n for n in lengths if not 2 <= n <= seq_len]
        if not lengths or bad:
            raise ValueError(f"synthetic lengths must be in [2, seq_len={seq_len}], got {list(lengths)}")
        # A task given by name is looked up in the registry (again in each worker: tasks hold weakrefs).
        self.task_name: str | None = task if isinstance(task, str) else None
        self._task = _get_task(task) if isinstance(task, str) else task
        self.name = self.task_name or getattr(task, "name", type(task).__name__)
        self.num_samples, self.lengths = int(num_samples), [int(n) for n in lengths]
        self.seq_len, self.tokenizer, self.seed, self.source, self.stream = seq_len, tokenizer, seed, source, stream
        self.loss, self.vary_by_epoch, self.asks = loss, vary_by_epoch, asks
        self.depth_lo, self.depth_span = float(depths[0]), float(depths[1]) - float(depths[0])
        # The prompt must leave room for the answer: check the task's bounds once, up front.
        min_len = getattr(self._task, "min_length", lambda tok: 1)(tokenizer)
        max_ans = getattr(self._task, "max_answer_tokens", lambda tok: 0)(tokenizer)
        too_short = [n for n in self.lengths if n - max_ans < min_len]
        if too_short:
            raise ValueError(
                f"synthetic task {self.name!r}: lengths {too_short} are too short; it needs at least "
                f"{min_len + max_ans} tokens (a prompt of >= {min_len} and an answer of up to {max_ans})")
        # Deterministic first guess of the answer length per sequence length (one probe generation each):
        # the prompt is then sized so that prompt + answer + eos fills the sequence exactly.
        self._answer_guess = {
            n: len(self.task.generate(n - max_ans, 0.5, 0, tokenizer).answer_ids) for n in sorted(set(self.lengths))
        }
        self._asks_guess: dict[int, int] = {}  # per length: tokens the extra questions and answers take
        if asks > 1:
            probe = self.task.generate(max(self.lengths) - max_ans, 0.5, 0, tokenizer)
            if not {"haystack_end", "needle_positions", "needle_lengths"} <= set(getattr(probe, "meta", {}) or {}):
                raise ValueError(f"synthetic task {self.name!r}: asks > 1 needs a needle task (a haystack and "
                                 "a question to repeat)")
            need = (asks - 1) * (len(probe.prompt_ids) - probe.meta["haystack_end"] + max_ans)
            short = [n for n in self.lengths if n - need - max_ans < min_len]
            if short:
                raise ValueError(
                    f"synthetic task {self.name!r}: lengths {short} are too short for asks={asks}; it needs at "
                    f"least {min_len + max_ans + need} tokens ({asks - 1} more questions and answers of up to "
                    f"{need // (asks - 1)} tokens each)")

    @property
    def task(self) -> Any:
        if self._task is None:
            self._task = _get_task(self.task_name)
        return self._task

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.task_name is not None:
            state["_task"] = None
        return state

    def __len__(self) -> int:
        return self.num_samples

    def params(self, index: int) -> tuple[int, float, int]:
        """(length, depth, task seed) of sample `index` (epoch = index // len)."""
        epoch, i = divmod(int(index), self.num_samples)
        rng = np.random.default_rng([self.seed, self.stream, self.source, i, epoch if self.vary_by_epoch else 0])
        length = self.lengths[int(rng.integers(len(self.lengths)))]
        depth = self.depth_lo + self.depth_span * float(rng.random())  # (0, 1): rng.random() as drawn
        task_seed = int(rng.integers(2**31 - 1))
        return length, depth, task_seed

    def generate(self, length: int, depth: float, seed: int) -> tuple[list[int], list[int]]:
        """(prompt_ids, answer_ids) with len(prompt) + len(answer) == length."""
        return self._generate(length, depth, seed)[:2]

    def generate_asked(self, length: int, depth: float, seed: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt_ids, answer_ids, starts) with the question and answer also inserted `asks - 1` times after the
        last needle; `starts`: the prompt index of each inserted answer's first token; len(prompt) + len(answer)
        == length. The content (needles, question, answer) does not depend on the length, so the room the inserts
        take is known after one generation (the loop only guards against a task where it does)."""
        extra = self._asks_guess.get(length, 0)
        for _ in range(4):
            prompt, answer, meta = self._generate(length - extra, depth, seed)
            hend = meta["haystack_end"]
            question = prompt[hend:]
            need = (self.asks - 1) * (len(question) + len(answer))
            if need == extra:
                after = max(p + n for p, n in zip(meta["needle_positions"], meta["needle_lengths"]))
                cuts = [after + round(j * (hend - after) / self.asks) for j in range(1, self.asks)]
                out, starts, last = [], [], 0
                for c in cuts:
                    out += prompt[last:c] + question
                    starts.append(len(out))
                    out += answer
                    last = c
                out += prompt[last:]
                self._asks_guess[length] = extra
                return out, answer, starts
            extra = need
            if length - extra < 2:
                break
        raise ValueError(f"synthetic task {self.name!r}: {self.asks} questions and answers do not fit a sample "
                         f"of {length} tokens")

    def _generate(self, length: int, depth: float, seed: int) -> tuple[list[int], list[int], dict]:
        answer_len = self._answer_guess.get(length) or self._answer_guess[max(self.lengths)]
        for _ in range(4):
            prompt_len = length - answer_len
            if prompt_len < 1:
                raise ValueError(
                    f"synthetic task {self.name!r}: answer of {answer_len} tokens "
                    f"does not fit a sequence of {length}")
            s = self.task.generate(prompt_len, depth, seed, self.tokenizer)
            prompt, answer = list(s.prompt_ids), list(s.answer_ids)
            if len(prompt) != prompt_len:
                raise ValueError(
                    f"task {self.name!r} returned a prompt of {len(prompt)} tokens "
                    f"for length={prompt_len}")
            if len(answer) == answer_len:
                return prompt, answer, getattr(s, "meta", {})
            answer_len = len(answer)
        raise RuntimeError(
            f"task {self.name!r}: answer length does not settle for length={length}")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        length, depth, task_seed = self.params(index)
        if self.asks > 1:
            prompt, answer, starts = self.generate_asked(length, depth, task_seed)
        else:
            (prompt, answer), starts = self.generate(length, depth, task_seed), []
        eos = self.tokenizer.eos_id
        tokens = np.asarray(prompt + answer + [eos], dtype=np.int64)  # length + 1 tokens
        item = _item(tokens, self.seq_len, self.tokenizer.pad_id, eos, self.source)
        if self.loss == "answer":
            keep = np.zeros(self.seq_len, dtype=bool)
            for a in starts:  # positions whose target is a token of an inserted answer
                keep[a - 1 : a - 1 + len(answer)] = True
            keep[len(prompt) - 1 : length] = True  # positions whose target is an answer token or the eos
            item["labels"][~torch.from_numpy(keep)] = IGNORE_INDEX
        return item


def _get_task(name: str) -> Any:
    from memsparse.eval.tasks import get_task

    return get_task(name)


class MixtureDataset(Dataset):
    """Concatenation of datasets addressed by one index; `index // len(self)` is passed on as the epoch.

    interleave=True: the parts' items are dealt in proportion to the parts' sizes (each item at its fractional
    position within its part), so every prefix holds the mixture; an unshuffled loader cut short (validation with
    `limit_val_batches`) then sees every part, not the first part's items only.
    """

    def __init__(self, parts: Sequence[Dataset], interleave: bool = False) -> None:
        self.parts = [p for p in parts if len(p) > 0]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self._len = int(self.offsets[-1])
        self._order: np.ndarray | None = None
        if interleave and len(self.parts) > 1:
            # item r of part k sorts at (r + 0.5) / len(part k); a stable sort keeps ties in part order
            pos = np.concatenate([(np.arange(len(p)) + 0.5) / len(p) for p in self.parts])
            self._order = np.argsort(pos, kind="stable")

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[Dataset, int]:
        """(the part, its own index with the epoch carried on) that item `index` comes from, without generating it."""
        if self._len == 0:
            raise IndexError("empty dataset")
        epoch, i = divmod(int(index), self._len)
        if self._order is not None:
            i = int(self._order[i])
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        part = self.parts[k]
        return part, epoch * len(part) + i - int(self.offsets[k])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        part, i = self.locate(index)
        return part[i]

    def sources(self) -> np.ndarray:
        """(len,) the `source` of every item in index order, without generating any."""
        out = np.empty(self._len, dtype=np.int64)
        for k, part in enumerate(self.parts):
            out[self.offsets[k] : self.offsets[k + 1]] = getattr(part, "source", TEXT_SOURCE)
        return out if self._order is None else out[self._order]
