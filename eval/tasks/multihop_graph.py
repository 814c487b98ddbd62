"""Multi-hop graph traversal: "Node A links to node B." edges scattered; name the node k hops away."""

from __future__ import annotations

from .base import Layout, Needle, NeedleTask, Piece, Template
from .haystacks import make_haystack
from .kinds import Codes
from .registry import register_task


class MultiHopGraph(NeedleTask):
    """`num_chains` disjoint paths of `hops + 1` edges each, edges in random order across the haystack.

    The query starts at the first node of path 0 (whose first edge sits at the requested depth) and
    follows `hops` links; every node has at most one outgoing link, and the answer node has one too,
    so the answer is never simply "the node without a link". The setting in which 'Language Models
    Need Sleep' found consolidation helps most.
    """

    prefix = Template(
        "The following text hides a directed graph: each node links to at most one other node. Memorize every link.\n"
    )
    edge = Template(" Node {a} links to node {b}.")

    def __init__(
        self, name: str = "multihop_graph", hops: int = 3, num_chains: int = 4, haystack: str = "noise"
    ) -> None:
        if hops < 1 or num_chains < 1:
            raise ValueError("multihop_graph needs hops >= 1 and num_chains >= 1")
        self.name, self.hops, self.num_chains = name, hops, num_chains
        self.nodes = Codes(4)
        self.haystack = make_haystack(haystack)
        self.question = Template(
            f"\nQuestion: Starting at node {{start}} and following the links {hops} "
            "times, which node do you reach? Answer: node"
        )

    def build(self, rng):
        per = self.hops + 2
        nodes = self.nodes.draw(rng, self.num_chains * per)
        paths = [nodes[c * per : (c + 1) * per] for c in range(self.num_chains)]
        needles = [
            Needle(self.edge, {"a": a, "b": b}, anchor=c == 0 and j == 0)
            for c, path in enumerate(paths)
            for j, (a, b) in enumerate(zip(path, path[1:]))
        ]
        return Layout(
            prefix=Piece(self.prefix),
            needles=needles,
            suffix=Piece(self.question, {"start": paths[0][0]}),
            answer=paths[0][self.hops],
            meta={"paths": [list(p) for p in paths], "hops": self.hops},
        )


register_task(MultiHopGraph())
