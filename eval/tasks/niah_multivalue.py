"""RULER multi-value: several needles share one key; all their values are asked for."""

from __future__ import annotations

from ._niah import QUESTION_ALL, NiahTask
from .base import Layout, Needle, Piece, Template
from .registry import register_task


class NiahMultiValue(NiahTask):
    """`num_values` needles with the same key (the first at depth); partial credit per value found."""

    def __init__(self, name: str = "niah_multivalue", num_values: int = 4, **kw) -> None:
        super().__init__(name, **kw)
        self.num_values = num_values
        self.question = Template(QUESTION_ALL.format(noun=self.values.noun, keys="{key}"))

    def build(self, rng):
        (key,) = self.draw_keys(rng, 1)
        values = self.values.draw(rng, self.num_values)
        return Layout(
            prefix=Piece(self.prefix),
            needles=[Needle(self.needle, {"key": key, "value": v}, anchor=i == 0) for i, v in enumerate(values)],
            suffix=Piece(self.question, {"key": key}),
            answer=list(values),
            answer_needles=list(range(self.num_values)),  # answer in order of appearance
            meta={"keys": [key]},
        )


register_task(NiahMultiValue())
