"""Kinds of keys and values hidden in the haystack: numbers, words, word pairs, UUID-like strings, codes."""

from __future__ import annotations

import functools
from collections.abc import Collection

import numpy as np

from ._words import ADJECTIVES, NOUNS
from .base import TokenizerCached, Val

_POOL_SEED = 20240601


class Kind:
    """Draws distinct values; `pool` is a fixed distractor set that `draw` can exclude."""

    noun = "values"  # plural, used in templates ("special magic numbers")
    max_bytes = 0
    capacity = float("inf")  # how many distinct values exist

    def one(self, rng: np.random.Generator) -> str:
        raise NotImplementedError(type(self).__name__)

    def draw(self, rng: np.random.Generator, k: int, exclude: Collection[str] = ()) -> list[Val]:
        if k > self.capacity - len(exclude):
            raise ValueError(f"{self!r}: cannot draw {k} distinct values (only {self.capacity} exist)")
        out: list[Val] = []
        seen = set()
        for _ in range(1000 * k + 1000):
            if len(out) == k:
                return out
            v = self.one(rng)
            if v not in seen and v not in exclude:
                seen.add(v)
                out.append(Val(v, self.max_bytes))
        raise ValueError(f"{type(self).__name__}: cannot draw {k} distinct values")

    @functools.lru_cache(maxsize=4)  # noqa: B019 - kinds are few and long-lived
    def pool(self, k: int) -> tuple[str, ...]:
        """A fixed set of up to `k` distinct values (distractors), capped at half the capacity."""
        return tuple(self.draw(np.random.default_rng(_POOL_SEED), int(min(k, self.capacity // 2))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Numbers(Kind):
    """Decimal numbers with a fixed number of digits."""

    noun = "numbers"

    def __init__(self, digits: int = 7) -> None:
        self.digits = digits
        self.max_bytes = digits
        self.capacity = 9 * 10 ** (digits - 1)

    def one(self, rng):
        return str(int(rng.integers(10 ** (self.digits - 1), 10**self.digits)))

    def __repr__(self) -> str:
        return f"Numbers({self.digits})"


class TokenBalancedNumbers(Numbers, TokenizerCached):
    """Numbers whose draw, given a tokenizer, gives rarely tokenized keys as many answers as common ones.

    Under a merged-digit BPE most keys are 2-4 common tokens, but a few are a token that no other key contains
    (a 16K stdlib BPE: 4 of the 90,000 five-digit keys), and a model trained on uniform keys never learns to
    output it. `draw_for` draws, with probability `balance`, a key with weight 1 / (the number of keys that
    contain the key's rarest token), so every rarest-token class comes up about equally often; otherwise
    uniformly. `draw` (no tokenizer) is uniform, as `Numbers`.
    """

    max_keys = 10**6  # the weights are one table over all keys

    def __init__(self, digits: int = 5, balance: float = 0.5) -> None:
        super().__init__(digits)
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"TokenBalancedNumbers: balance must be in [0, 1], got {balance}")
        if self.capacity > self.max_keys:
            raise ValueError(
                f"TokenBalancedNumbers: at most {self.max_keys} keys; {digits} digits give {self.capacity}")
        self.balance = balance
        TokenizerCached.__init__(self)

    def probabilities(self, tokenizer) -> np.ndarray:
        """(capacity,) float64: the draw's probability of each key, smallest number first (cached per tokenizer)."""
        if tokenizer not in self._cache:
            lo = 10 ** (self.digits - 1)
            ids = [tokenizer.encode(f" {lo + i}") for i in range(int(self.capacity))]  # as a template slot encodes it
            counts: dict[int, int] = {}
            for key in ids:
                for t in set(key):
                    counts[t] = counts.get(t, 0) + 1
            w = 1.0 / np.array([min(counts[t] for t in key) for key in ids], dtype=np.float64)
            p = self.balance * w / w.sum() + (1.0 - self.balance) / len(w)
            self._cache[tokenizer] = p / p.sum()
        return self._cache[tokenizer]

    def draw_for(self, rng: np.random.Generator, tokenizer, k: int = 1) -> list[Val]:
        """`k` distinct keys drawn with `probabilities(tokenizer)`."""
        p = self.probabilities(tokenizer)
        idx = rng.choice(len(p), size=k, replace=False, p=p)
        lo = 10 ** (self.digits - 1)
        return [Val(str(lo + int(i)), self.max_bytes) for i in idx]

    def __repr__(self) -> str:
        return f"TokenBalancedNumbers({self.digits}, balance={self.balance})"


class Words(Kind):
    """Single lowercase words."""

    noun = "words"

    def __init__(self, words: tuple[str, ...] = ADJECTIVES + NOUNS) -> None:
        self.words = tuple(dict.fromkeys(words))
        self.capacity = len(self.words)
        self.max_bytes = max(len(w.encode()) for w in words)

    def one(self, rng):
        return self.words[int(rng.integers(len(self.words)))]


class WordPairs(Kind):
    """adjective-noun keys such as "hungry-tiger" (about 15K of them)."""

    noun = "keys"
    max_bytes = max(len(a) for a in ADJECTIVES) + 1 + max(len(n) for n in NOUNS)
    capacity = len(ADJECTIVES) * len(NOUNS)

    def one(self, rng):
        return f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]}-{NOUNS[int(rng.integers(len(NOUNS)))]}"


class Uuids(Kind):
    """UUID-like strings: 32 random hex digits in 8-4-4-4-12 groups."""

    noun = "uuids"
    max_bytes = 36

    def one(self, rng):
        h = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, size=32))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Codes(Kind):
    """Upper-case letter codes such as "QXBTA" (variable and node names)."""

    noun = "codes"

    def __init__(self, letters: int = 5) -> None:
        self.letters = letters
        self.max_bytes = letters
        self.capacity = 26**letters

    def one(self, rng):
        return "".join(chr(65 + int(i)) for i in rng.integers(0, 26, size=self.letters))

    def __repr__(self) -> str:
        return f"Codes({self.letters})"


VALUE_KINDS = {"numbers": Numbers, "words": Words, "uuids": Uuids}
KEY_KINDS = {"words": WordPairs, "uuids": Uuids, "numbers": Numbers}


def value_kind(name: str | Kind) -> Kind:
    """A value kind by name: numbers, words or uuids."""
    return _kind(name, VALUE_KINDS, "value")


def key_kind(name: str | Kind) -> Kind:
    """A key kind by name: words (adjective-noun), uuids or numbers."""
    return _kind(name, KEY_KINDS, "key")


def _kind(name, table, what) -> Kind:
    if isinstance(name, Kind):
        return name
    if name not in table:
        raise ValueError(f"unknown {what} kind {name!r}; known: {sorted(table)}")
    return table[name]()
