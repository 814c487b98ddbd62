"""Shared pieces of the RULER-style needle-in-a-haystack tasks."""

from __future__ import annotations

from .base import NeedleTask, Template
from .haystacks import KVHaystack, make_haystack
from .kinds import key_kind, value_kind

PREFIX = (
    "Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {noun} afterwards.\n"
)
NEEDLE = " One of the special magic {noun} for {{key}} is: {{value}}."
QUESTION = (
    "\nWhat is the special magic {one} for {{key}} mentioned in the provided text? "
    "The special magic {one} for {{key}} mentioned in the provided text is"
)
QUESTION_ALL = (
    "\nWhat are all the special magic {noun} for {keys} mentioned in the provided text? "
    "The special magic {noun} for {keys} mentioned in the provided text are"
)


def key_list(n: int) -> str:
    """ "{k0}, {k1} and {k2}" as template slots."""
    slots = [f"{{k{i}}}" for i in range(n)]
    return slots[0] if n == 1 else ", ".join(slots[:-1]) + " and " + slots[-1]


class NiahTask(NeedleTask):
    """Base of the NIAH tasks: keys, values, needle template and haystack (essay, noise or kv)."""

    def __init__(self, name: str, haystack: str = "essay", keys: str = "words", values: str = "numbers"):
        self.name = name
        self.keys, self.values = key_kind(keys), value_kind(values)
        noun = self.values.noun
        self.prefix = Template(PREFIX.format(noun=noun))
        self.needle = Template(NEEDLE.format(noun=noun))
        self.question = Template(QUESTION.format(one=noun[:-1]))
        self.haystack = make_haystack(haystack, self.needle, self.keys, self.values)
        self._exclude = self.haystack.reserved_keys if isinstance(self.haystack, KVHaystack) else frozenset()

    def draw_keys(self, rng, k: int):
        return self.keys.draw(rng, k, exclude=self._exclude)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, haystack={self.haystack.kind!r}, "
            f"keys={self.keys!r}, values={self.values!r})"
        )
