"""Whole-mesh node strategies, batch-dimension tracking and effective (re-batched) shapes.

A `NodeStrategy` is one per-axis `AxisStrategy` (sharding_rules.py) per mesh axis, combined:
input i needs `ins[i]` (a placement per mesh axis) and output j is produced as `outs[j]`.
Combinations are kept when every sharded tensor dim is divisible by the product of the mesh
axes sharding it; a size-1 mesh axis only runs replicated.

The graph is traced at one batch size, but plans are made for others (the global batch split
into micro-batches). `infer_batch_dims` finds, for every value, the dim that carries the batch
(propagated from the user inputs' dim 0 with the same sharding rules, so views that merge
batch and sequence are tracked too; constants broadcast against the batch get one as well).
`effective_types` rescales those dims to a micro-batch size, so costs, divisibility and the
lowering's local shapes all follow the planned batch, not the traced one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.sharding import Partial, Placement, Replicate, Shard
from meshweave.ir.types import TensorType
from .axis import AxisStrategy, OpView, axis_strategies, node_inputs, replicated

Placements = tuple[Placement, ...]
R = Replicate()


class PlanningError(MeshweaveError):
    """The planner cannot handle this graph or request (names the node or input)."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeStrategy:
    """Placements of a node's inputs (as consumed) and outputs over every mesh axis."""

    ins: tuple[Placements | None, ...]
    outs: tuple[Placements | None, ...]
    tags: tuple[str, ...]

    def split_axes(self) -> tuple[bool, ...]:
        """Per axis: is the node's work divided over it (first tensor output not R)?"""
        first = next((o for o in self.outs if o is not None), None)
        if first is None:
            return tuple(False for _ in self.tags)
        return tuple(not isinstance(p, Replicate) for p in first)

    @property
    def name(self) -> str:
        outs = [o for o in self.outs if o is not None]
        pl = ",".join(str(p) for p in outs[0]) if outs else ""
        return f"{'/'.join(self.tags)}[{pl}]"


def placements_valid(pl: Placements, shape: Sequence[int], mesh_shape: Sequence[int]) -> bool:
    """Every sharded dim exists and is divisible by the product of the axes sharding it."""
    factors: dict[int, int] = {}
    for p, n in zip(pl, mesh_shape):
        if isinstance(p, Shard):
            if p.dim >= len(shape):
                return False
            factors[p.dim] = factors.get(p.dim, 1) * n
    return all(shape[d] % f == 0 for d, f in factors.items())


def local_shape(
    shape: Sequence[int], pl: Placements | None, mesh_shape: Sequence[int]
) -> tuple[int, ...]:
    out = list(shape)
    if pl is not None:
        for p, n in zip(pl, mesh_shape):
            if isinstance(p, Shard):
                out[p.dim] //= n
    return tuple(out)


def shard_factor(pl: Placements | None, mesh_shape: Sequence[int]) -> int:
    if pl is None:
        return 1
    return math.prod(n for p, n in zip(pl, mesh_shape) if isinstance(p, Shard))


def mesh_strategies(
    node: Node,
    types: dict[Value, Any],
    mesh_shape: Sequence[int],
    per_axis: list[AxisStrategy] | None = None,
    batch: BatchInfo | None = None,
) -> list[NodeStrategy]:
    """All valid whole-mesh strategies of `node` (replicated first).

    With `batch`, the outer mesh axes (all but the last) only split the batch: they span
    nodes, where sharding anything else costs inter-node traffic on every layer, and it keeps
    the ILP small (the last, intra-node axis still explores every strategy).
    """
    per_axis = per_axis if per_axis is not None else axis_strategies(node, types)
    rep = replicated(OpView(node, types))
    outer = per_axis if batch is None else [s for s in per_axis if _batch_only(node, s, batch)]
    last = len(mesh_shape) - 1
    choices = [
        (per_axis if a == last else outer) if n > 1 else [rep] for a, n in enumerate(mesh_shape)
    ]
    in_types = [_tt(types, v) for v in node_inputs(node)]
    out_types = [_tt(types, o) for o in node.outputs]
    out: list[NodeStrategy] = []
    seen = set()
    for combo in itertools.product(*choices):
        ins = _combine([s.ins for s in combo])
        outs = _combine([s.outs for s in combo])
        key = (ins, outs)
        if key in seen:
            continue
        if not _all_valid(ins, in_types, mesh_shape) or not _all_valid(outs, out_types, mesh_shape):
            continue
        seen.add(key)
        out.append(NodeStrategy(ins, outs, tuple(s.tag for s in combo)))
    out.sort(key=lambda s: s.tags != tuple("R" for _ in s.tags))
    return out


def _batch_only(node: Node, s: AxisStrategy, batch: BatchInfo) -> bool:
    """Does the per-axis strategy only split batch dims (or replicate)?"""
    for o, p in zip(node.outputs, s.outs):
        if p is None or isinstance(p, Replicate) or (isinstance(p, Partial) and _is_counter({}, o)):
            continue
        if not (isinstance(p, Shard) and batch.dims.get(o) == p.dim):
            return False
    return not any(isinstance(p, Partial) for p in s.ins if p is not None)


def _tt(types: dict[Value, Any], v: Value) -> TensorType | None:
    t = types.get(v, v.type)
    return t if isinstance(t, TensorType) else None


def _combine(per_axis: list[tuple]) -> tuple:
    n = len(per_axis[0])
    return tuple(
        None if per_axis[0][i] is None else tuple(a[i] for a in per_axis) for i in range(n)
    )


def _all_valid(pls: tuple, types: list[TensorType | None], mesh_shape: Sequence[int]) -> bool:
    for pl, t in zip(pls, types):
        if pl is not None and t is not None and not placements_valid(pl, t.shape, mesh_shape):
            return False
    return True


# ------------------------------------------------------------------------- batch tracking
@dataclasses.dataclass
class BatchInfo:
    """Batch dim of each value (None: no batch dim) and the batch size it was traced at."""

    dims: dict[Value, int | None]
    traced_batch: int
    lost_at: list[str]  # nodes past which the batch dim could not be followed

    def dim(self, v: Value) -> int | None:
        return self.dims.get(v)


def concrete_types(graph: Graph) -> dict[Value, Any]:
    """Every value's type with symbolic dims replaced by their hints."""
    hints = graph.hints()
    out: dict[Value, Any] = {}
    for v in graph.all_values():
        t = v.type
        if isinstance(t, TensorType) and not t.is_static:
            t = TensorType(t.concrete_shape(hints), t.dtype, t.device)
        out[v] = t
    return out


def infer_batch_dims(graph: Graph, types: dict[Value, Any] | None = None) -> BatchInfo:
    """Follow dim 0 of the user inputs through the graph with the sharding rules."""
    types = types or concrete_types(graph)
    dims: dict[Value, int | None] = {}
    traced = None
    for v in graph.inputs:
        t = types.get(v)
        is_batched = v.kind == "user" and isinstance(t, TensorType) and t.rank > 0
        dims[v] = 0 if is_batched else None
        if is_batched:
            traced = t.shape[0] if traced is None else traced
    free = {v for v in graph.inputs if v.kind == "constant"}
    lost: list[str] = []
    for n in graph.nodes:
        _propagate_batch(n, types, dims, free, lost)
    return BatchInfo(dims, traced or 1, lost)


def _want(dims: dict[Value, int | None], v: Value) -> Placement:
    d = dims.get(v)
    return R if d is None else Shard(d)


def _propagate_batch(
    n: Node,
    types: dict[Value, Any],
    dims: dict[Value, int | None],
    free: set[Value],
    lost: list[str],
) -> None:
    """Pick the strategy that keeps the batch dims flowing in; fix free values it shards.

    `free` values (constants, and activations computed from no batched value) may take a
    batch dim when a consumer broadcasts them against the batch (a folded attention mask, or
    a position embedding expanded to [batch, seq, hidden]).
    """
    cands = axis_strategies(n, types)
    tensor_ins = [v for v in node_inputs(n) if _tt(types, v) is not None]
    batched_in = any(dims.get(v) is not None for v in tensor_ins)
    best, best_score = None, None
    for s in cands:
        ok, free_sharded = True, 0
        for v, p in zip(node_inputs(n), s.ins):
            if p is None:
                continue
            if v in free and isinstance(p, Shard) and _claim(v, p, types, dims, free, False):
                free_sharded += 1
            elif p != _want(dims, v):
                ok = False
        if not ok or any(
            isinstance(p, Partial) and not _is_counter(types, o)
            for o, p in zip(n.outputs, s.outs)
            if p is not None
        ):
            continue
        sharded_out = sum(isinstance(p, Shard) for p in s.outs if p is not None)
        if not batched_in and sharded_out:
            continue  # nothing batched flows in: nothing batched flows out
        score = (sharded_out, -free_sharded)
        if best_score is None or score > best_score:
            best, best_score = s, score
    if best is None:
        if batched_in:
            lost.append(n.outputs[0].name if n.outputs else n.op)
        for o in n.outputs:
            dims[o] = None
        return
    for v, p in zip(node_inputs(n), best.ins):
        if v in free and isinstance(p, Shard):
            _claim(v, p, types, dims, free, True)
    for o, p in zip(n.outputs, best.outs):
        dims[o] = p.dim if isinstance(p, Shard) else None
        if not batched_in and o.type is not None:
            free.add(o)


def _is_counter(types: dict[Value, Any], v: Value) -> bool:
    """A 0-d integer output (moe.experts' dropped count): a partial count of it says nothing
    about where the batch went, so it does not stop batch tracking."""
    t = _tt(types, v)
    return t is not None and t.rank == 0 and not t.dtype.is_floating_point


def _claim(
    v: Value,
    p: Shard,
    types: dict[Value, Any],
    dims: dict[Value, int | None],
    free: set[Value],
    apply: bool,
) -> bool:
    """Can free value v carry the batch as p (its producer emitting it so from replicated or
    free inputs, recursively)? With `apply`, record those batch dims."""
    n = v.producer
    if n is None:
        if apply:
            dims[v] = p.dim
            free.discard(v)
        return v.kind == "constant"
    k = n.outputs.index(v)
    for s in axis_strategies(n, types):
        if s.outs[k] != p:
            continue
        if all(
            q is None
            or isinstance(q, Replicate)
            or (u in free and isinstance(q, Shard) and _claim(u, q, types, dims, free, False))
            for u, q in zip(node_inputs(n), s.ins)
        ):
            if apply:
                for u, q in zip(node_inputs(n), s.ins):
                    if isinstance(q, Shard):
                        _claim(u, q, types, dims, free, True)
                for o, q in zip(n.outputs, s.outs):
                    dims[o] = q.dim if isinstance(q, Shard) else None
                    free.discard(o)
            return True
    return False


def effective_types(
    graph: Graph, batch: BatchInfo, micro_batch: int, types: dict[Value, Any] | None = None
) -> dict[Value, Any]:
    """Types with every batch dim rescaled from the traced batch to `micro_batch`."""
    types = types or concrete_types(graph)
    if micro_batch == batch.traced_batch:
        return dict(types)
    if batch.lost_at:
        raise PlanningError(
            f"cannot re-batch graph {graph.name}: the batch dim is lost at node "
            f"%{batch.lost_at[0]}; plan at the traced batch size {batch.traced_batch}"
        )
    out = {}
    for v, t in types.items():
        d = batch.dims.get(v)
        if d is not None and isinstance(t, TensorType):
            size = t.shape[d] * micro_batch
            if size % batch.traced_batch:
                raise PlanningError(
                    f"%{v.name}: batch dim {t.shape[d]} cannot be rescaled from "
                    f"batch {batch.traced_batch} to {micro_batch}"
                )
            shape = list(t.shape)
            shape[d] = size // batch.traced_batch
            t = TensorType(tuple(shape), t.dtype, t.device)
        out[v] = t
    return out
