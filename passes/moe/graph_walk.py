"""Graph queries the MoE matchers share: ancestry, dependency flags, view chains.

Everything here reads a Graph and builds nothing; the matchers (router.py, region.py,
shared.py) combine these into the pieces of one MoE block.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshweave.ir.graph import Node, Value
from meshweave.ir.types import TensorType

# Ops that only re-shape, re-type or copy their one tensor input: a value seen through them is
# the same data (up to layout and dtype).
SHAPE_OPS = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
    "aten.expand.default", "aten.clone.default", "aten._to_copy.default",
    "aten.contiguous.default", "aten.alias.default", "aten.flatten.using_ints",
    "aten.permute.default", "aten.transpose.int", "aten.t.default",
    "prims.convert_element_type.default", "aten.to.dtype",
    # copies of each row (a token sent to its k slots); validation checks what they do
    "aten.repeat_interleave.self_int", "aten.repeat.default",
})
# Ops whose result depends on their input's shape and dtype only (zeros_like(probs) before a
# scatter): the input's values do not flow through them.
SHAPE_ONLY_OPS = frozenset({
    "aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default",
    "aten.new_zeros.default", "aten.new_ones.default", "aten.new_full.default",
})
LINEAR_OPS = frozenset({"aten.linear.default", "aten.mm.default", "aten.addmm.default",
                        "aten.matmul.default"})


class Inputs(dict):
    """Node -> its input Values, computed once per node (Node.inputs walks the args each time,
    and the matchers ask for every node's inputs once per router)."""

    def __missing__(self, n: Node) -> list[Value]:
        vals = self[n] = n.inputs
        return vals


def users_of(order: list[Node], ins: Inputs) -> dict[Value, list[Node]]:
    out: dict[Value, list[Node]] = {}
    for n in order:
        for v in ins[n]:
            out.setdefault(v, []).append(n)
    return out


def shape_of(v: Value) -> tuple | None:
    return tuple(v.type.shape) if isinstance(v.type, TensorType) else None


def is_state(v: Value) -> bool:
    """A graph input holding a tensor of the model's (parameter, buffer, constant)."""
    return v.producer is None and v.kind in ("param", "buffer", "constant")


def activation_inputs(n: Node) -> list[Value]:
    return [v for v in n.inputs if isinstance(v.type, TensorType) and not is_state(v)]


def ancestors(values: Iterable[Value], ins: Inputs) -> set[Node]:
    """Every node some of `values` depends on (their producers included)."""
    seen: set[Node] = set()
    stack = [v.producer for v in values if v.producer is not None]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(v.producer for v in ins[n] if v.producer is not None)
    return seen


def through_shape_ops(v: Value, max_hops: int = 16) -> list[Value]:
    """`v`, then what it views, back through SHAPE_OPS with one activation input: the chain of
    values that hold the same data."""
    chain = [v]
    while len(chain) <= max_hops:
        n = chain[-1].producer
        if n is None or n.op not in SHAPE_OPS:
            break
        acts = activation_inputs(n)
        if len(acts) != 1:
            break
        chain.append(acts[0])
    return chain


def constant_only(n: Node, memo: dict[Node, bool]) -> bool:
    """True when `n` reads no activation (arange, full, ops over them): it can be copied into a
    region and run there as it is."""
    if n in memo:
        return memo[n]
    ok = all(v.producer is not None and constant_only(v.producer, memo) or
             (v.producer is None and v.kind != "user")
             for v in n.inputs)
    memo[n] = ok
    return ok


def pure_descendants(roots: list[Value], order: list[Node], constants: dict[Node, bool],
                     ins: Inputs) -> list[Value]:
    """Values computed from `roots` alone (and constants), in program order, roots first: the
    renormalisations of the top-k scores, the casts of the top-k ids."""
    own = set(roots)
    out = list(roots)
    starts = [order.index(r.producer) + 1 for r in roots if r.producer is not None]
    for n in order[min(starts, default=0):]:
        vals = ins[n]
        if not vals or not any(v in own for v in vals):
            continue
        if all(v in own or (v.producer is None and v.kind != "user") or
               (v.producer is not None and constant_only(v.producer, constants)) for v in vals):
            own.update(n.outputs)
            out.extend(n.outputs)
    return out


def dependency_flags(order: list[Node], roots: dict[Value, str], tracked: set[Value],
                     ins: Inputs) -> dict[Value, frozenset]:
    """For each value computed in `order`, which of the labelled `roots` and of the `tracked`
    parameters it depends on (a parameter is its own label)."""
    flags: dict[Value, frozenset] = {v: frozenset({label}) for v, label in roots.items()}
    empty: frozenset = frozenset()
    for n in order:
        acc = empty
        for v in ins[n]:
            f = flags.get(v)
            if f is not None:
                acc = acc | f
            elif v in tracked:
                acc = acc | {v}
        for o in n.outputs:
            flags[o] = flags[o] | acc if o in roots else acc
    return flags
