"""Sharding rules of views, data movement and tensor creation (see axis.py).

Views track dimensions: a reshape pairs input and output dims into groups of equal element
count, and only a group's major (first) dim may stay sharded, mapping to the major dim on the
other side ([b, s, h*d] -> [b, s, h, d] keeps S(2) as S(2); [b, s, h] -> [b*s, h] keeps S(0),
but S(1) cannot survive the merge). Permutes and transposes renumber, slices and selects keep
every dim they do not cut, concatenation keeps every dim but the concatenated one, fills can
be created already sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshweave.ir.graph import Value
from meshweave.ir.sharding import Shard
from .axis import SHARDING_RULES, AxisStrategy, OpView, P, R, _norm


# ----------------------------------------------------------------------------------- views
def view_groups(ishape: Sequence[Any], oshape: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """Pair input and output dims into groups with equal element counts (size-1 dims alone)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    ni, no = len(ishape), len(oshape)
    while i < ni or j < no:
        if i < ni and ishape[i] == 1 and (j >= no or oshape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < no and oshape[j] == 1 and (i >= ni or ishape[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= ni or j >= no:
            raise ValueError(f"view groups: {list(ishape)} -> {list(oshape)} do not match")
        gi, gj, pi, pj = [i], [j], ishape[i], oshape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < ni:
                pi, i = pi * ishape[i], i + 1
                gi.append(i - 1)
            elif j < no:
                pj, j = pj * oshape[j], j + 1
                gj.append(j - 1)
            else:
                raise ValueError(f"view groups: {list(ishape)} -> {list(oshape)} do not match")
        groups.append((gi, gj))
    return groups


def view_dim_map(ishape: Sequence[Any], oshape: Sequence[Any]) -> dict[int, int]:
    """Input dim -> output dim for dims that may stay sharded through a view (group majors)."""
    out = {}
    for gi, gj in view_groups(ishape, oshape):
        if gi and gj:
            out[gi[0]] = gj[0]
    return out


def _mapped(
    op: OpView, x: Value, dim_map: dict[int, int], tag: str = "follow", partial: bool = True
) -> list[AxisStrategy]:
    out = [op.make({x: Shard(d)}, Shard(o), tag) for d, o in dim_map.items()]
    if partial:
        out.append(op.make({x: P}, P, "partial"))
    return out


@SHARDING_RULES.register("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def view_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    it, ot = op.t(x), op.out_types[0]
    return _mapped(op, x, view_dim_map(it.shape, ot.shape))


@SHARDING_RULES.register("aten.permute.default")
def permute_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    perm = [_norm(d, rank) for d in op.node.args[1]]
    return _mapped(op, x, {d: perm.index(d) for d in range(rank)})


@SHARDING_RULES.register("aten.transpose.int")
def transpose_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    a, b = _norm(op.node.args[1], rank), _norm(op.node.args[2], rank)
    swap = {a: b, b: a}
    return _mapped(op, x, {d: swap.get(d, d) for d in range(rank)})


@SHARDING_RULES.register("aten.t.default")
def t_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    return _mapped(op, x, {d: rank - 1 - d for d in range(rank)})


@SHARDING_RULES.register("aten.unsqueeze.default")
def unsqueeze_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    dim = _norm(op.node.args[1], rank + 1)
    return _mapped(op, x, {d: d if d < dim else d + 1 for d in range(rank)})


@SHARDING_RULES.register("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def squeeze_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    it, ot = op.t(x), op.out_types[0]
    keep = [d for d in range(it.rank) if it.shape[d] != 1]
    if len(keep) != ot.rank:  # some size-1 dims stay; map through the view groups instead
        return _mapped(op, x, view_dim_map(it.shape, ot.shape))
    return _mapped(op, x, {d: i for i, d in enumerate(keep)})


@SHARDING_RULES.register("aten.expand.default")
def expand_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    it, ot = op.t(x), op.out_types[0]
    lead = ot.rank - it.rank
    kept = {d: d + lead for d in range(it.rank) if it.shape[d] == ot.shape[d + lead]}
    out = _mapped(op, x, kept, partial=False)
    for o in range(ot.rank):  # expanded dims: each device expands to its slice only
        if ot.shape[o] != 1 and (o < lead or it.shape[o - lead] == 1):
            out.append(op.make({}, Shard(o), "follow"))
    return out


@SHARDING_RULES.register("aten.select.int")
def select_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    dim = _norm(op.node.args[1], rank)
    return _mapped(op, x, {d: d - (d > dim) for d in range(rank) if d != dim}, partial=False)


@SHARDING_RULES.register("aten.slice.Tensor")
def slice_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    it, ot = op.t(x), op.out_types[0]
    dim = _norm(op.arg(1, "dim", 0), it.rank)
    full = it.shape[dim] == ot.shape[dim]
    return _mapped(op, x, {d: d for d in range(it.rank) if d != dim or full}, partial=False)


@SHARDING_RULES.register("aten.split_with_sizes.default")
def split_rule(op: OpView) -> list[AxisStrategy]:
    # Sharding the split dim itself needs the input in a blocked layout (each device holds
    # its slice of every piece); lower.py arranges that back to the weights.
    x = op.node.args[0]
    it = op.t(x)
    return [op.make({x: Shard(d)}, Shard(d), "follow") for d in range(it.rank) if it.shape[d] != 1]


@SHARDING_RULES.register("aten.cat.default")
def cat_rule(op: OpView) -> list[AxisStrategy]:
    ins = op.tensor_inputs()
    ot = op.out_types[0]
    dim = _norm(op.arg(1, "dim", 0), ot.rank)
    ins = [v for v in ins if op.t(v).rank == ot.rank]
    return [
        op.make({v: Shard(d) for v in ins}, Shard(d), "follow")
        for d in range(ot.rank)
        if d != dim and ot.shape[d] != 1
    ]


@SHARDING_RULES.register("aten.stack.default")
def stack_rule(op: OpView) -> list[AxisStrategy]:
    ins = op.tensor_inputs()
    ot = op.out_types[0]
    dim = _norm(op.arg(1, "dim", 0), ot.rank)
    return [
        op.make({v: Shard(d) for v in ins}, Shard(d if d < dim else d + 1), "follow")
        for d in range(ot.rank - 1)
    ]


@SHARDING_RULES.register("aten.index_select.default", "aten.gather.default")
def index_select_rule(op: OpView) -> list[AxisStrategy]:
    x, idx = op.node.args[0], op.node.args[2]
    rank = op.t(x).rank
    dim = _norm(op.node.args[1], rank)
    gather = op.node.op == "aten.gather.default"
    out = [
        op.make({x: Shard(d), idx: Shard(d) if gather else R}, Shard(d), "follow")
        for d in range(rank)
        if d != dim
    ]
    if gather and op.t(x).shape[dim] != 1:
        # from a vocab-split input (the log-probabilities of a vocab-parallel cross-entropy):
        # each rank picks the indices in its range, zeros elsewhere, a partial sum
        out.append(op.make({x: Shard(dim)}, P, "vocab"))
    return out


@SHARDING_RULES.register("aten.tril.default", "aten.triu.default")
def triangle_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    return _mapped(op, x, {d: d for d in range(rank - 2)}, partial=False)


@SHARDING_RULES.register("aten.constant_pad_nd.default")
def pad_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    padded = {rank - 1 - i for i in range(len(op.node.args[1]) // 2)}
    return _mapped(op, x, {d: d for d in range(rank) if d not in padded}, partial=False)


# -------------------------------------------------------------------------------- creation
@SHARDING_RULES.register(
    "aten.full.default", "aten.zeros.default", "aten.ones.default", "aten.empty.memory_format"
)
def fill_rule(op: OpView) -> list[AxisStrategy]:
    ot = op.out_types[0]
    return [op.make({}, Shard(d), "follow") for d in range(ot.rank) if ot.shape[d] != 1]


@SHARDING_RULES.register(
    "aten.full_like.default",
    "aten.zeros_like.default",
    "aten.ones_like.default",
    "aten.empty_like.default",
)
def like_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    rank = op.t(x).rank
    return _mapped(op, x, {d: d for d in range(rank)}, partial=False)


def _no_rule(op: OpView) -> list[AxisStrategy]:
    return []


for _name in (
    "aten.arange.default",
    "aten.arange.start",
    "aten.arange.start_step",
    "aten.scalar_tensor.default",
    "aten.index.Tensor",
    "aten.index_put.default",
    "aten.flip.default",
    "aten.roll.default",
    "aten.repeat.default",
):
    SHARDING_RULES.register(_name)(_no_rule)
