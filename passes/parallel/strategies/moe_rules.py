"""Sharding rules of the mixture-of-experts op, `moe.experts` (ir/ops/moe.py), and the `ep` axis.

    moe.experts(x[T, d], weights[T, k], ids[T, k], w_in, w_gate | None, w_out, ...)
        -> (y[T, d], dropped: i64[])

Strategies on one mesh axis (the all-replicated one is added by axis.py):

  batch  plain data parallelism: x, weights and ids split on the token dim 0, the stacked
         expert weights replicated, y split on dim 0. Each device routes its own tokens
  ep     expert parallelism (DeepSpeed-MoE's EP over a data axis): the tokens split as in
         batch AND the stacked expert weights split on their expert dim 0. The lowering
         (lower/moe_rules.py) turns it into `moe.experts_ep`, which exchanges the token rows
         with all_to_all_single. E must divide over the axis (the whole-mesh product is
         checked by node_strategies; `check_ep_mesh` names the node when an ep axis cannot)
  row    expert slicing (Megatron TP inside every expert): w_in/w_gate split on the inner
         width f, w_out on f, x/weights/ids replicated; y is a partial sum (an all-reduce).
         A fused [gate; up] w_in (`fused_gate_up`, HF Mixtral's gate_up_proj) is cut half by
         half (`fused_gate_up_blocks`: each device keeps its f-slice of the gate and of the up
         projection, as a fused QKV weight is cut), so the local chunk(2) still pairs them

`dropped` (the capacity counter) is replicated when the op is dropless (it is 0 on every
device) and a partial sum under batch/ep with a `capacity_factor`: capacity is then applied to
each device's own tokens before any exchange, as DeepSpeed does, so it matches one device
only where no expert overflows. Under row every device routes all tokens alike: replicated.

An axis literally named "ep" pins the op to the ep strategy on it, and every other op to
data parallelism on it (outputs split on their batch dim or replicated, no partial sums):
`restrict_for_ep` filters whole-mesh strategies, `check_ep_mesh` rejects an ep axis on a
graph without moe.experts, or one whose degree does not divide an expert count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.ops.moe import MOE_EXPERTS
from meshweave.ir.sharding import Partial, Shard
from .axis import SHARDING_RULES, AxisStrategy, OpView, P, R, node_inputs
from .node_strategies import BatchInfo, NodeStrategy, PlanningError

EP_AXIS = "ep"
EP_TAG = "ep"


class ExpertParallelError(PlanningError):
    """An `ep` mesh axis the graph cannot use (no MoE node, or E not divisible)."""


def _operands(node: Node) -> tuple[Value, Value, Value, Value, Value | None, Value]:
    names = ("x", "weights", "ids", "w_in", "w_gate", "w_out")
    vals = [node.args[i] if i < len(node.args) else node.kwargs.get(k)
            for i, k in enumerate(names)]
    w_gate = vals[4] if isinstance(vals[4], Value) else None
    return vals[0], vals[1], vals[2], vals[3], w_gate, vals[5]


def _f_dims(layout: str) -> tuple[int, int]:
    """(dim of f in w_in/w_gate, dim of f in w_out) of a stacked-weight layout."""
    return (2, 1) if layout == "kn" else (1, 2)


@SHARDING_RULES.register(MOE_EXPERTS)
def moe_experts_rule(op: OpView) -> list[AxisStrategy]:
    x, weights, ids, w_in, w_gate, w_out = _operands(op.node)
    xt = op.t(x)
    if xt is None or xt.rank != 2:
        return []
    dropped = R if op.node.kwargs.get("capacity_factor") is None else P
    tokens = {x: Shard(0), weights: Shard(0), ids: Shard(0)}
    out: list[AxisStrategy] = []
    if xt.shape[0] != 1:
        out.append(op.make(tokens, [Shard(0), dropped], "batch"))
        experts = dict(tokens)
        for w in (w_in, w_gate, w_out):
            if w is not None:
                experts[w] = Shard(0)
        out.append(op.make(experts, [Shard(0), dropped], EP_TAG))
    f_in, f_out = _f_dims(op.node.kwargs.get("layout", "kn"))
    sliced = {w_in: Shard(f_in), w_out: Shard(f_out)}
    if w_gate is not None:
        sliced[w_gate] = Shard(f_in)
    out.append(op.make(sliced, [P, R], "row"))
    return out


def fused_gate_up_blocks(su) -> list[tuple[Value, int, tuple[int, int]]]:
    """(w_in, f dim, (f, f)) of every moe.experts with a fused [gate; up] w_in that a lowering
    setup (lower/setup.py) splits on f: each device must keep its slice of both halves, as a
    fused QKV weight keeps its slice of q, k and v (shard specs with blocks)."""
    out = []
    for n in su.graph.nodes:
        if n.op != MOE_EXPERTS or not n.kwargs.get("fused_gate_up", False):
            continue
        w_in = _operands(n)[3]
        d = _f_dims(n.kwargs.get("layout", "kn"))[0]
        req = su.in_pl[n][node_inputs(n).index(w_in)]
        if req is not None and any(isinstance(p, Shard) and p.dim == d for p in req):
            half = su.types[w_in].shape[d] // 2
            out.append((w_in, d, (half, half)))
    return out


# ------------------------------------------------------------------------------ the ep axis
def ep_axes(mesh) -> list[int]:
    """Mesh axes named "ep" with more than one device."""
    return [a for a, (name, n) in enumerate(zip(mesh.names, mesh.shape))
            if name == EP_AXIS and n > 1]


def _describe(n: Node) -> str:
    where = f" (from {n.source})" if n.source else ""
    return f"moe.experts %{n.outputs[0].name}{where}"


def num_experts(n: Node, types: dict[Value, Any]) -> int:
    w_in = _operands(n)[3]
    return types.get(w_in, w_in.type).shape[0]


def check_ep_mesh(graph: Graph, mesh, types: dict[Value, Any]) -> None:
    """Raise ExpertParallelError when `mesh` has an axis named "ep" but `graph` has no
    moe.experts node, or the ep degree does not divide a node's expert count."""
    if EP_AXIS not in mesh.names:
        return
    degree = mesh.shape[mesh.names.index(EP_AXIS)]
    moe = [n for n in graph.nodes if n.op == MOE_EXPERTS]
    if not moe:
        dense = list(getattr(graph.meta.get("moe"), "dense", None) or [])
        why = (f"its {len(dense)} MoE block(s) stayed dense (first: {dense[0].reason}; see "
               f"cm.explain())" if dense else "it is a dense model")
        raise ExpertParallelError(
            f"mesh {_mesh_text(mesh)} has an 'ep' axis (expert parallelism), but graph "
            f"{graph.name} has no moe.experts node: {why}. Use dp={degree} for data "
            f"parallelism instead"
        )
    for n in moe:
        e = num_experts(n, types)
        if isinstance(e, int) and e % degree:
            raise ExpertParallelError(
                f"ep={degree} does not divide the {e} experts of {_describe(n)}: expert "
                f"parallelism gives each of the {degree} devices of the 'ep' axis E/ep whole "
                f"experts; use an ep degree that divides {e}"
            )


def _mesh_text(mesh) -> str:
    return ",".join(f"{a}={n}" for a, n in zip(mesh.names, mesh.shape))


def restrict_for_ep(
    node: Node, strategies: Sequence[NodeStrategy], mesh, batch: BatchInfo
) -> list[NodeStrategy]:
    """The strategies of `node` allowed on a mesh with an "ep" axis: moe.experts uses the ep
    strategy there, every other op data parallelism (outputs on their batch dim or
    replicated, no partial sums in or out)."""
    axes = ep_axes(mesh)
    if not axes:
        return list(strategies)
    if node.op == MOE_EXPERTS:
        keep = [s for s in strategies if all(s.tags[a] == EP_TAG for a in axes)]
        if not keep:
            raise ExpertParallelError(
                f"{_describe(node)} cannot run expert-parallel on mesh {_mesh_text(mesh)}: its "
                f"tokens or its experts do not split evenly over the devices of the 'ep' axis "
                f"(with the other axes' splits)"
            )
        return keep
    return [s for s in strategies if all(_data_parallel(node, s, a, batch) for a in axes)]


def _data_parallel(node: Node, s: NodeStrategy, axis: int, batch: BatchInfo) -> bool:
    for o, pl in zip(node.outputs, s.outs):
        if pl is None:
            continue
        p = pl[axis]
        if isinstance(p, Partial):
            return False
        if isinstance(p, Shard) and batch.dims.get(o) != p.dim:
            return False
    return not any(pl is not None and isinstance(pl[axis], Partial) for pl in s.ins)


__all__ = [
    "EP_AXIS",
    "ExpertParallelError",
    "check_ep_mesh",
    "ep_axes",
    "moe_experts_rule",
    "restrict_for_ep",
]
