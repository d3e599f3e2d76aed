"""Pipeline stages from per-layer costs: stage time, memory, and a partition's step time.

A strategy choice on the reduced graph gives segment costs (problem.py): pre, one layer of
the repeated cluster, any unclustered layer, post. `UnitTable` lays them out as the real
model's layers (the pipeline's units; pre joins the first, post the last). `evaluate_partition`
turns layer cuts into the step estimate both the search and the Megatron grid report:

    step = sum_i t_i + (B - 1) max_i t_i + max_i sync_i

with t_i stage i's forward + backward time per micro-batch (compute, intra-stage collectives,
and the point-to-point transfers to its neighbours), B micro-batches, and sync_i its gradient
reduction once per step (bucketed, as the runtime does it: the bytes of every parameter, the
latency once). Memory per device of stage i is its weights (+ grads and optimizer
states) plus the activations of the micro-batches in flight (1F1B: min(B, S - i)); with
recomputation only each layer's input stays per micro-batch, plus one layer's activations;
with the remat pass's own curve (UnitTable.curve, passes/remat/curve.py), the stage takes the
first (kept, extra compute) point that fits, and the plan gives its ranks that budget.
Per stage, recomputation is switched on only when the stage does not fit without it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ..cost.collectives import collective_time
from ..cost.hardware import HardwareSpec
from ..cost.optimizer_shard import inflight_microbatches
from ..cost.pipeline_costs import StageCostTable
from .context import GraphContext, SegmentCost

USABLE_MEMORY = 0.9  # of the device memory; the rest is left to workspaces and fragmentation


@dataclasses.dataclass
class UnitTable:
    """Per-unit (layer) costs of one strategy choice; pre/post ride on the end units."""

    compute: np.ndarray  # seconds per micro-batch, no recomputation
    compute_rc: np.ndarray  # with recomputation
    comm: np.ndarray
    sync: np.ndarray  # seconds per step, per-byte part
    sync_fixed: np.ndarray  # seconds per step, latency part (a stage pays its max once)
    wmem: np.ndarray
    act: np.ndarray  # saved bytes per micro-batch
    boundary: np.ndarray  # bytes handed to the next unit per micro-batch
    pre: SegmentCost
    post: SegmentCost
    p2p_link: object
    training: bool
    # the remat pass's (kept fraction, extra compute fraction) points (passes/remat/curve.py);
    # None: recomputation is whole-layer (each layer's input kept, x4/3 compute)
    curve: tuple | None = None

    @property
    def num_units(self) -> int:
        return len(self.compute)


def unit_names(ctx: GraphContext) -> list[str]:
    """The segment each pipeline unit (real layer) costs as: "rep" or "x<j>"."""
    names: list[str] = []
    c = ctx.layers.cluster
    for j in range(len(ctx.layers.layers)):
        if c is not None and j in c.layers():
            if j == c.start:
                names += ["rep"] * ctx.layers.repeats
        else:
            names.append(f"x{j}")
    return names


def unit_table(
    ctx: GraphContext,
    segs: dict[str, SegmentCost],
    spec: HardwareSpec,
    stage_size: int,
    training: bool,
    curve: tuple | None = None,
) -> UnitTable:
    names = unit_names(ctx)
    empty = SegmentCost()
    rows = [segs.get(n, empty) for n in names] or [empty]  # no layers: one empty unit
    rc = 4.0 / 3.0 if training else 1.0

    def col(f):
        return np.array([f(r) for r in rows], dtype=float)

    link = spec.intra_node if stage_size < spec.devices_per_node else spec.inter_node
    return UnitTable(
        col(lambda r: r.compute),
        col(lambda r: r.compute * rc),
        col(lambda r: r.comm),
        col(lambda r: r.sync),
        col(lambda r: r.sync_fixed),
        col(lambda r: r.weight_memory),
        col(lambda r: r.activation_memory),
        col(lambda r: r.boundary_bytes),
        segs.get("pre", empty),
        segs.get("post", empty),
        link,
        training,
        curve if training and curve and len(curve) > 1 else None,
    )


@dataclasses.dataclass
class StageEval:
    layers: tuple[int, int]
    time: float
    compute: float
    comm: float
    sync: float
    memory: float
    recompute: bool
    inflight: int
    # with recompute: the fraction of the stage's activation bytes the model keeps (layer
    # boundaries and the ends), the budget the runtime's remat pass gets (StagePlan)
    saved_fraction: float | None = None


def transfer_time(sender: UnitTable, receiver: UnitTable, unit: int) -> float:
    """Seconds to hand unit `unit`'s output from a stage laid out as `sender` to one laid out
    as `receiver`. Same mesh: each device sends its shard to its twin (one send_recv of the
    per-device boundary bytes). Different meshes (Alpa's cross-mesh resharding): every
    device still moves at most the larger of the two per-device shards, over the slower of
    the two stages' links; for equal meshes this is exactly the uniform cost."""
    nbytes = max(float(sender.boundary[unit]), float(receiver.boundary[unit]))
    link = min((sender.p2p_link, receiver.p2p_link), key=lambda lk: lk.bandwidth_Bps)
    return collective_time("send_recv", nbytes, 2, link)


def eval_stage(
    u: UnitTable, k: int, e: int, n_units: int, inflight: int, recompute: bool,
    prev: UnitTable | None = None, nxt: UnitTable | None = None,
    point: tuple[float, float] | None = None,
) -> StageEval:
    """One stage's costs; `prev`/`nxt` are the neighbouring stages' layouts when they differ
    from this stage's (heterogeneous sub-meshes), for the transfer costs. `point`, one of
    u.curve's (kept, extra): recomputation as the remat pass does it at that budget."""
    first, last = k == 0, e == n_units
    ends = ([u.pre] if first else []) + ([u.post] if last else [])
    if recompute and point is not None:
        compute = float(u.compute[k:e].sum()) + sum(s.compute for s in ends)
        compute *= 1.0 + point[1]
    else:
        compute = float((u.compute_rc if recompute else u.compute)[k:e].sum())
        compute += sum(s.compute for s in ends)
    comm = float(u.comm[k:e].sum()) + sum(s.comm for s in ends)
    if not last:
        comm += transfer_time(u, nxt or u, e - 1)
    if not first and u.training:
        comm += transfer_time(prev or u, u, k - 1)
    sync = float(u.sync[k:e].sum()) + sum(s.sync for s in ends)
    sync += max([float(u.sync_fixed[k:e].max(initial=0.0))] + [s.sync_fixed for s in ends])
    wmem = float(u.wmem[k:e].sum()) + sum(s.weight_memory for s in ends)
    end_act = sum(s.activation_memory for s in ends)
    saved = None
    if not u.training:
        act = max(float(u.act[k:e].max(initial=0.0)), end_act)
    elif recompute and point is not None:  # what the pass keeps; one layer's recomputed
        full = float(u.act[k:e].sum()) + end_act  # activations alive at once in backward
        act = inflight * point[0] * full + float(u.act[k:e].max()) * (1.0 - point[0])
        saved = point[0]
    elif recompute:
        kept, full = float(u.boundary[k:e].sum()) + end_act, float(u.act[k:e].sum()) + end_act
        act = inflight * kept + float(u.act[k:e].max())
        saved = min(1.0, kept / full) if full > 0 else 1.0
    else:
        act = inflight * (float(u.act[k:e].sum()) + end_act)
    return StageEval((k, e), compute + comm, compute, comm, sync, wmem + act, recompute, inflight,
                     saved)


@dataclasses.dataclass
class PartitionEval:
    stages: list[StageEval]
    micro_batches: int
    schedule: str
    total: float
    compute: float
    comm: float
    bubble: float
    fits: bool

    @property
    def peak_memory(self) -> float:
        return max(s.memory for s in self.stages)


def evaluate_partition(
    u: UnitTable,
    cuts: Sequence[int],
    micro_batches: int,
    schedule: str,
    budget: float | None,
    recompute: str | bool = "auto",
) -> PartitionEval:
    """Step estimate of stages [cuts[i], cuts[i+1]); recompute "auto" decides per stage."""
    n = len(cuts) - 1
    return evaluate_stages([u] * n, cuts, micro_batches, schedule, budget, recompute)


def evaluate_stages(
    layouts: Sequence[UnitTable],
    cuts: Sequence[int],
    micro_batches: int,
    schedule: str,
    budget: float | None,
    recompute: str | bool = "auto",
) -> PartitionEval:
    """`evaluate_partition` with one unit table per stage (each stage's own sub-mesh and
    layout); transfers between stages of different layouts cost the cross-mesh transfer."""
    n = len(cuts) - 1
    stages = []
    for i, u in enumerate(layouts):
        inflight = inflight_microbatches(schedule, micro_batches, n, i) if u.training else 1
        k, e = cuts[i], cuts[i + 1]
        nb = {"prev": layouts[i - 1] if i else None, "nxt": layouts[i + 1] if i + 1 < n else None}
        if recompute == "auto":
            st = eval_stage(u, k, e, u.num_units, inflight, False, **nb)
            if u.training and budget is not None and st.memory > budget:
                rc = _recomputed_stage(u, k, e, inflight, budget, nb)
                st = rc if rc.memory < st.memory else st
        elif recompute and u.curve is not None:
            st = _recomputed_stage(u, k, e, inflight, budget, nb)
        else:
            st = eval_stage(u, k, e, u.num_units, inflight, bool(recompute), **nb)
        stages.append(st)
    times = [s.time for s in stages]
    worst = stages[int(np.argmax(times))]
    sync = max(s.sync for s in stages)
    bubble = float(sum(times) - worst.time)
    compute = micro_batches * worst.compute
    comm = micro_batches * worst.comm + sync
    fits = budget is None or all(s.memory <= budget * (1 + 1e-9) for s in stages)
    total = compute + comm + bubble
    if not all(math.isfinite(t) for t in times):
        total, fits = math.inf, False
    return PartitionEval(stages, micro_batches, schedule, total, compute, comm, bubble, fits)


def _recomputed_stage(u: UnitTable, k: int, e: int, inflight: int, budget: float | None,
                      nb: dict) -> StageEval:
    """The stage with recomputation: whole-layer without a curve; with one, the first point
    (least recompute) that fits the budget, else the point of least memory."""
    if u.curve is None:
        return eval_stage(u, k, e, u.num_units, inflight, True, **nb)
    best = None
    for point in u.curve[1:]:
        st = eval_stage(u, k, e, u.num_units, inflight, True, point=point, **nb)
        if budget is None or st.memory <= budget * (1 + 1e-9):
            return st
        best = st if best is None or st.memory < best.memory else best
    return best


def uniform_cuts(n_units: int, n_stages: int) -> list[int] | None:
    """Megatron-style split: layers as even as possible (earlier stages take the remainder)."""
    if n_stages > n_units:
        return None
    base, extra = divmod(n_units, n_stages)
    cuts = [0]
    for i in range(n_stages):
        cuts.append(cuts[-1] + base + (1 if i < extra else 0))
    return cuts


def stage_table(
    u: UnitTable, micro_batches: int, n_stages: int, budget: float | None,
    recompute: bool | None = None,
) -> StageCostTable:
    """Stage costs of every layer range for pipeline.plan_pipeline (one 1x1 'sub-mesh': the
    stage mesh is fixed, so only the partition is searched). Same numbers as `eval_stage`,
    vectorised over the range end; a range that does not fit with the first stage's
    in-flight micro-batches uses recomputation when that needs less memory. `recompute`
    True/False forces it on/off instead (the sub-mesh search offers both as columns and
    lets the DP's per-stage memory check choose)."""
    n = u.num_units
    inflight = min(micro_batches, n_stages) if u.training else 1
    t = np.full((n, n + 1, 1), np.inf)
    w = np.zeros_like(t)
    a = np.zeros_like(t)
    cs = {
        f: np.concatenate([[0.0], np.cumsum(getattr(u, f))])
        for f in ("compute", "compute_rc", "comm", "wmem", "act", "boundary")
    }
    link = u.p2p_link

    def p2p(nbytes):
        return link.latency_s + nbytes / link.bandwidth_Bps

    def rng(f, k, ends, pre, last, pre_v, post_v):
        return cs[f][ends] - cs[f][k] + pre * pre_v + last * post_v

    for k in range(n):
        ends = np.arange(k + 1, n + 1)
        last = (ends == n).astype(float)
        pre = 1.0 if k == 0 else 0.0
        at = (k, ends, pre, last)
        comm = rng("comm", *at, u.pre.comm, u.post.comm)
        comm = comm + np.where(ends < n, p2p(u.boundary[ends - 1]), 0.0)
        if k > 0 and u.training:
            comm = comm + p2p(u.boundary[k - 1])
        compute = rng("compute", *at, u.pre.compute, u.post.compute)
        compute_rc = rng("compute_rc", *at, u.pre.compute, u.post.compute)
        weights = rng("wmem", *at, u.pre.weight_memory, u.post.weight_memory)
        end_act = pre * u.pre.activation_memory + last * u.post.activation_memory
        act_sum = cs["act"][ends] - cs["act"][k] + end_act
        work = np.maximum.accumulate(u.act[k:])
        if not u.training:
            t[k, k + 1 :, 0] = compute + comm
            w[k, k + 1 :, 0] = weights + np.maximum(work, end_act)
            continue
        per_rc = cs["boundary"][ends] - cs["boundary"][k] + end_act
        mem = weights + inflight * act_sum
        mem_rc = weights + work + inflight * per_rc
        if recompute is not None:
            use_rc = np.full(len(ends), bool(recompute))
        elif budget is not None:
            use_rc = (mem > budget) & (mem_rc < mem)
        else:
            use_rc = np.zeros(len(ends), bool)
        t[k, k + 1 :, 0] = np.where(use_rc, compute_rc, compute) + comm
        w[k, k + 1 :, 0] = np.where(use_rc, weights + work, weights)
        a[k, k + 1 :, 0] = np.where(use_rc, per_rc, act_sum)
    return StageCostTable(((1, 1),), t, w, a)


def _weights(u: UnitTable, k: int, e: int) -> float:
    ends = ([u.pre] if k == 0 else []) + ([u.post] if e == u.num_units else [])
    return float(u.wmem[k:e].sum()) + sum(s.weight_memory for s in ends)


def step_lower_bound(u: UnitTable, n_stages: int, micro_batches: int) -> float:
    """No partition of these units beats this (perfect balance, no transfers)."""
    total = float(u.compute.sum() + u.comm.sum()) + u.pre.time + u.post.time
    return (micro_batches + n_stages - 1) * total / n_stages if math.isfinite(total) else total
