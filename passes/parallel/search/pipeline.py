"""Inter-operator (pipeline) planning: split layers into stages and give each a sub-mesh.

Following Alpa's inter-op pass, a cluster of N nodes x M devices is cut into sub-meshes of
shape (1, m) for powers of two m dividing M, or (n, M) full nodes; such shapes always tile
the cluster when their sizes add up to N * M. For per-micro-batch stage times t_i, both GPipe
and 1F1B finish B micro-batches in

    T = sum_i t_i + (B - 1) * max_i t_i.

They differ in memory: GPipe keeps the activations of all B micro-batches, 1F1B only
min(B, S - i) on stage i of S. The dynamic program fixes t_max, the largest allowed stage
time, and computes

    F(s, k, d) = min_{k < e, m} [ t(k, e, m) + F(s - 1, e, d - |m|) ]

(layers k.. on d devices in s stages; a stage is allowed when t <= t_max and its memory with
min(B, s) or B in-flight micro-batches fits the budget), giving T(t_max) = F(., 0, N*M) +
(B - 1) t_max. Minimising over all distinct stage times t_max is exact; pipeline_dp.py
bisects the sorted candidates (F is a non-increasing step function of t_max) and prunes
ranges that cannot beat the best latency, so only the steps of F cost a DP. The search runs
for each micro-batch count and schedule, sharing the best latency as a bound. Costs come
from `pipeline_costs.StageCostTable` (built from a callable). The cost is O(L^2 * K * M * D)
per DP (L layers, K = min(B, stages) states, M sub-mesh shapes, D devices); cluster layers
first (clustering.py) to keep L in the tens, as Alpa does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from meshweave.ir.mesh import DeviceMesh
from ..intra_op.problem import NoFeasiblePlanError
from ..cost.optimizer_shard import SCHEDULES, inflight_microbatches
from ..cost.pipeline_costs import (
    CostSource,
    StageCostTable,
    alpa_submesh_shapes,
    assign_devices,
    cluster_shape,
    tables_for,
)
from .pipeline_dp import backtrack, masked_times, num_states, run_dp, search

__all__ = [
    "PipelinePlan", "PipelineStage", "StageCostTable", "StagePartition", "alpa_submesh_shapes",
    "brute_force_pipeline", "partition_stages", "pipeline_latency", "plan_pipeline",
]


def pipeline_latency(stage_times: Sequence[float], num_microbatches: int) -> float:
    """GPipe/1F1B latency of one iteration: sum(t) + (B - 1) * max(t)."""
    return float(sum(stage_times)) + (num_microbatches - 1) * float(max(stage_times))


@dataclasses.dataclass(frozen=True)
class PipelineStage:
    index: int
    layers: tuple[int, int]  # [start, end)
    submesh_shape: tuple[int, int]
    mesh: DeviceMesh
    time: float  # forward + backward per micro-batch
    weight_memory: float  # per device
    activation_memory: float  # per device per in-flight micro-batch
    inflight_microbatches: int
    memory_bytes: float  # peak per device

    @property
    def device_ids(self) -> tuple[int, ...]:
        return self.mesh.devices


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    stages: tuple[PipelineStage, ...]
    num_microbatches: int
    schedule: str
    latency: float
    compute_time: float  # B * max stage time: the bottleneck stage's busy time
    bubble_time: float  # latency - compute_time = sum(t) - max(t)
    solve_seconds: float = 0.0

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def max_stage_time(self) -> float:
        return max(s.time for s in self.stages)


def _build_plan(
    table: StageCostTable, b: int, schedule: str, t_max: float, n_dev: int, smax: int,
    budget: float | None, mesh: DeviceMesh,
) -> PipelinePlan:
    base = masked_times(table, b, schedule, num_states(schedule, b, smax), budget)
    times = np.where(base <= t_max, base, np.inf)
    sizes = _sizes(table)
    raw = backtrack(times, sizes, n_dev, run_dp(times, sizes, n_dev))
    meshes = assign_devices([table.submesh_shapes[m] for _, _, m in raw], mesh)
    stages = []
    for i, ((k, e, m), sub) in enumerate(zip(raw, meshes)):
        inflight = inflight_microbatches(schedule, b, len(raw), i)
        w, a = float(table.weight_memory[k, e, m]), float(table.activation_memory[k, e, m])
        stages.append(PipelineStage(
            i, (k, e), table.submesh_shapes[m], sub, float(table.time[k, e, m]), w, a,
            inflight, w + inflight * a,
        ))
    return _make_plan(stages, b, schedule)


def _sizes(table: StageCostTable) -> np.ndarray:
    return np.array([n * m for n, m in table.submesh_shapes])


def _make_plan(stages: list[PipelineStage], b: int, schedule: str) -> PipelinePlan:
    times = [s.time for s in stages]
    lat = pipeline_latency(times, b)
    compute = b * max(times)
    return PipelinePlan(tuple(stages), b, schedule, lat, compute, lat - compute)


def plan_pipeline(
    costs: CostSource,
    num_layers: int,
    mesh: DeviceMesh | tuple[int, int],
    num_microbatches: Sequence[int] = (1,),
    memory_budget: float | None = None,
    *,
    schedules: Sequence[str] = ("1f1b", "gpipe"),
    submesh_shapes: Sequence[tuple[int, int]] | None = None,
    tmax_rel_gap: float = 0.0,
) -> PipelinePlan:
    """Minimum-latency stage partition, sub-mesh per stage, micro-batch count and schedule.

    `costs` is `layer_cost(start, end, submesh_shape[, num_microbatches])` returning
    `(time, memory)` or `(time, weight_memory, activation_memory_per_microbatch)` for layers
    [start, end), or a `StageCostTable`, or a mapping {num_microbatches: StageCostTable}.
    `mesh` is (nodes, devices per node). Schedules are tried in order and only a strictly
    lower latency replaces an earlier one (1F1B never needs more memory than GPipe for the
    same latency, so it is listed first). `tmax_rel_gap > 0` skips t_max candidates within
    that relative distance of the previous one (faster, at most that much suboptimal).
    """
    t0 = time.perf_counter()
    n_nodes, per_node, mesh = cluster_shape(mesh)
    n_dev = n_nodes * per_node
    shapes = tuple(submesh_shapes or alpa_submesh_shapes(n_nodes, per_node))
    tables = tables_for(costs, num_layers, shapes, num_microbatches)
    smax = min(num_layers, n_dev)
    for sched in schedules:
        if sched not in SCHEDULES:
            raise ValueError(f"plan_pipeline: unknown schedule {sched!r}; known {SCHEDULES}")
    best, best_lat = None, math.inf
    for b in num_microbatches:
        for sched in schedules:
            base = masked_times(tables[b], b, sched, num_states(sched, b, smax), memory_budget)
            r = search(base, _sizes(tables[b]), n_dev, b, best_lat, tmax_rel_gap)
            if r is not None:
                best_lat, best = r[0], (b, sched, r[1])
    if best is None:
        raise NoFeasiblePlanError(
            f"plan_pipeline: no stage partition of {num_layers} layers on {n_nodes}x{per_node} "
            f"devices fits the per-device memory budget {memory_budget}",
            memory_budget=memory_budget,
        )
    b, sched, t_max = best
    plan = _build_plan(tables[b], b, sched, t_max, n_dev, smax, memory_budget, mesh)
    return dataclasses.replace(plan, solve_seconds=time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class StagePartition:
    """A DP result before devices are placed: stages (start, end, column), the micro-batch
    count, the schedule and the DP's latency (sum of stage times + (B - 1) * max)."""

    stages: tuple[tuple[int, int, int], ...]
    num_microbatches: int
    schedule: str
    latency: float


def partition_stages(
    tables: Mapping[int, StageCostTable],
    sizes: Sequence[int],
    n_dev: int,
    memory_budget: float | None = None,
    *,
    schedules: Sequence[str] = ("1f1b", "gpipe"),
    best_latency: float = math.inf,
    tmax_rel_gap: float = 0.0,
    deadline: float | None = None,
) -> StagePartition | None:
    """The stage-partition DP over arbitrary table columns: column m of every table is a
    stage layout that takes `sizes[m]` device units, and the chosen columns must use
    exactly `n_dev` units. Several columns may have the same size (different logical
    meshes, layouts or recomputation on one sub-mesh): the DP takes the best that fits.
    Unlike `plan_pipeline` this does not place devices (the caller's sizes need not be
    Alpa shapes of one cluster). `best_latency` prunes: only a partition strictly faster
    counts (None when there is none, or nothing fits); `tmax_rel_gap` as in plan_pipeline;
    past `deadline` (time.perf_counter()) the best partition found so far is returned."""
    sz = np.asarray(sizes, dtype=int)
    if sz.ndim != 1 or (sz < 1).any() or n_dev < 1:
        raise ValueError(f"partition_stages: sizes {list(sizes)} and device count {n_dev} "
                         "must be positive")
    if not _tiles(sz, n_dev):
        raise ValueError(f"partition_stages: stage sizes {sorted(set(sz.tolist()))} cannot "
                         f"add up to {n_dev} devices; give sizes that tile the device count")
    best, best_lat = None, best_latency
    for b, tab in tables.items():
        if tab.time.shape[2] != len(sz):
            raise ValueError(f"partition_stages: table for B={b} has {tab.time.shape[2]} "
                             f"columns for {len(sz)} sizes")
        smax = min(tab.num_layers, n_dev)
        for sched in schedules:
            base = masked_times(tab, b, sched, num_states(sched, b, smax), memory_budget)
            r = search(base, sz, n_dev, b, best_lat, tmax_rel_gap, deadline)
            if r is not None:
                best_lat, best = r[0], (b, sched, base, r[1])
    if best is None:
        return None
    b, sched, base, t_max = best
    times = np.where(base <= t_max, base, np.inf)
    raw = backtrack(times, sz, n_dev, run_dp(times, sz, n_dev))
    return StagePartition(tuple(raw), b, sched, best_lat)


def _tiles(sizes: np.ndarray, n_dev: int) -> bool:
    """Can stages of these sizes (each any number of times) use exactly n_dev devices?"""
    reach = np.zeros(n_dev + 1, dtype=bool)
    reach[0] = True
    for d in range(1, n_dev + 1):
        reach[d] = any(reach[d - s] for s in set(sizes.tolist()) if s <= d)
    return bool(reach[n_dev])


def _compositions(n: int, parts: int) -> list[tuple[int, ...]]:
    """All ways to cut range(n) into `parts` non-empty consecutive pieces (the cut points)."""
    from itertools import combinations

    return [(0, *c, n) for c in combinations(range(1, n), parts - 1)]


def brute_force_pipeline(
    costs: CostSource,
    num_layers: int,
    mesh: DeviceMesh | tuple[int, int],
    num_microbatches: Sequence[int] = (1,),
    memory_budget: float | None = None,
    *,
    schedules: Sequence[str] = ("1f1b", "gpipe"),
    submesh_shapes: Sequence[tuple[int, int]] | None = None,
) -> PipelinePlan:
    """Exhaustive reference for `plan_pipeline` (tests; tiny inputs only)."""
    from itertools import product

    n_nodes, per_node, mesh = cluster_shape(mesh)
    n_dev = n_nodes * per_node
    shapes = tuple(submesh_shapes or alpa_submesh_shapes(n_nodes, per_node))
    tables = tables_for(costs, num_layers, shapes, num_microbatches)
    best: PipelinePlan | None = None
    for b, sched in product(num_microbatches, schedules):
        tab = tables[b]
        for n_st in range(1, min(num_layers, n_dev) + 1):
            for cuts in _compositions(num_layers, n_st):
                for ms in product(range(len(shapes)), repeat=n_st):
                    if sum(shapes[m][0] * shapes[m][1] for m in ms) != n_dev:
                        continue
                    plan = _evaluate(tab, b, sched, cuts, ms, memory_budget, mesh)
                    if plan is not None and (best is None or plan.latency < best.latency):
                        best = plan
    if best is None:
        raise NoFeasiblePlanError("brute_force_pipeline: no feasible plan",
                                  memory_budget=memory_budget)
    return best


def _evaluate(
    tab: StageCostTable, b: int, sched: str, cuts: tuple[int, ...], ms: tuple[int, ...],
    budget: float | None, mesh: DeviceMesh,
) -> PipelinePlan | None:
    n_st = len(ms)
    stages = []
    meshes = assign_devices([tab.submesh_shapes[m] for m in ms], mesh)
    for i, m in enumerate(ms):
        k, e = cuts[i], cuts[i + 1]
        t = float(tab.time[k, e, m])
        w, a = float(tab.weight_memory[k, e, m]), float(tab.activation_memory[k, e, m])
        inflight = inflight_microbatches(sched, b, n_st, i)
        if not math.isfinite(t) or (budget is not None and w + inflight * a > budget * (1 + 1e-9)):
            return None
        stages.append(PipelineStage(i, (k, e), tab.submesh_shapes[m], meshes[i], t, w, a,
                                    inflight, w + inflight * a))
    return _make_plan(stages, b, sched)

