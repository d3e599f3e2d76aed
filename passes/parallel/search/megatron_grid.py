"""The Megatron-style baseline: fixed dp x tp x pp layouts, and the exhaustive grid over them.

`megatron_assignment` picks, node by node in graph order, the strategy a Megatron-LM layout
would use: every value batch-sharded over the data-parallel axes (all but the last mesh
axis) with replicated weights; on the tensor-parallel (last) axis the strategy that needs no
resharding of its inputs, preferring column- then row-parallel matmuls, head-sharded
attention and vocab-parallel embeddings (so MLP and attention blocks come out as
column -> row with one all-reduce each, the embedding and LM head vocab-parallel), never the
batch. `megatron_grid` evaluates that layout for every pp x dp x tp x micro-batch count with
uniform layer splits, recomputation off or on, under the same cost model (problem.py,
staging.py) as the search, and returns the best configuration that fits in memory.

`megatron_plan(graph, dp, tp, pp, micro_batches)` builds a runnable Plan for such a layout
(used by the lowering and runtime tests to get DP, TP and PP plans without a search).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Partial, Replicate, Shard
from .candidates import Config, PlannerState, data_degree, microbatch_options, stage_meshes
from ..cost.cost_model import MeshModel
from ..cost.hardware import HardwareSpec, get_spec
from ..plan import Plan
from .context import GraphContext, Key, assignment_segments
from .plan_build import build_plan
from ..strategies.axis import node_inputs
from .staging import PartitionEval, evaluate_partition, uniform_cuts, unit_table
from ..strategies.node_strategies import PlanningError

_TP_PRIORITY = {
    "col": 0,
    "row": 0,
    "vocab": 0,
    "heads": 0,
    "R": 1,
    "follow": 2,
    "partial": 2,
    "hidden": 3,
}
_TP_FORBIDDEN = {"batch", "seq"}  # Megatron's tensor-parallel axis never splits samples


def megatron_assignment(ctx: GraphContext, model: MeshModel) -> dict[Key, Any]:
    """Strategy per reduced node and placement per graph input of the Megatron layout.

    The greedy pass sees a representative layer's inputs as the first layer gets them (from
    `pre`); every later layer gets them from the previous layer's output (the loop edges). When
    the pass leaves a loop edge needing a partial sum the layer's output is not (nothing turns
    a value into a partial sum), it is rerun knowing that placement too.
    """
    loop_have: dict[tuple[Node, int], tuple] = {}
    for _ in range(4):
        assign, cur = _greedy_assignment(ctx, model, loop_have)
        changed = False
        for v, n, i in ctx.layers.loop_edges:
            have, need = cur.get(v), assign[n].ins[i] if n in assign else None
            if have is None or need is None or loop_have.get((n, i)) == have:
                continue
            if _needs_partial(need, have):
                loop_have[(n, i)] = have
                changed = True
        if not changed:
            break
    return assign


def _needs_partial(need: tuple, have: tuple) -> bool:
    return any(isinstance(q, Partial) and not isinstance(h, Partial) for q, h in zip(need, have))


def _greedy_assignment(
    ctx: GraphContext, model: MeshModel, loop_have: dict[tuple[Node, int], tuple]
) -> tuple[dict[Key, Any], dict[Value, tuple]]:
    nd = model.mesh.ndim
    tp_axes = [nd - 1] if nd > 1 and model.mesh.names[-1] != "ep" else []  # ep: a data axis
    dp_axes = [a for a in range(nd) if a not in tp_axes]
    cur: dict[Value, tuple] = {}
    assign: dict[Key, Any] = {}
    for n in ctx.nodes:
        strats = model.strategies(n)
        best = min(
            range(len(strats)),
            key=lambda j: _score(ctx, n, strats[j], cur, dp_axes, tp_axes, loop_have),
        )
        s = strats[best]
        assign[n] = s
        for o, pl in zip(n.outputs, s.outs):
            if pl is not None:
                cur[o] = pl
        for v, pl in zip(node_inputs(n), s.ins):
            if v.producer is None and pl is not None and v not in cur:
                cur[v] = tuple(Replicate() if isinstance(p, Partial) else p for p in pl)
    for v in ctx.input_segments():
        assign[v] = cur.get(v, tuple(Replicate() for _ in range(nd)))
    return assign, cur


def _score(
    ctx: GraphContext,
    n: Node,
    s,
    cur: dict[Value, tuple],
    dp_axes: list[int],
    tp_axes: list[int],
    loop_have: dict[tuple[Node, int], tuple],
) -> tuple:
    bad = 0
    for o, pl in zip(n.outputs, s.outs):
        if pl is None:
            continue
        d = ctx.batch.dims.get(o)
        for a in dp_axes:
            if d is not None:
                bad += 2 * (pl[a] != Shard(d))
            else:
                bad += not isinstance(pl[a], Replicate)
        for a in tp_axes:
            bad += d is not None and pl[a] == Shard(d)
    bad += sum(s.tags[a] in _TP_FORBIDDEN for a in tp_axes)
    transitions = 0
    for i, (v, pl) in enumerate(zip(node_inputs(n), s.ins)):
        if pl is None:
            continue
        if v.producer is None and v.kind == "param":
            bad += sum(not isinstance(pl[a], Replicate) for a in dp_axes)
        for have in (cur.get(ctx.rep_value(v)), loop_have.get((n, i))):
            if have is not None and have != pl:
                transitions += 1
                if _needs_partial(pl, have):
                    bad += 100  # nothing turns a value into a partial sum
    prio = sum(_TP_PRIORITY.get(s.tags[a], 5) for a in tp_axes)
    return (bad, transitions, prio)


@dataclasses.dataclass
class GridEntry:
    config: Config
    recompute: bool
    evaluation: PartitionEval

    @property
    def step_time(self) -> float:
        return self.evaluation.total


@dataclasses.dataclass
class GridResult:
    best: GridEntry | None
    entries: list[GridEntry]
    seconds: float


def evaluate_megatron(
    state: PlannerState, cfg: Config, recompute: bool | str
) -> PartitionEval | None:
    """Step estimate of the Megatron layout for one configuration (uniform layer split)."""
    cuts = uniform_cuts(state.n_units, cfg.pp)
    if cuts is None:
        return None
    mbs = state.batch // cfg.micro_batches
    model = state.model(cfg.mesh, mbs)
    assign = state_megatron(state, cfg.mesh, mbs)
    segs = assignment_segments(state.ctx, model, assign)
    units = unit_table(state.ctx, segs, state.spec, cfg.mesh.size, state.training,
                       state.remat_curve)
    sched = "1f1b" if state.training else "gpipe"
    return evaluate_partition(units, cuts, cfg.micro_batches, sched, state.budget(), recompute)


def state_megatron(state: PlannerState, mesh: DeviceMesh, mbs: int) -> dict[Key, Any]:
    cache = state.__dict__.setdefault("_megatron", {})
    key = (mesh.shape, mesh.axis_names, state.model(mesh, mbs).canon)
    if key not in cache:
        cache[key] = megatron_assignment(state.ctx, state.model(mesh, mbs))
    return cache[key]


def megatron_grid(
    state: PlannerState, mesh_or_count: DeviceMesh | int, max_stages: int | None = None
) -> GridResult:
    """Every pp x stage mesh x micro-batch count x recompute, Megatron layout, uniform split."""
    t0 = time.perf_counter()
    # pins name one placement per (dp, tp) axis of a device count's meshes: no ep meshes then
    experts = None if state.pins else state.experts
    meshes = stage_meshes(mesh_or_count, state.spec, state.n_units, max_stages, experts)
    configs = [Config(pp, mesh, b) for pp, mesh in meshes
               for b in microbatch_options(state.batch, pp, data_degree(mesh), state.training,
                                           rebatchable=not state.ctx.batch.lost_at)]
    return evaluate_grid(state, configs, t0)


def evaluate_grid(state: PlannerState, configs: list[Config], t0: float) -> GridResult:
    """Each configuration with the Megatron layout, recompute off (and on, when training);
    `best` the fastest entry that fits. `t0`: when the grid started (its seconds)."""
    entries = []
    for cfg in configs:
        for rc in [False, True] if state.training else [False]:
            ev = evaluate_megatron(state, cfg, rc)
            if ev is not None:
                entries.append(GridEntry(cfg, rc, ev))
    feasible = [e for e in entries if e.evaluation.fits]
    best = min(feasible, key=lambda e: e.step_time, default=None)
    return GridResult(best, entries, time.perf_counter() - t0)


def megatron_plan(
    graph: Graph,
    dp: int,
    tp: int,
    pp: int,
    micro_batches: int = 1,
    *,
    batch: int | None = None,
    training: bool = False,
    spec: HardwareSpec | str = "h100",
    zero: bool = True,
    ep: int | None = None,
    memory_budget: float | None = None,
    remat_curve: tuple | None = None,
) -> Plan:
    """A Plan with the Megatron layout on a (dp, tp) stage mesh and pp uniform stages.

    `batch` defaults to the batch the graph was traced at; each micro-batch has
    batch / micro_batches samples, split over dp. `zero`: ZeRO-1 over dp when training.
    `ep`: a (dp, ep, tp) stage mesh instead, its "ep" axis expert-parallel for moe.experts and
    data-parallel for every other op (strategies/moe_rules.py). `memory_budget` (bytes per
    device) and `remat_curve` as plan_parallel's: a stage over the budget recomputes.
    """
    spec = get_spec(spec)
    ctx_batch = batch
    # a graph traced with fewer repeated layers (trace_for_planning) is planned at its real
    # depth, as plan_parallel does
    state = PlannerState(graph, spec, batch=1, training=training, zero=zero,
                         repeats=graph.meta.get("repeated_layers"),
                         memory_budget=memory_budget, remat_curve=remat_curve)
    state.batch = ctx_batch or state.ctx.batch.traced_batch
    if state.batch % micro_batches:
        raise PlanningError(
            f"batch {state.batch} does not split into {micro_batches} micro-batches"
        )
    if pp > state.n_units:
        raise PlanningError(f"pp={pp} stages for a graph with {state.n_units} layers")
    if ep is None:
        mesh = DeviceMesh((dp, tp), ("dp", "tp"))
    else:
        mesh = DeviceMesh((dp, ep, tp), ("dp", "ep", "tp"))
    cfg = Config(pp, mesh, micro_batches)
    ev = evaluate_megatron(state, cfg, "auto")
    assign = state_megatron(state, mesh, state.batch // micro_batches)
    return build_plan(state, cfg, assign, ev, {"solver": "megatron"})
