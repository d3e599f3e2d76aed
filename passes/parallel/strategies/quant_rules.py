"""Sharding rules of the quantized linear op, `quant.linear` (ir/ops/quant.py).

    quant.linear(x[..., K], qweight: i32[K*bits/32, N], scales[K/g, N], zeros: u8[K/g, N] | None,
                 bias[N] | None, bits=, group_size=g) -> [..., N]

The packed layout (ir/packing.py) makes both Megatron splits plain slices of the stored tensors:

  batch  x split on any dim but the last; the weights replicated; output split the same way
  col    N split: qweight, scales and zeros on dim 1 (columns of int32 words), bias on dim 0;
         output split on its last dim. Any N is offered (divisibility is checked over the
         whole mesh by node_strategies)
  row    K split at group boundaries only: x on its last dim, qweight on dim 0 (rows of int32
         words: a group of g codes is g*bits/32 whole words), scales and zeros on dim 0 (one
         row per group); the output is a partial sum (an all-reduce), the bias replicated and
         added on one rank of the group (lower/rules.py). Every device must hold whole groups:
         scales' dim 0 (the group count K/g) is sharded, so node_strategies keeps the split
         only where the group count divides over the mesh axes; a layer with a single group
         (per-channel quantization, or a group as wide as K) gets no row split at all.

`check_pins` rejects pinned placements that would cut a group (on qweight/scales/zeros or a
Partial output of the op), naming the value, the node and its source line, the group size and
the required multiple; the search calls it where it reads the pins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.ops.quant import QUANT_LINEAR
from meshweave.ir.sharding import Partial, Shard
from .axis import SHARDING_RULES, AxisStrategy, OpView, P
from .node_strategies import PlanningError


class QuantShardingError(PlanningError):
    """A placement would split a quantization group of a `quant.linear` weight."""


def _operands(op: OpView) -> tuple[Value, Value, Value, Value | None, Value | None]:
    x, qweight, scales = op.node.args[0], op.node.args[1], op.node.args[2]
    zeros, bias = op.arg(3, "zeros"), op.arg(4, "bias")
    zeros = zeros if isinstance(zeros, Value) else None
    bias = bias if isinstance(bias, Value) else None
    return x, qweight, scales, zeros, bias


def group_count(op: OpView) -> int | None:
    """Groups along K (scales' dim 0), or None when the shape is not a plain int."""
    st = op.t(op.node.args[2])
    if st is None or st.rank != 2:
        return None
    g = st.shape[0]
    return g if isinstance(g, int) else None


@SHARDING_RULES.register(QUANT_LINEAR)
def quant_linear_rule(op: OpView) -> list[AxisStrategy]:
    x, qweight, scales, zeros, bias = _operands(op)
    xt = op.t(x)
    if xt is None:
        return []
    last = xt.rank - 1
    out = [op.make({x: Shard(d)}, Shard(d), "batch") for d in range(last) if xt.shape[d] != 1]
    col: dict[Value, Any] = {qweight: Shard(1), scales: Shard(1)}
    if zeros is not None:
        col[zeros] = Shard(1)
    if bias is not None:
        col[bias] = Shard(0)
    out.append(op.make(col, Shard(last), "col"))
    groups = group_count(op)
    if groups is not None and groups > 1:
        row: dict[Value, Any] = {x: Shard(last), qweight: Shard(0), scales: Shard(0)}
        if zeros is not None:
            row[zeros] = Shard(0)
        out.append(op.make(row, P, "row"))  # bias stays replicated: added once (lower/rules.py)
    return out


# ------------------------------------------------------------------------------ pins
def _k_factor(pl: Sequence[Any], mesh_shape: Sequence[int]) -> int:
    return math.prod(n for p, n in zip(pl, mesh_shape) if isinstance(p, Shard) and p.dim == 0)


def _describe(n: Node) -> str:
    where = f" (from {n.source})" if n.source else ""
    return f"quant.linear %{n.outputs[0].name}{where}"


def _group_error(n: Node, what: str, factor: int, types: Mapping[Value, Any]) -> str:
    qt = types.get(n.args[1], n.args[1].type)
    st = types.get(n.args[2], n.args[2].type)
    groups = st.shape[0]
    g = n.kwargs.get("group_size")
    bits = n.kwargs.get("bits")
    k = groups * g
    words = g * bits // 32 if g and bits else None
    return (
        f"{what} splits K of {_describe(n)} over {factor} devices, which cuts a quantization "
        f"group: K={k} is {groups} group(s) of group_size={g}"
        + (f" ({words} int32 row(s) of qweight[{qt.shape[0]}, {qt.shape[1]}] each)" if words else "")
        + f"; a K split needs each device to hold a multiple of {g} features, i.e. the group "
        f"count {groups} divisible by the devices sharding K (here {factor}). Replicate K, "
        f"split N (qweight/scales/zeros S(1)), or use a group size with K/group_size "
        f"divisible by {factor}"
    )


def check_pins(
    graph: Graph,
    pins: Mapping[Value, Sequence[Any]],
    mesh_shape: Sequence[int],
    types: Mapping[Value, Any] | None = None,
) -> None:
    """Raise QuantShardingError where a pinned placement (parsed, one per mesh axis) splits
    a quantization group: a packed weight tensor of a quant.linear sharded on dim 0 over
    devices that do not divide its group count, or the op's output pinned Partial (a row
    split) where they do not."""
    types = types or {}
    for n in graph.nodes:
        if n.op != QUANT_LINEAR:
            continue
        st = types.get(n.args[2], n.args[2].type)
        groups = st.shape[0] if st is not None and st.rank == 2 else None
        if not isinstance(groups, int):
            continue
        packed = [("qweight", n.args[1]), ("scales", n.args[2])]
        z = n.args[3] if len(n.args) > 3 else n.kwargs.get("zeros")
        if isinstance(z, Value):
            packed.append(("zeros", z))
        for role, v in packed:
            pl = pins.get(v)
            if pl is None:
                continue
            f = _k_factor(pl, mesh_shape)
            if f > 1 and groups % f:
                shown = ",".join(str(p) for p in pl)
                raise QuantShardingError(
                    _group_error(n, f"pin %{v.name}=({shown}) (the {role})", f, types)
                )
        pl = pins.get(n.outputs[0])
        if pl is not None:
            f = math.prod(m for p, m in zip(pl, mesh_shape) if isinstance(p, Partial))
            if f > 1 and (groups == 1 or groups % f):
                shown = ",".join(str(p) for p in pl)
                raise QuantShardingError(
                    _group_error(n, f"pin %{n.outputs[0].name}=({shown}) (a partial sum: "
                                 "a row split)", f, types)
                )
