"""Passkey retrieval (landmark attention): a number hidden in repeated noise sentences."""

from __future__ import annotations

from .base import Layout, Needle, NeedleTask, Piece, Template
from .haystacks import NoiseHaystack
from .kinds import Numbers, TokenBalancedNumbers
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
        return self._layout(*self.values.draw(rng, 1))

    def _layout(self, value):
        return Layout(
            prefix=Piece(self.prefix),
            needles=[Needle(self.needle, {"value": value}, anchor=True)],
            suffix=Piece(self.question),
            answer=value,
        )


class PasskeyBalanced(Passkey):
    """Passkey whose keys are drawn token-balanced for the tokenizer (`TokenBalancedNumbers`): a training
    variant, so that keys that are one rare BPE token are copied too; evaluate on `passkey` (uniform keys)."""

    def __init__(self, name: str = "passkey_balanced", digits: int = 5, balance: float = 0.5) -> None:
        super().__init__(name, digits)
        self.balance = balance  # shown in the repr (docs/tasks.md)
        self.values = TokenBalancedNumbers(digits, balance)

    def build_for(self, rng, tokenizer):
        return self._layout(*self.values.draw_for(rng, tokenizer, 1))


register_task(Passkey())
register_task(PasskeyBalanced())
# every key token-balanced: a rarest-token class (e.g. a key that is one rare token) comes up twice as often
register_task(PasskeyBalanced("passkey_balanced_full", balance=1.0))
