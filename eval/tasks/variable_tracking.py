"""RULER variable tracking: chains of assignments "VAR A = 12345 ... VAR B = VAR A"."""

from __future__ import annotations

from .base import Layout, Needle, NeedleTask, Piece, Template
from .haystacks import make_haystack
from .kinds import Codes, Numbers
from .registry import register_task


class VariableTracking(NeedleTask):
    """`num_chains` chains of `num_hops` re-assignments; name every variable holding the queried value.

    Each chain's statements appear in order; the queried chain starts at the requested depth, the
    distractor chains (other values) anywhere.
    """

    prefix = Template("Memorize and track the chain(s) of variable assignment hidden in the following text.\n")
    first = Template(" VAR {var} = {value}.")
    hop = Template(" VAR {var} = VAR {prev}.")

    def __init__(
        self, name: str = "variable_tracking", num_chains: int = 1, num_hops: int = 4, haystack: str = "noise"
    ) -> None:
        if num_chains < 1 or num_hops < 1:
            raise ValueError("variable_tracking needs num_chains >= 1 and num_hops >= 1")
        self.name, self.num_chains, self.num_hops = name, num_chains, num_hops
        self.names, self.values = Codes(5), Numbers(5)
        self.haystack = make_haystack(haystack)
        self.question = Template(
            "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{num_hops + 1} variables are assigned the value {{value}}, they are:"
        )

    def build(self, rng):
        values = self.values.draw(rng, self.num_chains)
        names = self.names.draw(rng, self.num_chains * (self.num_hops + 1))
        chains = [names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)] for c in range(self.num_chains)]
        needles = []
        for c, (chain, value) in enumerate(zip(chains, values)):
            needles.append(Needle(self.first, {"var": chain[0], "value": value}, anchor=c == 0, group=f"c{c}"))
            needles += [Needle(self.hop, {"var": v, "prev": p}, group=f"c{c}") for p, v in zip(chain, chain[1:])]
        return Layout(
            prefix=Piece(self.prefix),
            needles=needles,
            suffix=Piece(self.question, {"value": values[0]}),
            answer=list(chains[0]),
            meta={"chains": [list(ch) for ch in chains], "values": list(values)},
        )


register_task(VariableTracking())
