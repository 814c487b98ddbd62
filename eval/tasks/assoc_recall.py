"""Associative recall (MQAR-like): a dense list of key: value pairs, then several keys queried."""

from __future__ import annotations

from ._niah import key_list
from .base import Layout, Needle, NeedleTask, Piece, Template
from .haystacks import KVHaystack
from .kinds import Numbers, WordPairs
from .registry import register_task


class AssocRecall(NeedleTask):
    """The haystack is all distractor pairs; `num_queries` fresh pairs are hidden (the first at depth)."""

    prefix = Template("Memorize the value of every key in the following list of key: value pairs.\n")
    pair = Template(" {key}: {value}.")

    def __init__(self, name: str = "assoc_recall", num_queries: int = 4, digits: int = 4) -> None:
        if num_queries < 1:
            raise ValueError("assoc_recall needs num_queries >= 1")
        self.name, self.num_queries = name, num_queries
        self.keys, self.values = WordPairs(), Numbers(digits)
        self.haystack = KVHaystack(self.pair, self.keys, self.values)
        self.question = Template(f"\nWhat are the values of {key_list(num_queries)}? The values are")

    def build(self, rng):
        keys = self.keys.draw(rng, self.num_queries, exclude=self.haystack.reserved_keys)
        values = self.values.draw(rng, self.num_queries)
        return Layout(
            prefix=Piece(self.prefix),
            needles=[
                Needle(self.pair, {"key": k, "value": v}, anchor=i == 0) for i, (k, v) in enumerate(zip(keys, values))
            ],
            suffix=Piece(self.question, {f"k{i}": k for i, k in enumerate(keys)}),
            answer=list(values) if self.num_queries > 1 else values[0],
            meta={"keys": list(keys)},
        )


register_task(AssocRecall())
