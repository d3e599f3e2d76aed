"""Stage sub-meshes of different sizes and shapes (the inter-op half of Alpa's search).

The uniform search (search.py) gives every pipeline stage the same (dp, tp) mesh. Here each
stage may take its own: the layers that dominate (the LM head, an embedding, a heavy pre or
post) can get more devices or another dp x tp split than the rest, and a device count can be
cut into stages that do not divide it evenly (3 stages on 8 devices: 4 + 2 + 2).

Starting from the best uniform candidates, per micro-batch count B:

- sizes: each candidate's stage size S, S/2 and 2S, kept when the cluster can place them
  without straddling nodes (S divides the node, or S is whole nodes: Alpa's sub-mesh shapes);
- columns: for every size, each logical mesh (dp, tp) of that size (tp a power of two within
  a node, the micro-batch divisible by dp) with the Megatron layout of that mesh, any ILP
  layout the uniform round found for it, and a fresh ILP solve while the time budget lasts;
  in training recomputation off and on. Per size, only the fastest and the leanest layouts
  stay (the DP's cost grows with the column count);
- pipeline.partition_stages picks the stages, their columns, B and the schedule, pricing
  each stage's transfers over its own links; staging.evaluate_stages then re-prices the
  result exactly (cross-mesh transfers between stages of different layouts, gradient sync,
  recomputation only where a stage does not fit without it).

The result is kept only when strictly faster than the uniform best, so the search never
returns a slower plan than before.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from meshweave.ir.mesh import DeviceMesh
from .candidates import PlannerState, respects_pins
from .megatron_grid import state_megatron
from .pipeline import partition_stages
from ..cost.pipeline_costs import StageCostTable, assign_devices
from .context import Key, assignment_segments
from .staging import PartitionEval, UnitTable, evaluate_stages, stage_table, unit_table

TMAX_REL_GAP = 1e-3  # DP stage-time candidates closer than this are merged (pipeline.search)

LayoutSolver = Callable[[DeviceMesh, int], dict[Key, Any] | None]


@dataclasses.dataclass
class StageLayout:
    """One DP column: a logical stage mesh, its strategy assignment and their unit costs."""

    mesh: DeviceMesh  # logical ("dp", "tp") mesh; device ids are local
    assign: dict[Key, Any]
    units: UnitTable
    source: str  # "megatron" or the ILP round that produced the assignment


@dataclasses.dataclass
class SubmeshCandidate:
    """A plan whose stages have their own meshes (`devices[i]` holds stage i's global ranks
    in row-major order of `layouts[i].mesh`)."""

    micro_batches: int
    layouts: list[StageLayout]
    devices: list[tuple[int, ...]]
    evaluation: PartitionEval
    source: str

    @property
    def step_time(self) -> float:
        return self.evaluation.total


def cluster_of(n_dev: int, per_node: int) -> tuple[int, int] | None:
    """(nodes, devices per node) the sub-meshes are placed on; None when the devices do not
    form whole nodes (then no placement can promise node-local stages)."""
    if n_dev <= per_node:
        return (1, n_dev)
    return (n_dev // per_node, per_node) if n_dev % per_node == 0 else None


def placeable_sizes(candidates: Sequence[int], cluster: tuple[int, int]) -> list[int]:
    """Stage sizes Alpa can place: a power of two dividing the node, or whole nodes."""
    nodes, per_node = cluster
    out = set()
    for s in candidates:
        if s < 1 or s > nodes * per_node:
            continue
        in_node = s < per_node and per_node % s == 0 and s & (s - 1) == 0
        if in_node or (s % per_node == 0):
            out.add(s)
    return sorted(out)


def submesh_shape(size: int, cluster: tuple[int, int]) -> tuple[int, int]:
    """The (nodes, devices) sub-mesh of a placeable stage size."""
    per_node = cluster[1]
    return (1, size) if size < per_node else (size // per_node, per_node)


def logical_meshes(size: int, per_node: int, micro_batch: int) -> list[DeviceMesh]:
    """(dp, tp) meshes of `size` devices: tp a power of two inside one node, dp | micro-batch."""
    out, tp = [], 1
    while tp <= min(size, per_node):
        dp = size // tp
        if size % tp == 0 and micro_batch % dp == 0:
            out.append(DeviceMesh((dp, tp), ("dp", "tp")))
        tp *= 2
    return out


def stage_layouts(
    state: PlannerState,
    mesh: DeviceMesh,
    micro_batch: int,
    known: Sequence[tuple[dict[Key, Any], str]],
    solve: LayoutSolver | None,
) -> list[StageLayout]:
    """Layouts of one logical mesh: Megatron (when it honours the pins), the ILP layouts
    already found for this mesh and micro-batch, else a fresh ILP solve."""
    found = list(known)
    seed = state_megatron(state, mesh, micro_batch)
    if not state.pins or respects_pins(state, seed):
        found.append((seed, "megatron"))
    if solve is not None and not any(src != "megatron" for _, src in found):
        assign = solve(mesh, micro_batch)
        if assign is not None:
            found.append((assign, "ilp"))
    model = state.model(mesh, micro_batch)
    out = []
    for assign, src in found:
        segs = assignment_segments(state.ctx, model, assign)
        units = unit_table(state.ctx, segs, state.spec, mesh.size, state.training,
                           state.remat_curve)
        out.append(StageLayout(mesh, assign, units, src))
    return out


def _columns(
    layouts: list[StageLayout], b: int, budget: float, training: bool
) -> list[tuple[StageLayout, StageCostTable]]:
    """(layout, one-column table) candidates of one stage size, pruned: the fastest layout
    and the leanest one without recomputation, and in training the fastest with it (the
    DP's cost grows linearly with the column count; these are the columns that win on
    time, or fit where nothing else does)."""

    def whole(c):  # the whole model as one stage: a fair ranking of the layouts
        return float(c[1].time[0, -1, 0]), float(c[1].weight_memory[0, -1, 0]
                                                 + c[1].activation_memory[0, -1, 0])

    plain = [(lay, stage_table(lay.units, b, 1, budget, False)) for lay in layouts]
    out = [min(plain, key=lambda c: whole(c)[0])]
    lean = min(plain, key=lambda c: whole(c)[1])
    out += [lean] if lean is not out[0] else []
    if training:
        rc = [(lay, stage_table(lay.units, b, 1, budget, True)) for lay in layouts]
        out.append(min(rc, key=lambda c: whole(c)[0]))
    return out


def _stack(cols: list[tuple[StageLayout, StageCostTable]]) -> StageCostTable:
    tabs = [t for _, t in cols]
    return StageCostTable(
        tuple((1, c.mesh.size) for c, _ in cols),
        np.concatenate([t.time for t in tabs], axis=2),
        np.concatenate([t.weight_memory for t in tabs], axis=2),
        np.concatenate([t.activation_memory for t in tabs], axis=2),
    )


def submesh_round(
    state: PlannerState,
    n_dev: int,
    seeds: Sequence[tuple[int, DeviceMesh, int]],
    known: Sequence[tuple[DeviceMesh, int, dict[Key, Any], str]],
    best_time: float,
    deadline: float,
    solve: LayoutSolver | None = None,
    max_batches: int = 2,
) -> SubmeshCandidate | None:
    """Best plan with per-stage sub-meshes that beats `best_time`, else None.

    `seeds`: (pp, stage mesh, micro-batch count) of the best uniform candidates, best first;
    their stage sizes and micro-batch counts span the search. `known`: (mesh, micro-batch
    size, assignment, source) layouts found so far (ILP), reused instead of re-solved.
    """
    cluster = cluster_of(n_dev, state.spec.devices_per_node)
    if cluster is None:
        return None
    batches: list[int] = []
    for _, _, b in seeds:
        if b not in batches and len(batches) < max_batches:
            batches.append(b)
    best = None
    for b in batches:
        if time.perf_counter() > deadline or state.batch % b:
            continue
        sizes = placeable_sizes(
            [s for _, m, bb in seeds if bb == b for s in (m.size // 2, m.size, 2 * m.size)],
            cluster)
        bound = min(best_time, best.step_time if best else math.inf)
        cand = _search_batch(state, n_dev, cluster, sizes, b, known, deadline, solve, bound)
        if cand is not None and cand.step_time < bound:
            best = cand
    return best


def _search_batch(
    state: PlannerState, n_dev: int, cluster: tuple[int, int], sizes: list[int], b: int,
    known, deadline: float, solve: LayoutSolver | None, best_time: float,
) -> SubmeshCandidate | None:
    """One micro-batch count: build the columns, run the DP, place and re-price. The DP
    prices each stage's transfers over its own links only, which never exceeds the exact
    cross-mesh price, so `best_time` is a sound bound for pruning it."""
    mbs = state.batch // b
    cols = []
    for size in sizes:
        layouts = []
        for mesh in logical_meshes(size, cluster[1], mbs):
            reuse = [(a, src) for m, mb, a, src in known if m.shape == mesh.shape and mb == mbs]
            ok = solve if time.perf_counter() < deadline else None
            layouts += stage_layouts(state, mesh, mbs, reuse, ok)
        if layouts:  # none: no mesh of this size honours the pins, or none divides the batch
            cols += _columns(layouts, b, state.budget(), state.training)
    if not cols:
        return None
    unit = math.gcd(*(c.mesh.size for c, _ in cols))
    if n_dev % unit:
        return None
    sched = ("1f1b",) if state.training else ("gpipe",)
    part = partition_stages({b: _stack(cols)}, [c.mesh.size // unit for c, _ in cols],
                            n_dev // unit, state.budget(), schedules=sched,
                            best_latency=best_time, tmax_rel_gap=TMAX_REL_GAP,
                            deadline=deadline)
    if part is None:
        return None
    chosen = [cols[m][0] for _, _, m in part.stages]
    cuts = [k for k, _, _ in part.stages] + [part.stages[-1][1]]
    ev = evaluate_stages([c.units for c in chosen], cuts, b, sched[0], state.budget(), "auto")
    if not ev.fits:
        return None
    shapes = [submesh_shape(c.mesh.size, cluster) for c in chosen]
    try:
        placed = assign_devices(shapes, DeviceMesh(cluster, ("node", "device")))
    except ValueError:  # not expected for placeable sizes; a plan we cannot lay out is none
        return None
    source = "+".join(sorted({c.source for c in chosen})) + "+submesh-dp"
    return SubmeshCandidate(b, chosen, [tuple(p.devices) for p in placed], ev, source)
