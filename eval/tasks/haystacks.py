"""Haystacks: filler of an exact token count plus the unit boundaries where needles may go.

Units are encoded once per tokenizer and tiled or sampled at the id level, so a 1M-token
haystack costs a few numpy operations.
"""

from __future__ import annotations

import abc
import re

import numpy as np

from .base import Template, TokenizerCached, encode_literal, encode_value
from .kinds import Kind

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


class Haystack(TokenizerCached, abc.ABC):
    """Fills `n` tokens; returns (ids, sorted unit boundaries including 0 and n)."""

    kind = ""

    @abc.abstractmethod
    def fill(self, tokenizer, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` filler ids and the unit boundaries (insertion points)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"


class TiledHaystack(Haystack):
    """A fixed sequence of text units, tiled to length; `random_start` rotates it per sample."""

    random_start = False

    @abc.abstractmethod
    def units(self) -> list[str]:
        """The unit texts, in order."""

    def _encoded(self, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        if tokenizer not in self._cache:
            pieces = [encode_literal(tokenizer, u) if len(u) < 64 else encode_value(tokenizer, u) for u in self.units()]
            lens = np.array([len(p) for p in pieces], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            keep = lens > 0
            self._cache[tokenizer] = (np.concatenate(pieces), starts[keep])
        return self._cache[tokenizer]

    def fill(self, tokenizer, n, rng):
        ids, starts = self._encoded(tokenizer)
        period = len(ids)
        if self.random_start:
            s = int(starts[rng.integers(len(starts))])
            ids = np.concatenate([ids[s:], ids[:s]])
            starts = np.sort((starts - s) % period)
        reps = n // period + 1
        out = np.tile(ids, reps)[:n]
        b = (np.arange(reps, dtype=np.int64)[:, None] * period + starts[None, :]).ravel()
        return out, np.append(b[b < n], n)


class NoiseHaystack(TiledHaystack):
    """The repeated noise sentences of the passkey test and RULER ("The grass is green. ...")."""

    kind = "noise"

    def units(self):
        return [" " + s for s in NOISE_SENTENCES]


class EssayHaystack(TiledHaystack):
    """English prose sentences from the standard library's docstrings (`memsparse.corpus`)."""

    kind = "essay"
    random_start = True

    def __init__(self, max_paragraphs: int | None = None) -> None:
        super().__init__()
        self.max_paragraphs = max_paragraphs

    def units(self):
        from memsparse.corpus import prose_paragraphs

        out = []
        for par in prose_paragraphs(self.max_paragraphs):
            for j, sent in enumerate(re.split(r"(?<=[.!?])\s+(?=[A-Z])", par)):
                out.append(("\n" if j == 0 else " ") + sent)
        return out


class KVHaystack(Haystack):
    """Distractor key-value units (`template` with {key} and {value}) from fixed pools of keys and values.

    Each sample maps every pool key to one random pool value, so a key repeats only with its own
    value. Needle keys must come from outside `reserved_keys`.
    """

    kind = "kv"

    def __init__(self, template: str | Template, keys: Kind, values: Kind, pool: int = 4096) -> None:
        super().__init__()
        self.template = template if isinstance(template, Template) else Template(template)
        if sorted(self.template.slots) != ["key", "value"]:
            raise ValueError(f"KVHaystack template needs exactly one {{key}} and one {{value}}: {template!r}")
        self.keys, self.values, self.pool = keys, values, pool

    @property
    def reserved_keys(self) -> frozenset[str]:
        return frozenset(self.keys.pool(self.pool))

    def _encoded(self, tokenizer):
        if tokenizer not in self._cache:
            cols = []
            for part, is_slot in self.template.parts:
                if not is_slot:
                    ids = encode_literal(tokenizer, part)
                    cols.append((None, np.broadcast_to(ids, (1, len(ids))), np.array([len(ids)])))
                    continue
                name = part.lstrip("\0")
                lead = "" if part.startswith("\0") else " "
                texts = (self.keys if name == "key" else self.values).pool(self.pool)
                pieces = [encode_value(tokenizer, lead + t) for t in texts]
                lens = np.array([len(p) for p in pieces], dtype=np.int64)
                pad = np.full((len(pieces), int(lens.max())), -1, dtype=np.int64)
                for r, p in enumerate(pieces):
                    pad[r, : len(p)] = p
                cols.append((name, pad, lens))
            self._cache[tokenizer] = cols
        return self._cache[tokenizer]

    def fill(self, tokenizer, n, rng):
        cols = self._encoded(tokenizer)
        min_unit = sum(int(lens.min()) for _, _, lens in cols)
        m = n // max(min_unit, 1) + 1
        n_keys = len(next(pad for name, pad, _ in cols if name == "key"))
        n_vals = len(next(pad for name, pad, _ in cols if name == "value"))
        key_idx = rng.integers(0, n_keys, size=m)
        val_of_key = rng.integers(0, n_vals, size=n_keys)
        idx = {"key": key_idx, "value": val_of_key[key_idx], None: np.zeros(m, dtype=np.int64)}
        mats = [pad[idx[name]] for name, pad, _ in cols]
        unit_len = sum(lens[idx[name]] for name, _, lens in cols)
        flat = np.concatenate(mats, axis=1).ravel()
        flat = flat[flat >= 0][:n]
        b = np.concatenate([[0], np.cumsum(unit_len)])
        return flat, np.append(b[b < n], n)

    def __repr__(self) -> str:
        return f"KVHaystack({self.template.fmt!r}, keys={self.keys!r}, values={self.values!r})"


def make_haystack(
    kind: str, needle_template: str | Template | None = None, keys: Kind | None = None, values: Kind | None = None
) -> Haystack:
    """A haystack by name: noise, essay, or kv (distractors in the needle's own template)."""
    if kind in _SHARED:
        return _SHARED[kind]
    if kind == "kv":
        if needle_template is None or keys is None or values is None:
            raise ValueError("the kv haystack needs the needle template and the key/value kinds")
        return KVHaystack(needle_template, keys, values)
    raise ValueError(f"unknown haystack {kind!r}; known: ['essay', 'kv', 'noise']")


_SHARED: dict[str, Haystack] = {"noise": NoiseHaystack(), "essay": EssayHaystack()}  # encoded once per tokenizer
