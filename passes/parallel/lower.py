"""Lower a planned graph to the program of one rank: `lower_for_rank(graph, plan, rank)`.

The result is an ordinary IR Graph, valid for ONE micro-batch of batch / plan.micro_batches
samples (the runtime runs it once per micro-batch; `meta["micro_batch_dim"]` names the dim of
each user input the runtime splits), containing:

  * only the nodes of the rank's pipeline stage;
  * its graph inputs with LOCAL types: user inputs and parameters sliced as planned.
    `meta["shard_specs"][name]` says how to cut the full tensor (the micro-batch for user
    inputs, `graph.tensors[name]` for parameters/buffers/constants) into this rank's piece:
    a list of `(dim, index, count)` (take chunk index of count along dim; applied in order,
    mesh axis 0 first), `(dim, index, count, blocks)` (that chunk of each block of the given
    sizes: fused QKV weights) or `("rebatch", dim, size)` (a constant that repeats along the
    batch: keep `size` rows). `shard_tensor(full, spec)` applies it; the lowered graph's
    `tensors` already hold the shards of the input graph's tensors;
  * local shapes everywhere: view/reshape/expand/fill sizes and split sizes are rewritten to
    the local shapes (heads / tp, batch / dp / micro-batches, ...);
  * the collectives the plan's placements imply, as `dist.*` nodes (ir/ops/collectives.py)
    with kwargs axis (mesh axis name) and group (global ranks of this rank's group);
  * stage transfers: values another stage needs are `dist.send(dst=, tag=)` at the end,
    values this stage reads from an earlier one are `dist.recv(src=, tag=, shape=, dtype=)`
    at the start (tags number the transfers the same way on every rank). Between stage meshes
    of the same shape a rank exchanges its piece with the rank at the same mesh coordinates;
    between meshes of different shapes (Plan.stage_mesh) each side sends or receives the
    pieces of cross_mesh.transfer_schedule (aten.slice before the sends, aten.cat after the
    receives). Graph outputs live on the last stage, gathered to full (replicated)
    tensors; other stages return nothing.

Per-op rewrites that are more than shape changes (row-parallel bias on one rank only,
vocab-parallel embedding masking, mean over a sharded dim) live in lower_rules.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ...ir.errors import MeshweaveError
from ...ir.graph import Graph, NameGen, Node, Value, map_values
from ...ir.mesh import DeviceMesh
from ...ir.ops.collectives import cut_by_spec
from ...ir.sharding import Partial, Placement, Replicate, Shard, parse_placement
from ...ir.types import OpaqueType, TensorType
from ...ir.verify import verify
from .plan import Plan
from .sharding_rules import node_inputs
from .strategies import (
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
    from .lower_rules import block_sources

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


# ------------------------------------------------------------------------------ one rank
def lower_for_rank(
    graph: Graph, plan: Plan, rank: int, *, setup: LoweringSetup | None = None
) -> Graph:
    """The program rank `rank` runs per micro-batch (see the module docstring)."""
    su = setup or analyse(graph, plan)
    from .lower_rank import RankLowering

    out = RankLowering(su, rank).run()
    verify(out, after_pass=f"lower_for_rank({rank})")
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
    "lower_for_rank",
    "map_values",
    "shard_tensor",
]
