"""Turn a configuration, a strategy assignment and a stage partition into a `Plan`.

The assignment covers the reduced graph (pre, the representative layer, post); every other
layer of the cluster copies its representative's placements (`expand_assignment`). Stages
list the traced graph's nodes: pre on the first stage, post on the last, and each traced
layer on the stage that holds its layer (a reduced-layer trace maps its layers onto the real
ones proportionally and says so in `plan.search["reduced_trace"]`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshweave.ir.graph import Node, Value
from meshweave.ir.sharding import Replicate
from meshweave.ir.types import TensorType
from .candidates import Config, PlannerState
from ..plan import CollectiveRecord, Plan, StagePlan
from .context import GraphContext, Key, assignment_segments
from .moe_plan import ep_info, ep_records
from ..strategies.reshard import reshard_steps
from ..strategies.axis import node_inputs
from .staging import PartitionEval, UnitTable, unit_names, unit_table

if TYPE_CHECKING:
    from .submesh_search import SubmeshCandidate


def expand_assignment(ctx: GraphContext, assign: dict[Key, Any]) -> dict[Key, Any]:
    """Strategy of every node and placement of every graph input of the traced graph."""
    nd = None
    out: dict[Key, Any] = {}
    for n in ctx.graph.nodes:
        key = n if n in ctx.segment else ctx.layers.rep_of.get(n)
        if key in assign:
            out[n] = assign[key]
            nd = len(assign[key].tags)
    for v in ctx.graph.inputs:
        key = v if v in assign else ctx.layers.rep_of.get(v)
        if key in assign:
            out[v] = assign[key]
            nd = len(assign[key])
    nd = nd or 1
    for v in ctx.graph.inputs:
        out.setdefault(v, tuple(Replicate() for _ in range(nd)))
    return out


def unit_of_layers(ctx: GraphContext) -> list[int]:
    """Real layer (pipeline unit) index of each traced layer."""
    c = ctx.layers.cluster
    out, unit = [], 0
    for j in range(len(ctx.layers.layers)):
        if c is not None and j in c.layers():
            t = j - c.start
            out.append(unit + (t * ctx.layers.repeats) // c.num_layers)
            if j == c.end - 1:
                unit += ctx.layers.repeats
        else:
            out.append(unit)
            unit += 1
    return out


def stage_nodes(ctx: GraphContext, cuts: list[int]) -> list[list[Node]]:
    n_st = len(cuts) - 1
    units = unit_of_layers(ctx)

    def stage_of_unit(u: int) -> int:
        return next(i for i in range(n_st) if cuts[i] <= u < cuts[i + 1])

    where: dict[Node, int] = {n: 0 for n in ctx.layers.pre}
    where.update({n: n_st - 1 for n in ctx.layers.post})
    for j, layer in enumerate(ctx.layers.layers):
        s = stage_of_unit(units[j])
        where.update({n: s for n in layer})
    out: list[list[Node]] = [[] for _ in range(n_st)]
    for n in ctx.graph.nodes:
        out[where.get(n, 0)].append(n)
    return out


def _text(pl: tuple | None) -> tuple[str, ...] | None:
    return None if pl is None else tuple(str(p) for p in pl)


def _placements(
    ctx: GraphContext, assign: dict[Key, Any], keep: Callable[[Key], bool] | None = None
) -> tuple[dict[str, tuple[str, ...]], dict[str, list]]:
    """Placement strings per value and per node input, for the keys `keep` accepts."""
    placements: dict[str, tuple[str, ...]] = {}
    input_pl: dict[str, list] = {}
    for k, s in expand_assignment(ctx, assign).items():
        if keep is not None and not keep(k):
            continue
        if isinstance(k, Node):
            for o, pl in zip(k.outputs, s.outs):
                if pl is not None:
                    placements[o.name] = _text(pl)
            if k.outputs:
                input_pl[k.outputs[0].name] = [_text(pl) for pl in s.ins]
        elif isinstance(k.type, TensorType):
            placements[k.name] = _text(s)
    return placements, input_pl


def _search_info(state: PlannerState, ev: PartitionEval, micro_batches: int) -> dict[str, Any]:
    ctx = state.ctx
    traced = len(ctx.layers.layers)
    return {
        "model": ctx.graph.name,
        "batch": state.batch,
        "traced_batch": ctx.batch.traced_batch,
        "micro_batch_size": state.batch // micro_batches,
        "spec": state.spec.name,
        "dtype": state.dtype,
        "layers": ctx.layers.num_layers,
        "traced_layers": traced,
        "reduced_trace": ctx.layers.num_layers != traced,
        "pipeline_layers": [list(s.layers) for s in ev.stages],
        "stage_times": [s.time for s in ev.stages],  # per micro-batch, for the report's timeline
    }


def _estimate(ev: PartitionEval) -> dict[str, float]:
    return {"total": ev.total, "compute": ev.compute, "comm": ev.comm, "bubble": ev.bubble}


def build_plan(
    state: PlannerState,
    cfg: Config,
    assign: dict[Key, Any],
    ev: PartitionEval,
    info: dict[str, Any],
) -> Plan:
    ctx = state.ctx
    placements, input_pl = _placements(ctx, assign)
    cuts = [s.layers[0] for s in ev.stages] + [ev.stages[-1].layers[1]]
    size = cfg.mesh.size
    stages = [
        StagePlan(
            i,
            [n.outputs[0].name for n in nodes if n.outputs],
            list(range(i * size, (i + 1) * size)),
            ev.stages[i].recompute,
            ev.stages[i].layers,
            memory_budget=ev.stages[i].saved_fraction,
        )
        for i, nodes in enumerate(stage_nodes(ctx, cuts))
    ]
    search = {**_search_info(state, ev, cfg.micro_batches), **info}
    if state.remat_curve:
        search["remat_curve"] = [list(p) for p in state.remat_curve]
    ep = ep_info(ctx, state.model(cfg.mesh, state.batch // cfg.micro_batches), assign)
    if ep is not None:
        search["ep"] = ep
    plan = Plan(
        mesh=cfg.mesh,
        num_stages=cfg.pp,
        placements=placements,
        stages=stages,
        micro_batches=cfg.micro_batches,
        schedule=ev.schedule,
        zero=state.training and state.zero and cfg.mesh.shape[0] > 1,
        training=state.training,
        collectives=collective_records(state, cfg, assign, ev),
        estimate=_estimate(ev),
        memory={f"stage{i}": int(s.memory) for i, s in enumerate(ev.stages)},
        search=search,
        input_placements=input_pl,
    )
    return plan


def collective_records(
    state: PlannerState, cfg: Config, assign: dict[Key, Any], ev: PartitionEval
) -> list[CollectiveRecord]:
    """The collectives the lowering inserts, per value, with how often they run per step."""
    model = state.model(cfg.mesh, state.batch // cfg.micro_batches)
    out = _layout_records(state, model, assign, cfg.micro_batches, _whole_model(state.ctx))
    if len(ev.stages) < 2:
        return out
    segs = assignment_segments(state.ctx, model, assign)
    units = unit_table(state.ctx, segs, state.spec, cfg.mesh.size, state.training,
                       state.remat_curve)
    return out + _stage_transfers([units] * len(ev.stages), ev, cfg.micro_batches,
                                  state.training)


def _whole_model(ctx: GraphContext) -> dict[str, int]:
    """How many times each segment of the reduced graph runs in the whole model."""
    counts = {seg: 1 for seg in ctx.segment.values()}
    counts["rep"] = ctx.layers.repeats
    return counts


def _stage_transfers(
    units: list[UnitTable], ev: PartitionEval, b: int, training: bool
) -> list[CollectiveRecord]:
    """One record per stage boundary: the per-device bytes of the last unit's output (the
    larger side's shard when the two stage meshes differ), forward and, in training, the
    gradient back, per micro-batch."""
    out = []
    for i in range(len(ev.stages) - 1):
        last = ev.stages[i].layers[1] - 1
        nbytes = max(float(units[i].boundary[last]), float(units[i + 1].boundary[last]))
        out.append(CollectiveRecord("send_recv", f"stage{i}->stage{i + 1}", "pp", int(nbytes),
                                    b * (2 if training else 1)))
    return out


def _layout_records(
    state: PlannerState, model, assign: dict[Key, Any], b: int, counts: dict[str, int]
) -> list[CollectiveRecord]:
    """Resharding and gradient-sync collectives of the segments in `counts` (segment name ->
    times it runs per micro-batch: the whole model, or one stage's share of it)."""
    ctx = state.ctx
    names = model.mesh.names
    out: list[CollectiveRecord] = []
    for src, v, n, i, kind in ctx.edges():
        per_layer = counts.get(ctx.segment.get(n), 0)
        if kind == "loop" or not per_layer:
            continue
        src_pl = assign[src].outs[src.outputs.index(v)] if isinstance(src, Node) else assign[src]
        dst_pl = assign[n].ins[i]
        if dst_pl is None or src_pl == dst_pl:
            continue
        for step in reshard_steps(src_pl, dst_pl):
            if step.kind == "slice":
                continue
            count = (
                b * per_layer
                if not (v.kind == "param" and step.kind != "all_gather")
                else per_layer
            )
            out.append(
                CollectiveRecord(
                    step.kind, v.name, names[step.axis], int(model.value_bytes(v, src_pl)), count
                )
            )
    out += ep_records(ctx, model, assign, b, counts)
    return out + _grad_sync_records(ctx, model, assign, state.training, counts)


def _grad_sync_records(
    ctx: GraphContext, model, assign: dict[Key, Any], training: bool, counts: dict[str, int]
) -> list[CollectiveRecord]:
    if not training:
        return []
    out = []
    for v, segs in ctx.input_segments().items():
        if v.kind != "param" or not any(counts.get(sg, 0) for sg in segs):
            continue
        pl = assign[v]
        reps = counts.get("rep", 0) if segs == {"rep"} else 1
        for a, p in enumerate(pl):
            if (
                isinstance(p, Replicate)
                and model.mesh.shape[a] > 1
                and _reduced_over(ctx, assign, v, a)
            ):
                kinds = (
                    ["reduce_scatter", "all_gather"] if (model.zero and a == 0) else ["all_reduce"]
                )
                for k in kinds:
                    out.append(
                        CollectiveRecord(
                            k, v.name, model.mesh.names[a], int(model.value_bytes(v, pl)), reps
                        )
                    )
    return out


def _reduced_over(ctx: GraphContext, assign: dict[Key, Any], v: Value, axis: int) -> bool:
    """Is the gradient of replicated input v partial over `axis` (a consumer splits work)?"""
    for n, _ in ctx.users.get(v, []):
        s = assign.get(n)
        if s is not None and s.split_axes()[axis]:
            return True
    return False


def _stage_counts(ctx: GraphContext, layers: tuple[int, int], n_units: int) -> dict[str, int]:
    """How many times each reduced-graph segment runs on the stage holding units [k, e)."""
    k, e = layers
    counts: dict[str, int] = {}
    for name in unit_names(ctx)[k:e]:
        counts[name] = counts.get(name, 0) + 1
    counts["pre"] = int(k == 0)
    counts["post"] = int(e == n_units)
    return counts


def build_submesh_plan(state: PlannerState, cand: SubmeshCandidate, info: dict[str, Any]) -> Plan:
    """A Plan whose stages have their own meshes (Alpa-style sub-meshes).

    Each stage's nodes take the placements of that stage's own layout; a graph input takes
    those of the stage of its first consumer. `plan.mesh` is the first stage's mesh (it
    names the axes; every stage mesh has the same axes). Collectives and memory are per
    stage; ZeRO-1 is on when some stage has a data-parallel axis larger than one."""
    ctx, ev, b = state.ctx, cand.evaluation, cand.micro_batches
    cuts = [s.layers[0] for s in ev.stages] + [ev.stages[-1].layers[1]]
    nodes_of = stage_nodes(ctx, cuts)
    stage_of: dict[Node, int] = {n: i for i, ns in enumerate(nodes_of) for n in ns}
    first_use: dict[Value, int] = {}
    for n in ctx.graph.nodes:
        for v in node_inputs(n):
            first_use.setdefault(v, stage_of.get(n, 0))
    placements: dict[str, tuple[str, ...]] = {}
    input_pl: dict[str, list] = {}
    collectives: list[CollectiveRecord] = []
    n_units = cand.layouts[0].units.num_units
    for i, lay in enumerate(cand.layouts):
        def keep(key, i=i):
            return (stage_of.get(key) if isinstance(key, Node) else first_use.get(key, 0)) == i

        pl, ipl = _placements(ctx, lay.assign, keep)
        placements.update(pl)
        input_pl.update(ipl)
        model = state.model(lay.mesh, state.batch // b)
        counts = _stage_counts(ctx, ev.stages[i].layers, n_units)
        collectives += _layout_records(state, model, lay.assign, b, counts)
    collectives += _stage_transfers([lay.units for lay in cand.layouts], ev, b, state.training)
    stages = [
        StagePlan(i, [n.outputs[0].name for n in nodes if n.outputs], list(cand.devices[i]),
                  ev.stages[i].recompute, ev.stages[i].layers, tuple(lay.mesh.shape),
                  ev.stages[i].saved_fraction)
        for i, (nodes, lay) in enumerate(zip(nodes_of, cand.layouts))
    ]
    search = {**_search_info(state, ev, b), **info}
    eps = [ep_info(ctx, state.model(lay.mesh, state.batch // b), lay.assign)
           for lay in cand.layouts]
    if any(eps):  # the first stage's, with every stage's degree beside it
        search["ep"] = {**next(e for e in eps if e),
                        "stage_degrees": [e["degree"] if e else 1 for e in eps]}
    plan = Plan(
        mesh=cand.layouts[0].mesh, num_stages=len(stages), placements=placements,
        stages=stages, micro_batches=b, schedule=ev.schedule,
        zero=state.training and any(lay.mesh.shape[0] > 1 for lay in cand.layouts),
        training=state.training, collectives=collectives, estimate=_estimate(ev),
        memory={f"stage{i}": int(s.memory) for i, s in enumerate(ev.stages)},
        search=search, input_placements=input_pl,
    )
    plan.validate()
    return plan
