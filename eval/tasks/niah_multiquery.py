"""RULER multi-query: several keys asked at once."""

from __future__ import annotations

from ._niah import QUESTION_ALL, NiahTask, key_list
from .base import Layout, Needle, Piece, Template
from .registry import register_task


class NiahMultiQuery(NiahTask):
    """`num_queries` needles with distinct keys (the first at depth), all asked; partial credit."""

    def __init__(self, name: str = "niah_multiquery", num_queries: int = 4, **kw) -> None:
        super().__init__(name, **kw)
        self.num_queries = num_queries
        self.question = Template(QUESTION_ALL.format(noun=self.values.noun, keys=key_list(num_queries)))

    def build(self, rng):
        keys = self.draw_keys(rng, self.num_queries)
        values = self.values.draw(rng, self.num_queries)
        return Layout(
            prefix=Piece(self.prefix),
            needles=[
                Needle(self.needle, {"key": k, "value": v}, anchor=i == 0) for i, (k, v) in enumerate(zip(keys, values))
            ],
            suffix=Piece(self.question, {f"k{i}": k for i, k in enumerate(keys)}),
            answer=list(values),  # in the order the keys are asked
            meta={"keys": list(keys)},
        )


register_task(NiahMultiQuery())
