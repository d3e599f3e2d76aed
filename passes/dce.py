"""Dead-code elimination: drop nodes none of whose outputs reach a graph output.

After torch.export's functionalization every op is pure, so reachability is all that matters.
"""

from __future__ import annotations

from ..ir.graph import Graph


def dce(graph: Graph) -> Graph:
    g = graph.copy()
    live = set(g.outputs)
    kept = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    g.nodes = list(reversed(kept))
    return g
