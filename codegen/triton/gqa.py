"""Codegen pre-pass: attention over repeated K/V heads reads the grouped heads directly.

Grouped-query attention models (Llama, Mistral, Qwen) repeat each K/V head n_rep times before
SDPA (`repeat_kv`: unsqueeze -> expand -> clone -> reshape). Run as written, that is a copy
kernel per layer for K and for V writing n_rep times their size, read again by attention. The
flash-attention kernel indexes K/V head h // n_rep itself (SDPA's enable_gqa), so this pass
rewrites

    sdpa(q, P(reshape(clone(expand(unsqueeze(k0, u))))), ...v...)    # P: an optional permute
 -> sdpa(q, P(k0), P(v0), enable_gqa=True)

when K and V repeat the same way, and dead-code elimination drops the copies. It is a pure
function on a copy of the graph, applied only for the Triton backend (the planner and the
reference executor see the graph as traced); the result is the same computation, exactly.
"""

from __future__ import annotations

import dataclasses

import sympy

from meshweave.ir.graph import Graph, NameGen, Node, Value
from meshweave.ir.types import TensorType
from .kernels.flash_attention import parse_sdpa
from ..folding import SDPA, drop_folded
from .indexing import to_expr

_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")


@dataclasses.dataclass(frozen=True)
class _Repeat:
    base: Value  # the grouped tensor, heads at dim `heads`
    heads: int
    n_rep: int
    perm: tuple | None  # the permute applied after the repeat, if any


def _eq(a, b) -> bool:
    return sympy.expand(to_expr(a) - to_expr(b)) == 0


def _match(v: Value) -> _Repeat | None:
    """v == P(reshape(clone?(expand(unsqueeze(base, u))))) merging dims u-1, u?"""
    perm = None
    n = v.producer
    if n is not None and n.op == "aten.permute.default":
        perm = tuple(int(d) for d in n.args[1])
        v = n.args[0]
        n = v.producer
    if n is None or n.op not in _RESHAPES:
        return None
    merged = v.tensor_type.shape
    src = n.args[0]
    n = src.producer
    if n is not None and n.op == "aten.clone.default":
        src = n.args[0]
        n = src.producer
    if n is None or n.op != "aten.expand.default":
        return None
    expanded = src.tensor_type.shape
    unsq = n.args[0]
    n = unsq.producer
    if n is None or n.op != "aten.unsqueeze.default":
        return None
    base = n.args[0]
    u = int(n.args[1]) % len(expanded)
    shape = base.tensor_type.shape
    if u == 0 or len(merged) != len(shape) or len(expanded) != len(shape) + 1:
        return None
    n_rep = expanded[u]
    if not isinstance(n_rep, int) or n_rep < 2:
        return None
    # the expand repeats dim u only, and the reshape merges (u - 1, u) back into one dim
    want = list(shape[:u]) + [n_rep] + list(shape[u:])
    if not all(_eq(a, b) for a, b in zip(expanded, want)):
        return None
    want_merged = list(shape[: u - 1]) + [to_expr(shape[u - 1]) * n_rep] + list(shape[u:])
    if not all(_eq(a, b) for a, b in zip(merged, want_merged)):
        return None
    return _Repeat(base, u - 1, n_rep, perm)


def fold_gqa_repeats(graph: Graph) -> Graph:
    """The graph with repeated-K/V attention rewritten to grouped attention (see module doc)."""
    if not any(n.op == SDPA for n in graph.nodes):
        return graph
    g = graph.copy()
    names = NameGen(g)
    nodes: list[Node] = []
    changed = False
    for n in g.nodes:
        if n.op == SDPA:
            a = parse_sdpa(n)
            rk, rv = _match(a.k), _match(a.v)
            ok = (
                not a.enable_gqa and rk is not None and rv is not None
                and (rk.heads, rk.n_rep, rk.perm) == (rv.heads, rv.n_rep, rv.perm)
                and _heads_dim(rk) == 1
            )
            if ok:
                k = _permuted(rk, a.k, nodes, names)
                v = _permuted(rv, a.v, nodes, names)
                args = list(n.args)
                args[1], args[2] = k, v
                n.args = tuple(args)
                n.kwargs = {**n.kwargs, "enable_gqa": True}
                n.attrs["gqa_folded"] = rk.n_rep
                changed = True
        nodes.append(n)
    if not changed:
        return graph
    g.nodes = nodes
    return drop_folded(graph, g, "K/V head repeat folded into grouped attention (enable_gqa)")


def _heads_dim(r: _Repeat) -> int:
    """Where the heads end up in SDPA's input (must be dim 1 of [B, H, S, D])."""
    return r.perm.index(r.heads) if r.perm is not None else r.heads


def _permuted(r: _Repeat, like: Value, nodes: list[Node], names: NameGen) -> Value:
    """P(base) as a new node appended to `nodes` (or base itself without a permute)."""
    if r.perm is None:
        return r.base
    shape = r.base.tensor_type.shape
    t = like.tensor_type
    out_type = TensorType(tuple(shape[d] for d in r.perm), t.dtype, t.device)
    node = Node("aten.permute.default", (r.base, list(r.perm)), {}, (), like.producer.source)
    node.outputs = (Value(names(f"{r.base.name}_gqa"), out_type, node),)
    nodes.append(node)
    return node.outputs[0]
