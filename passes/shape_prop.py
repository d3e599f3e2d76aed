"""Shape propagation: re-derive every value's type from the registry's shape rules.

Rewriting passes build nodes whose types follow from their inputs; this pass fills them in.
Where an op has no rule (eager fallback ops, data-dependent shapes), the traced type stays.
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..ir.verify import infer_types


def shape_prop(graph: Graph) -> Graph:
    g = graph.copy()
    for n in g.nodes:
        inferred = infer_types(n)
        if inferred is None or len(inferred) != len(n.outputs):
            continue
        for o, t in zip(n.outputs, inferred):
            if hasattr(o.type, "device") and hasattr(t, "device") and o.type.device != t.device:
                t = type(t)(t.shape, t.dtype, o.type.device)
            o.type = t
    return g
