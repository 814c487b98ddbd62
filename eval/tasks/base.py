"""Core of the synthetic long-context tasks: `Sample`, `Task`, scoring and the id-level prompt builder.

Prompts are built at the token-id level from separately encoded pieces (instruction, haystack
units, needles, question), so their length is exact for any tokenizer: BPE merges never cross a
piece boundary. Slot values (keys, numbers, ...) are their own pieces, with the space before them,
which is also where a byte-level pre-tokenizer splits, so the ids stay close to natural ones.
Length bounds assume every token covers at least one byte (true of the byte and byte-level BPE
tokenizers).
"""

from __future__ import annotations

import abc
import re
import string
import weakref
import zlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One generated prompt with its expected answer."""

    prompt_ids: list[int]
    answer: str | list[str]
    answer_ids: list[int]
    task: str
    length: int
    depth: float
    seed: int
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """Strip, casefold and collapse whitespace."""
    return " ".join(text.strip().casefold().split())


_BOUNDARY = re.compile(r"[\s.,;:!?)\]}\"'`]")


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction is the answer, or begins with it followed by a word boundary.

    Generation runs for a fixed budget, so text after the answer is ignored; "71432." matches
    "71432" while "714321" and "ab-cd-ef" (for "ab-cd") do not.
    """
    pred, ans = normalize_answer(prediction), normalize_answer(answer)
    if not ans:
        return float(not pred)
    if pred == ans:
        return 1.0
    return float(pred.startswith(ans) and _BOUNDARY.match(pred, len(ans)) is not None)


def contains_fraction(prediction: str, answers: list[str]) -> float:
    """Fraction of the expected values found as whole tokens in the prediction (RULER's partial credit)."""
    if not answers:
        return 1.0
    pred = normalize_answer(prediction)
    found = sum(
        re.search(r"(?<![\w-])" + re.escape(normalize_answer(a)) + r"(?![\w-])", pred) is not None for a in answers
    )
    return found / len(answers)


class Task(abc.ABC):
    """A synthetic long-context task: generates exact-length prompts and scores predictions."""

    name: str = ""

    @abc.abstractmethod
    def generate(self, length: int, depth: float, seed: int, tokenizer) -> Sample:
        """A prompt of exactly `length` tokens with the needle at `depth` (0 = haystack start, 1 = end)."""

    def score(self, prediction: str, sample: Sample) -> float:
        """Exact match for a single answer, fraction recovered for a list answer; in [0, 1]."""
        if isinstance(sample.answer, list):
            return contains_fraction(prediction, sample.answer)
        return exact_match(prediction, sample.answer)

    @abc.abstractmethod
    def min_length(self, tokenizer) -> int:
        """The smallest prompt length `generate` accepts (the prompt overhead, worst case)."""

    @abc.abstractmethod
    def max_answer_tokens(self, tokenizer) -> int:
        """An upper bound on len(answer_ids): the harness's decoding budget."""

    def __repr__(self) -> str:
        cfg = {k: v for k, v in vars(self).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"


# ----------------------------------------------------------------------------- id-level pieces


class Val(str):
    """A slot value that knows the longest value (in UTF-8 bytes) its kind can produce."""

    bound: int

    def __new__(cls, text: str, bound: int | None = None) -> Val:
        obj = super().__new__(cls, text)
        obj.bound = len(text.encode("utf-8")) if bound is None else bound
        return obj


_LITERALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TokenizerCached:
    """A per-tokenizer cache `self._cache` (weak keys, so a dropped tokenizer frees its entry) that pickling
    leaves out and unpickling rebuilds (DataLoader workers)."""

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = weakref.WeakKeyDictionary()


def encode_literal(tokenizer, text: str) -> np.ndarray:
    """Encode a fixed text piece once per tokenizer (cached)."""
    cache = _LITERALS.setdefault(tokenizer, {})
    ids = cache.get(text)
    if ids is None:
        ids = cache[text] = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return ids


def encode_value(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


class Template:
    """A format string whose literal parts and `{slot}`s are encoded as separate pieces.

    A space right before a slot moves into the slot's piece (" 71432"), where a byte-level
    pre-tokenizer would split anyway.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.parts: list[tuple[str, bool]] = []  # (literal text, False) or (slot name, has leading space)
        for lit, name, _, _ in string.Formatter().parse(fmt):
            lead = name is not None and lit.endswith(" ")
            if lead:
                lit = lit[:-1]
            if lit:
                self.parts.append((lit, False))
            if name is not None:
                if not name:
                    raise ValueError(f"template slots must be named: {fmt!r}")
                self.parts.append((name, True) if lead else ("\0" + name, True))
        self.slots = [p[0].lstrip("\0") for p in self.parts if p[1]]

    def _slot(self, part: str, values: dict[str, str]) -> str:
        return values[part.lstrip("\0")] if part.startswith("\0") else " " + values[part]

    def text(self, **values: str) -> str:
        return "".join(self._slot(p, values) if is_slot else p for p, is_slot in self.parts)

    def ids(self, tokenizer, **values: str) -> np.ndarray:
        pieces = [
            encode_value(tokenizer, self._slot(p, values)) if is_slot else encode_literal(tokenizer, p)
            for p, is_slot in self.parts
        ]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def bound(self, tokenizer, **values: str) -> int:
        """Most tokens this template can take with values of the same kinds (>= 1 byte per token)."""
        n = 0
        for p, is_slot in self.parts:
            if not is_slot:
                n += len(encode_literal(tokenizer, p))
                continue
            v = values[p.lstrip("\0")]
            lead = 0 if p.startswith("\0") else 1
            n += lead + v.bound if isinstance(v, Val) else len(encode_literal(tokenizer, self._slot(p, values)))
        return n


@dataclass
class Piece:
    """A template with its slot values."""

    template: Template
    values: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.template.text(**self.values)

    def ids(self, tokenizer) -> np.ndarray:
        return self.template.ids(tokenizer, **self.values)

    def bound(self, tokenizer) -> int:
        return self.template.bound(tokenizer, **self.values)


@dataclass
class Needle(Piece):
    """A piece hidden in the haystack: at the requested depth if `anchor`, else at a random unit boundary.

    Unanchored needles sharing a `group` keep their index order and follow the group's anchor.
    """

    anchor: bool = False
    group: str | None = None


@dataclass
class Layout:
    """What a task builds from its content rng; the base class turns it into ids."""

    prefix: Piece
    needles: list[Needle]
    suffix: Piece
    answer: str | list[str]
    meta: dict = field(default_factory=dict)
    # if set, the list answer is reordered by the prompt position of these needles (one per value)
    answer_needles: list[int] | None = None


def answer_text(answer: str | list[str]) -> str:
    """The continuation the model should produce (list answers comma-separated)."""
    return " " + (", ".join(answer) if isinstance(answer, list) else answer)


def _plain(obj):
    """Meta as plain JSON types (no `Val`, tuples or numpy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    return obj.item() if isinstance(obj, np.generic) else obj


def _rng(seed: int, stream: int, name: str = "") -> np.random.Generator:
    """Stream 0 draws the content (same needles at every length), stream 1 the layout."""
    return np.random.default_rng([int(seed) % 2**63, stream, zlib.crc32(name.encode())])


class NeedleTask(Task):
    """A task built as prefix + haystack with needles + question; subclasses implement `build`."""

    haystack = None  # a `Haystack` from .haystacks

    @abc.abstractmethod
    def build(self, rng: np.random.Generator) -> Layout:
        """Draw the content (keys, values, needles, question) from `rng`; its shape must not depend on it."""

    def build_for(self, rng: np.random.Generator, tokenizer) -> Layout:
        """`build` for one tokenizer: tasks whose content depends on the tokenization override this."""
        return self.build(rng)

    def _bounds(self, tokenizer) -> tuple[int, int]:
        cache = self.__dict__.setdefault("_bound_cache", weakref.WeakKeyDictionary())
        if tokenizer not in cache:
            lay = self.build(_rng(0, 0))
            overhead = lay.prefix.bound(tokenizer) + lay.suffix.bound(tokenizer)
            overhead += sum(n.bound(tokenizer) for n in lay.needles)
            vals = lay.answer if isinstance(lay.answer, list) else [lay.answer]
            ans = sum(v.bound if isinstance(v, Val) else len(v.encode()) for v in vals) + 2 * len(vals) + 1
            cache[tokenizer] = (overhead, ans)
        return cache[tokenizer]

    def __getstate__(self):  # picklable (DataLoader workers): caches are rebuilt
        return {k: v for k, v in self.__dict__.items() if k != "_bound_cache"}

    def min_length(self, tokenizer) -> int:
        return self._bounds(tokenizer)[0]

    def max_answer_tokens(self, tokenizer) -> int:
        return self._bounds(tokenizer)[1]

    def generate(self, length: int, depth: float, seed: int, tokenizer) -> Sample:
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"{self.name}: depth must be in [0, 1], got {depth}")
        need = self.min_length(tokenizer)
        if int(length) != length or length < need:
            raise ValueError(
                f"{self.name}: length {length} is below min_length {need} for this tokenizer "
                "(instruction + needles + question overhead)"
            )
        length = int(length)
        lay = self.build_for(_rng(seed, 0, self.name), tokenizer)
        pre, suf = lay.prefix.ids(tokenizer), lay.suffix.ids(tokenizer)
        nids = [n.ids(tokenizer) for n in lay.needles]
        n_filler = length - len(pre) - len(suf) - sum(len(x) for x in nids)
        if n_filler < 0:  # cannot happen when the bounds hold; kept as a clear guard
            raise ValueError(f"{self.name}: length {length} too short for this sample's overhead")
        rng = _rng(seed, 1, self.name)
        filler, bounds = self.haystack.fill(tokenizer, n_filler, rng)
        fpos = self._place(lay.needles, bounds, n_filler, float(depth), rng)

        order = sorted(range(len(nids)), key=lambda i: (fpos[i], i))
        chunks, prompt_pos, last, offset = [pre], [0] * len(nids), 0, len(pre)
        for i in order:
            chunks.append(filler[last : fpos[i]])
            offset += fpos[i] - last
            prompt_pos[i], last = offset, fpos[i]
            chunks.append(nids[i])
            offset += len(nids[i])
        chunks += [filler[last:], suf]
        ids = np.concatenate(chunks)
        assert len(ids) == length, (len(ids), length)

        answer = lay.answer
        if lay.answer_needles is not None and isinstance(answer, list):
            answer = [a for _, a in sorted(zip((prompt_pos[i] for i in lay.answer_needles), answer))]
        answer = [str(a) for a in answer] if isinstance(answer, list) else str(answer)
        meta = {
            "needle_positions": prompt_pos,
            "needle_lengths": [len(x) for x in nids],
            "needle_texts": [n.text for n in lay.needles],
            "haystack": self.haystack.kind,
            "haystack_start": len(pre),
            "haystack_end": length - len(suf),
            "filler_tokens": n_filler,
            "max_gap": int(np.diff(bounds).max()) if len(bounds) > 1 else 0,
            "question": lay.suffix.text,
            **_plain(lay.meta),
        }
        return Sample(
            prompt_ids=ids.tolist(),
            answer=answer,
            answer_ids=tokenizer.encode(answer_text(answer)),
            task=self.name,
            length=length,
            depth=float(depth),
            seed=int(seed),
            meta=meta,
        )

    @staticmethod
    def _place(needles: list[Needle], bounds: np.ndarray, n: int, depth: float, rng) -> list[int]:
        """Filler offsets (unit boundaries) for each needle: anchors at depth, the rest at random."""
        pos: list[int | None] = [None] * len(needles)
        target = depth * n
        k = int(np.searchsorted(bounds, target))
        if k >= len(bounds) or (k > 0 and target - bounds[k - 1] <= bounds[k] - target):
            k -= 1
        for i, nd in enumerate(needles):
            if nd.anchor:
                pos[i] = int(bounds[k])
        groups: dict[str | None, list[int]] = {}
        for i, nd in enumerate(needles):
            if pos[i] is None:
                groups.setdefault(nd.group, []).append(i)
        for g, idx in groups.items():
            lo = 0
            if g is not None:
                anchors = [pos[i] for i, nd in enumerate(needles) if nd.group == g and pos[i] is not None]
                lo = max(anchors, default=0)
            start = int(np.searchsorted(bounds, lo))
            picks = bounds[rng.integers(start, len(bounds), size=len(idx))]
            if g is not None:
                picks = np.sort(picks)
            for i, p in zip(idx, picks):
                pos[i] = int(p)
        return pos  # type: ignore[return-value]
