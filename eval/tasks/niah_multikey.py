"""RULER multi-key: the queried needle among distractor needles with other keys."""

from __future__ import annotations

from ._niah import NiahTask
from .base import Layout, Needle, Piece
from .registry import register_task


class NiahMultiKey(NiahTask):
    """The queried needle at depth plus `num_distractors` needles with other keys at random places."""

    def __init__(self, name: str = "niah_multikey", num_distractors: int = 3, **kw) -> None:
        super().__init__(name, **kw)
        self.num_distractors = num_distractors

    def build(self, rng):
        keys = self.draw_keys(rng, 1 + self.num_distractors)
        values = self.values.draw(rng, 1 + self.num_distractors)
        needles = [
            Needle(self.needle, {"key": k, "value": v}, anchor=i == 0) for i, (k, v) in enumerate(zip(keys, values))
        ]
        return Layout(
            prefix=Piece(self.prefix),
            needles=needles,
            suffix=Piece(self.question, {"key": keys[0]}),
            answer=values[0],
            meta={"keys": list(keys), "values": list(values)},  # the asked needle's first
        )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", num_distractors={self.num_distractors})"


register_task(NiahMultiKey())
# the asked needle and one other: a step before four needles in a multi-key curriculum (docs/training.md)
register_task(NiahMultiKey("niah_multikey_pair", num_distractors=1))
