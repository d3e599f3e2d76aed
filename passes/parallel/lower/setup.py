"""What every rank's lowering shares: the plan's placements, stages, blocked layouts, helpers.

`analyse(graph, plan)` computes it once (types at the micro-batch size, each value's
placements, the stage of each node, the stage transfers, and the piece-by-piece layouts a
split requests); `rank.RankLowering` then builds each rank's program from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, NameGen, Node, Value, map_values
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.ops.collectives import cut_by_spec
from meshweave.ir.registry import lookup
from meshweave.ir.sharding import Partial, Placement, Replicate, Shard, parse_placement
from meshweave.ir.types import OpaqueType, TensorType
from ..plan import Plan
from ..strategies.axis import node_inputs
from ..strategies.moe_rules import fused_gate_up_blocks
from ..strategies.shape_rules import view_groups
from ..strategies.node_strategies import (
    BatchInfo,
    concrete_types,
    effective_types,
    infer_batch_dims,
    local_shape,
    mesh_strategies,
)

Placements = tuple[Placement, ...]


class LoweringError(MeshweaveError):
    """The plan cannot be lowered for this graph (names the node or value)."""


def shard_tensor(full: torch.Tensor, spec: Sequence[tuple]) -> torch.Tensor:
    """Cut `full` into a rank's piece by a `meta["shard_specs"]` entry (module docstring),
    as its own contiguous tensor."""
    t = cut_by_spec(full, spec)
    return t.contiguous() if t.device.type != "meta" else t


# ------------------------------------------------------------------------------ analysis
@dataclasses.dataclass
class LoweringSetup:
    """What every rank's lowering shares: types for the micro-batch, placements, stages."""

    graph: Graph
    plan: Plan
    batch: BatchInfo
    types: dict[Value, Any]  # global types at the micro-batch size
    placements: dict[Value, Placements]
    in_pl: dict[Node, list[Placements | None]]
    stage_of: dict[Node, int]
    blocks: dict[Value, dict[int, tuple[int, ...]]]
    transfers: list[tuple[Value, int, int]]  # (value, from stage, to stage), in tag order

    @property
    def mesh(self) -> DeviceMesh:
        return self.plan.mesh


def analyse(graph: Graph, plan: Plan) -> LoweringSetup:
    batch_total = plan.search.get("batch")
    base = concrete_types(graph)
    info = infer_batch_dims(graph, base)
    batch_total = batch_total or info.traced_batch
    if batch_total % plan.micro_batches:
        raise LoweringError(
            f"batch {batch_total} does not split into {plan.micro_batches} micro-batches"
        )
    types = effective_types(graph, info, batch_total // plan.micro_batches, base)
    mesh = plan.mesh
    placements: dict[Value, Placements] = {}
    for v in graph.all_values():
        if isinstance(types.get(v), TensorType):
            texts = plan.placements.get(v.name)
            if texts is not None and len(texts) != mesh.ndim:
                raise LoweringError(f"%{v.name}: {len(texts)} placements for a {mesh.ndim}-d mesh")
            placements[v] = (
                tuple(parse_placement(t) for t in texts)
                if texts
                else tuple(Replicate() for _ in range(mesh.ndim))
            )
    try:
        plan.validate()
    except ValueError as e:
        raise LoweringError(f"invalid plan: {e}") from None
    stage_of = _stages(graph, plan)
    meshes = [plan.stage_mesh(s) for s in range(max(plan.num_stages, 1))]
    in_pl = {
        n: _input_placements(n, plan, placements, types, meshes[stage_of[n]]) for n in graph.nodes
    }
    su = LoweringSetup(graph, plan, info, types, placements, in_pl, stage_of, {}, [])
    su.blocks = _blocked_layouts(su)
    su.transfers = _transfers(su)
    return su


def _stages(graph: Graph, plan: Plan) -> dict[Node, int]:
    by_name = {}
    for st in plan.stages:
        for name in st.nodes:
            by_name[name] = st.index
    out = {}
    for n in graph.nodes:
        key = n.outputs[0].name if n.outputs else None
        if plan.num_stages == 1:
            out[n] = 0
        elif key not in by_name:
            raise LoweringError(
                f"node %{key} ({n.op}) is in no stage of the plan; was the plan "
                "made for this graph (a reduced-layer trace cannot be lowered)?"
            )
        else:
            out[n] = by_name[key]
    return out


def _input_placements(
    n: Node, plan: Plan, pls: dict[Value, Placements], types, mesh
) -> list[Placements | None]:
    ins = node_inputs(n)
    key = n.outputs[0].name if n.outputs else None
    given = plan.input_placements.get(key)
    if given is not None:
        if len(given) != len(ins):
            raise LoweringError(
                f"%{key}: plan gives {len(given)} input placements for {len(ins)} inputs"
            )
        return [None if g is None else tuple(parse_placement(t) for t in g) for g in given]
    want = [pls.get(o) for o in n.outputs]
    best, best_moves = None, None
    for s in mesh_strategies(n, types, mesh.shape):
        if any(w is not None and o is not None and w != o for w, o in zip(want, s.outs)):
            continue
        moves = sum(p is not None and pls.get(v) != p for v, p in zip(ins, s.ins))
        if best is None or moves < best_moves:
            best, best_moves = s, moves
    if best is None:
        raise LoweringError(
            f"no sharding strategy of %{key} ({n.op}) produces the planned "
            f"placements {[tuple(map(str, w)) for w in want if w]}"
        )
    return list(best.ins)


def _transfers(su: LoweringSetup) -> list[tuple[Value, int, int]]:
    last = su.plan.num_stages - 1
    need: dict[Value, set[int]] = {}
    for n in su.graph.nodes:
        for v in node_inputs(n):
            if v.producer is not None and su.stage_of[v.producer] != su.stage_of[n]:
                need.setdefault(v, set()).add(su.stage_of[n])
    for v in su.graph.outputs:
        if v.producer is not None and su.stage_of[v.producer] != last:
            need.setdefault(v, set()).add(last)
    order = {o: i for i, o in enumerate(su.graph.all_values())}
    out = []
    for v in sorted(need, key=order.__getitem__):
        src = su.stage_of[v.producer]
        for dst in sorted(need[v]):
            if dst < src:
                raise LoweringError(f"%{v.name} flows from stage {src} back to stage {dst}")
            out.append((v, src, dst))
    return out


def _blocked_layouts(su: LoweringSetup) -> dict[Value, dict[int, tuple[int, ...]]]:
    """Values that must be sharded piece by piece on a dim because a split hands the pieces
    out whole (each device keeps its slice of every piece)."""
    out: dict[Value, dict[int, tuple[int, ...]]] = {}
    work = []
    for n in su.graph.nodes:
        if n.op != "aten.split_with_sizes.default":
            continue
        x = n.args[0]
        d = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % su.types[x].rank
        req = su.in_pl[n][0]
        if any(isinstance(p, Shard) and p.dim == d for p in req):
            sizes = tuple(su.types[o].shape[d] for o in n.outputs)
            if len(sizes) > 1:
                work.append((x, d, sizes))
    work += fused_gate_up_blocks(su)  # moe.experts' [gate; up] weights under expert slicing
    while work:
        v, d, blocks = work.pop()
        if out.get(v, {}).get(d) == blocks:
            continue
        out.setdefault(v, {})[d] = blocks
        p = v.producer
        if p is None or not any(isinstance(q, Shard) and q.dim == d for q in su.placements[v]):
            continue  # arrives unsharded on d: the local slice cuts it piece by piece
        for u, k in block_sources(su, p, v, d):
            work.append((u, k, blocks))
    return out


def new_value(
    names: NameGen,
    hint: str,
    t: Any,
    producer: Node | None = None,
    placements: Placements | None = None,
    kind: str = "activation",
) -> Value:
    return Value(names(hint), t, producer, kind, None, placements)


def make_node(
    op: str,
    args: tuple,
    kwargs: dict,
    out_types: list[Any],
    names: NameGen,
    hint: str,
    source: str = "",
    placements: list | None = None,
    multi: bool = False,
) -> Node:
    n = Node(op, args, kwargs, (), source, {}, multi)
    pls = placements or [None] * len(out_types)
    n.outputs = tuple(
        new_value(names, hint if i == 0 else f"{hint}_{i}", t, n, pl)
        for i, (t, pl) in enumerate(zip(out_types, pls))
    )
    return n


def local_type(
    su: LoweringSetup, v: Value, pl: Placements | None, mesh_shape: Sequence[int] | None = None
) -> Any:
    """v's type on one rank of a stage mesh of `mesh_shape` (default: the plan's mesh)."""
    t = su.types.get(v, v.type)
    if not isinstance(t, TensorType):
        return t if t is not None else OpaqueType()
    shape = su.mesh.shape if mesh_shape is None else mesh_shape
    return TensorType(local_shape(t.shape, pl, shape), t.dtype, t.device)


def is_partial(pl: Placements | None) -> bool:
    return pl is not None and any(isinstance(p, Partial) for p in pl)


__all__ = [
    "LoweringError",
    "LoweringSetup",
    "analyse",
    "map_values",
    "shard_tensor",
]


# ------------------------------------------------------------------------ blocked layouts
def block_sources(su: LoweringSetup, p: Node, v: Value, d: int) -> list[tuple[Value, int]]:
    """Inputs of producer `p` (and their dims) that must share v's blocked layout on dim d."""
    req = su.in_pl[p]
    ins = node_inputs(p)

    def sharded(u: Value, k: int) -> bool:
        i = ins.index(u)
        return req[i] is not None and any(isinstance(q, Shard) and q.dim == k for q in req[i])

    out_t = su.types[v]
    op = p.op
    if op == "aten.linear.default" and d == out_t.rank - 1:
        cands = [(p.args[1], 0)] + (
            [(p.args[2], 0)] if len(p.args) > 2 and isinstance(p.args[2], Value) else []
        )
    elif op == "aten.addmm.default" and d == 1:
        bias = p.args[0]
        cands = [(p.args[2], 1)]
        if isinstance(bias, Value) and su.types[bias].rank >= 1:
            cands.append((bias, su.types[bias].rank - 1))
    elif op == "aten.mm.default" and d == 1:
        cands = [(p.args[1], 1)]
    elif op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
        x = p.args[0]
        cands = [
            (x, k)
            for gi, gj in view_groups(su.types[x].shape, out_t.shape)
            if gj == [d] and len(gi) == 1
            for k in gi
        ]
        if not cands:
            raise LoweringError(
                f"%{v.name}: a view merges the split dim {d}; cannot lay it out piece by piece"
            )
    elif op in ("aten.permute.default",):
        cands = [(p.args[0], p.args[1][d] % out_t.rank)]
    elif op == "aten.transpose.int":
        a, b = p.args[1] % out_t.rank, p.args[2] % out_t.rank
        cands = [(p.args[0], {a: b, b: a}.get(d, d))]
    elif _is_pointwise(op):
        cands = []
        for u in ins:
            t = su.types.get(u)
            if isinstance(t, TensorType):
                k = d - (out_t.rank - t.rank)
                if k >= 0 and t.shape[k] == out_t.shape[d]:
                    cands.append((u, k))
    else:
        raise LoweringError(f"%{v.name}: cannot lay out dim {d} piece by piece through {op}")
    return [(u, k) for u, k in cands if sharded(u, k)]


def _is_pointwise(op: str) -> bool:
    info = lookup(op)
    return info is not None and info.category == "pointwise"
