"""Common-subexpression elimination: identical pure nodes over identical inputs merge.

Random ops are never merged. The key is the op name plus its arguments with Values by identity.
"""

from __future__ import annotations

from ..ir.graph import Graph, Value, map_values

_IMPURE_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty")


def _key(x):
    if isinstance(x, Value):
        return ("%", id(x))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_key(y) for y in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _key(v)) for k, v in x.items()))
    if isinstance(x, float):
        return ("f", repr(x))  # keeps -0.0 and nan distinct and hashable
    return (type(x).__name__, str(x))


def cse(graph: Graph) -> Graph:
    g = graph.copy()
    replace: dict[Value, Value] = {}
    seen: dict[tuple, list[Value]] = {}
    kept = []
    for n in g.nodes:
        n.args = map_values(n.args, lambda v: replace.get(v, v))
        n.kwargs = map_values(n.kwargs, lambda v: replace.get(v, v))
        if n.attrs.get("fallback") or any(w in n.op for w in _IMPURE_WORDS):
            kept.append(n)
            continue
        key = (n.op, _key(n.args), _key(n.kwargs))
        if key in seen:
            for old, new in zip(n.outputs, seen[key]):
                replace[old] = new
            continue
        seen[key] = list(n.outputs)
        kept.append(n)
    g.nodes = kept
    g.outputs = [replace.get(v, v) for v in g.outputs]
    return g
