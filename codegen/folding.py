"""What the codegen pre-passes (gqa.py, causal_mask.py) share: after a rewrite, dead-code
elimination, and a record in graph.meta["folded"] of each traced value that needs no kernel
any more and why (explain() and the kernel listing show it)."""

from __future__ import annotations

from ..ir.graph import Graph
from ..passes.dce import dce

SDPA = "aten.scaled_dot_product_attention.default"


def drop_folded(before: Graph, rewritten: Graph, why: str, extra: tuple[str, ...] = ()) -> Graph:
    """dce(rewritten), with every node output of `before` that dce dropped, and the names in
    `extra`, recorded in meta["folded"] (merged with what earlier pre-passes recorded)."""
    out = dce(rewritten)
    kept = {o.name for n in out.nodes for o in n.outputs}
    folded = dict(before.meta.get("folded", {}))
    for n in before.nodes:
        if n.outputs[0].name not in kept:
            folded.setdefault(n.outputs[0].name, why)
    for name in extra:
        folded.setdefault(name, why)
    out.meta["folded"] = folded
    return out
