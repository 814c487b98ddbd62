"""Passkey retrieval (landmark attention): a number hidden in repeated noise sentences."""

from __future__ import annotations

from .base import Layout, Needle, NeedleTask, Piece, Template
from .haystacks import NoiseHaystack
from .kinds import Numbers
from .registry import register_task


class Passkey(NeedleTask):
    """Find the pass key hidden in "The grass is green. The sky is blue. ..." filler."""

    prefix = Template(
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n"
    )
    needle = Template(" The pass key is {value}. Remember it. {value} is the pass key.")
    question = Template("\nWhat is the pass key? The pass key is")

    def __init__(self, name: str = "passkey", digits: int = 5) -> None:
        self.name, self.digits = name, digits
        self.values, self.haystack = Numbers(digits), NoiseHaystack()

    def build(self, rng):
        (value,) = self.values.draw(rng, 1)
        return Layout(
            prefix=Piece(self.prefix),
            needles=[Needle(self.needle, {"value": value}, anchor=True)],
            suffix=Piece(self.question),
            answer=value,
        )


register_task(Passkey())
