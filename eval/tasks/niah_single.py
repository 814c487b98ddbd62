"""RULER single needle: one key-value needle in a noise, essay or key-value haystack."""

from __future__ import annotations

from ._niah import NiahTask
from .base import Layout, Needle, Piece
from .registry import register_task


class NiahSingle(NiahTask):
    """One needle "One of the special magic numbers for <key> is: <value>."; asked by its key."""

    def build(self, rng):
        (key,) = self.draw_keys(rng, 1)
        (value,) = self.values.draw(rng, 1)
        return Layout(
            prefix=Piece(self.prefix),
            needles=[Needle(self.needle, {"key": key, "value": value}, anchor=True)],
            suffix=Piece(self.question, {"key": key}),
            answer=value,
            meta={"keys": [key]},
        )


register_task(NiahSingle("niah_single", haystack="essay"))
register_task(NiahSingle("niah_single_noise", haystack="noise"))
register_task(NiahSingle("niah_single_essay", haystack="essay"))
register_task(NiahSingle("niah_single_kv", haystack="kv"))
