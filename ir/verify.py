"""The IR verifier: structural invariants and agreement with the registry's shape rules.

Run after every pass (the pass pipeline does it) and in tests. A failure names the node, its
source line and the pass after which it was found.
"""

from __future__ import annotations

import sympy

from .errors import VerificationError
from .graph import Graph, Node, map_values
from .printer import format_node
from .registry import lookup
from .types import ScalarType, TensorType


def _dims_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    # Unbacked symbols (u0, u1: sizes that depend on data) are fresh at each use in the trace,
    # so equality through them is undecidable here; it is checked when the op runs.
    return any(s.name.startswith("u") for s in diff.free_symbols)


def types_agree(declared, inferred) -> bool:
    if isinstance(declared, TensorType) and isinstance(inferred, TensorType):
        return (
            declared.rank == inferred.rank
            and all(_dims_equal(a, b) for a, b in zip(declared.shape, inferred.shape))
            and declared.dtype == inferred.dtype
        )
    if isinstance(declared, ScalarType) and isinstance(inferred, ScalarType):
        if declared.expr is None or inferred.expr is None:
            return True
        return _dims_equal(declared.expr, inferred.expr)
    return type(declared) is type(inferred)


def infer_types(n: Node):
    """Output types by the op's shape rule, or None when it has no rule or cannot decide."""
    info = lookup(n.op)
    if info is None or info.shape is None:
        return None
    args = map_values(n.args, lambda v: v.type)
    kwargs = map_values(n.kwargs, lambda v: v.type)
    return info.shape(*args, **kwargs)


def verify(g: Graph, after_pass: str = "", check_types: bool = True) -> None:
    defined = set()
    names = set()

    def fail(msg: str, node: Node | None = None):
        where = ""
        if node is not None:
            where = format_node(node, with_source=False)
            if node.source:
                where += f" (from {node.source})"
        raise VerificationError(msg, where, after_pass)

    for v in g.inputs:
        if v.name in names:
            fail(f"duplicate value name %{v.name}")
        names.add(v.name)
        defined.add(v)
        if v.kind in ("param", "buffer", "constant") and v.name not in g.tensors:
            fail(f"{v.kind} input %{v.name} ({v.target}) has no tensor")
    for n in g.nodes:
        for v in n.inputs:
            if v not in defined:
                fail(f"input %{v.name} is used before it is defined", n)
        if lookup(n.op) is None and not n.attrs.get("fallback"):
            fail(f"op {n.op} is not in the registry and not marked as eager fallback", n)
        for o in n.outputs:
            if o.name in names:
                fail(f"duplicate value name %{o.name}", n)
            if o.producer is not n:
                fail(f"value %{o.name} does not point back to its producer", n)
            names.add(o.name)
            defined.add(o)
        if check_types:
            _check_node_types(n, fail)
    for v in g.outputs:
        if v not in defined:
            fail(f"graph output %{v.name} is not defined")
    mesh = g.meta.get("mesh")
    if mesh is not None:
        for v in g.all_values():
            if v.placements is not None and len(v.placements) != mesh.ndim:
                fail(f"%{v.name} has {len(v.placements)} placements for a {mesh.ndim}-d mesh")


def _check_node_types(n: Node, fail) -> None:
    try:
        inferred = infer_types(n)
    except (ValueError, IndexError, TypeError) as e:
        fail(f"shape rule of {n.op} failed: {e}", n)
        return
    if inferred is None:
        return
    if len(inferred) != len(n.outputs):
        fail(f"{n.op} declares {len(n.outputs)} outputs, its rule gives {len(inferred)}", n)
    for o, t in zip(n.outputs, inferred):
        if not types_agree(o.type, t):
            fail(f"%{o.name} is declared {o.type} but {n.op}'s shape rule gives {t}", n)
