"""The automatic parallel planner: `plan_parallel(graph, mesh_or_count, spec, batch=...)`.

Search, in four rounds over the configurations of candidates.py (pipeline depth x stage mesh
dp x tp x micro-batch count):

1. Megatron grid. Every configuration is costed with the Megatron layout (megatron_grid.py);
   this ranks the configurations and is the baseline the result is compared with.
2. Intra-op ILP. For the best-ranked configurations (the fastest that fit, and the
   fastest that do not, which a smarter layout or recomputation may fit), the reduced graph
   (pre + one representative layer weighted by the layers per stage + post) is solved
   with ilp.py: first without a memory limit, then, if the result does not fit, with the
   device memory as a constraint, without and with recomputation. The Megatron layout
   of the configuration stays a candidate (a warm start: the ILP result is kept only
   when better).
3. Inter-op. For the best few, pipeline.plan_pipeline re-cuts the layers into stages
   (non-uniform when pre/post make the end stages heavier), and recomputation is then
   decided per stage, only where the stage does not fit without it. ZeRO-1 shards
   the optimizer states over the data-parallel axis whenever it is larger than one.

4. Sub-meshes (device count only). submesh_search.py lets each stage take its own (dp, tp)
   mesh and size (Alpa: 4 + 2 + 2 devices for 3 stages on 8), with per-mesh layouts and a
   DP over stage sizes, seeded by the best uniform candidates; kept only when strictly
   faster than the uniform best (plan.search["uniform_best"] records that). It gets at
   most as long again as rounds 1-3 took (at least 8 s), within `time_budget`.

All candidates are scored by the same step estimate (staging.py), so the plan returned is
never slower than the best grid configuration. When no configuration fits, the error names
the smallest per-device memory any configuration needs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

from meshweave.ir.graph import Graph
from meshweave.ir.mesh import DeviceMesh
from .candidates import Config, PlannerState, respects_pins, stage_meshes
from ..cost.hardware import HardwareSpec, get_spec
from ..intra_op.ilp import solve_intra_op
from ..intra_op.problem import IntraOpProblem, NoFeasiblePlanError, Strategy
from .megatron_grid import GridEntry, megatron_grid, state_megatron
from .no_fit import raise_no_fit
from .pipeline import plan_pipeline
from ..plan import Plan
from .plan_build import build_plan, build_submesh_plan
from .context import Key, assignment_segments
from .staging import PartitionEval, evaluate_partition, stage_table, uniform_cuts, unit_table
from ..strategies.node_strategies import PlanningError
from .submesh_search import SubmeshCandidate, submesh_round


@dataclasses.dataclass
class Candidate:
    config: Config
    assign: dict[Key, Any]
    evaluation: PartitionEval
    source: str  # "ilp", "ilp+mem", "ilp+recompute", "megatron"

    @property
    def step_time(self) -> float:
        return self.evaluation.total


def plan_parallel(
    graph: Graph,
    mesh_or_device_count: DeviceMesh | int,
    spec: HardwareSpec | str,
    *,
    batch: int,
    training: bool = False,
    pins: Mapping[str, tuple[str, ...]] | None = None,
    max_stages: int | None = None,
    repeats: int | None = None,
    dtype: str | None = None,
    top_k: int = 6,
    time_budget: float = 20.0,
    memory_budget: float | None = None,
    remat_curve: tuple | None = None,
) -> Plan:
    """Find a parallel plan for `graph` on a mesh (or a device count) of `spec` devices.

    `batch` is the global batch per step. `pins` fixes placements of chosen values
    ({"p_lm_head_weight": ("S(0)", "R")}, one entry per stage-mesh axis; with a device count
    the stage mesh is (dp, tp)). `repeats`: the real number of layers of the repeated block
    when `graph` was traced with fewer (default: graph.meta["repeated_layers"], else as
    traced). `time_budget`: seconds after which no new configuration gets an ILP solve
    (the best found so far is returned). `memory_budget`: bytes per device a plan may use,
    instead of the spec's usable memory (a budget below the replicated footprint makes the
    search shard weights or pipeline even where communication makes that slower). Raises
    NoFeasiblePlanError (with `min_memory_bytes`) when nothing fits. `remat_curve`: the
    remat pass's memory-versus-recompute points (passes/remat/curve.py), which price a stage
    that needs recomputation instead of whole-layer recompute.
    """
    t0 = time.perf_counter()
    spec = get_spec(spec)
    if batch < 1:
        raise PlanningError(f"batch must be >= 1, got {batch}")
    repeats = repeats if repeats is not None else graph.meta.get("repeated_layers")
    state = PlannerState(
        graph,
        spec,
        batch=batch,
        training=training,
        repeats=repeats,
        dtype=dtype,
        pins=pins,
        memory_budget=memory_budget,
        remat_curve=remat_curve,
    )
    _check_pins(state, mesh_or_device_count)
    grid = megatron_grid(state, mesh_or_device_count, max_stages)
    t_grid = time.perf_counter() - t0
    if not grid.entries:
        raise PlanningError(
            f"no configuration of {mesh_or_device_count} devices for batch "
            f"{batch} and {state.n_units} layers (batch must split over dp)"
        )
    cands = _ilp_round(state, grid.entries, top_k, t0 + 0.8 * time_budget)
    if not cands:
        raise_no_fit(state, grid.entries)
    cands.sort(key=lambda c: c.step_time)
    best = _pipeline_round(state, cands[: max(2, top_k // 2)])
    sub, sub_info = _maybe_submeshes(
        state, mesh_or_device_count, best, cands, max_stages, t0, time_budget
    )
    info = {
        "solver": best.source,
        "seconds": time.perf_counter() - t0,
        "grid_seconds": t_grid,
        "grid_best": grid.best.step_time if grid.best else None,
        "grid_best_config": _describe(grid.best) if grid.best else None,
        "configs_evaluated": len(grid.entries),
        "ilp_candidates": len(cands),
        "repeats": state.ctx.layers.repeats,
        "clustered": state.ctx.layers.cluster is not None,
        **sub_info,
    }
    if memory_budget is not None:
        info["memory_budget"] = float(memory_budget)
    if sub is not None:
        info.update(solver=sub.source, uniform_best=best.step_time,
                    uniform_best_config=best.config.label())
        return build_submesh_plan(state, sub, info)
    return build_plan(state, best.config, best.assign, best.evaluation, info)


def _maybe_submeshes(
    state: PlannerState, mesh_or_count, best: Candidate, cands: list[Candidate],
    max_stages: int | None, t0: float, time_budget: float,
) -> tuple[SubmeshCandidate | None, dict[str, Any]]:
    """Round 4 on a device count (a fixed mesh stays uniform), with what it did for
    plan.search. It gets as long again as rounds 1-3 took, at least 8 s, within the budget."""
    if isinstance(mesh_or_count, DeviceMesh) or (max_stages or 2) <= 1:
        return None, {"submesh_round": "not run (fixed mesh or one stage)"}
    now = time.perf_counter()
    deadline = min(t0 + time_budget, now + max(8.0, now - t0))
    sub = _submesh_round(state, int(mesh_or_count), best, cands, deadline)
    if sub is not None and max_stages is not None and len(sub.layouts) > max_stages:
        sub = None  # the DP does not bound the stage count; the caller did
    outcome = "won" if sub is not None else "no faster plan"
    if time.perf_counter() > deadline:  # then the result may depend on the machine's speed
        outcome += ", stopped at its time limit"
    return sub, {"submesh_round": outcome, "submesh_seconds": time.perf_counter() - now}


def _describe(e: GridEntry) -> str:
    return e.config.label() + (" recompute" if e.recompute else "")


def _check_pins(state: PlannerState, mesh_or_count: DeviceMesh | int) -> None:
    nd = mesh_or_count.ndim if isinstance(mesh_or_count, DeviceMesh) else 2
    for name, texts in state.pins.items():
        if len(texts) != nd:
            raise PlanningError(
                f"pin %{name}={tuple(texts)}: the stage mesh has {nd} axes; "
                "give one placement per axis"
            )


def _shortlist(entries: list[GridEntry], top_k: int) -> list[Config]:
    """Configurations for the ILP: the fastest that fit, then the fastest that do not (the
    Megatron layout may cost infinity where the ILP's does not: those come last)."""
    by_cfg: dict[Config, GridEntry] = {}
    for e in entries:
        old = by_cfg.get(e.config)
        key = (not e.evaluation.fits, e.step_time)
        if old is None or key < (not old.evaluation.fits, old.step_time):
            by_cfg[e.config] = e
    ranked = sorted(by_cfg.values(), key=lambda e: e.step_time)
    fits = [e.config for e in ranked if e.evaluation.fits][:top_k]
    best_fit = min((e.step_time for e in ranked if e.evaluation.fits), default=math.inf)
    over = [
        e.config
        for e in ranked
        if not e.evaluation.fits and (e.step_time < best_fit or not math.isfinite(e.step_time))
    ]
    return fits + over[: max(1, top_k // 2)]


def _ilp_round(
    state: PlannerState, entries: list[GridEntry], top_k: int, deadline: float
) -> list[Candidate]:
    """ILP candidates, in two passes: every shortlisted configuration gets the Megatron
    layout and the time-optimal ILP layout (best-ranked first, until the deadline; the first
    is always solved); then the configurations whose ILP layout was fastest but did not fit
    get the memory multiplier search, most promising first."""
    out: list[Candidate] = []
    over: list[tuple[float, Config]] = []
    for i, cfg in enumerate(_shortlist(entries, top_k)):
        if i and time.perf_counter() > deadline:
            break
        found = _solve_config(state, cfg, deadline)
        out += found
        ilp = [c for c in found if c.source == "ilp"]
        if ilp and not ilp[0].evaluation.fits and state.training:
            # configurations whose Megatron layout fits are known to be feasible: first
            seed_fits = any(c.source == "megatron" and c.evaluation.fits for c in found)
            over.append(((not seed_fits, ilp[0].step_time), cfg))
    best_fit = min((c.step_time for c in out if c.evaluation.fits), default=math.inf)
    for (_, t), cfg in sorted(over, key=lambda x: x[0])[:3]:
        if t >= best_fit or time.perf_counter() > deadline:
            break
        found = _fit_memory(state, cfg, deadline)
        out += found
        best_fit = min([best_fit] + [c.step_time for c in found if c.evaluation.fits])
    return [c for c in out if c.evaluation.fits]


def _evaluate(
    state: PlannerState, cfg: Config, assign: dict[Key, Any], cuts=None
) -> PartitionEval | None:
    mbs = state.batch // cfg.micro_batches
    segs = assignment_segments(state.ctx, state.model(cfg.mesh, mbs), assign)
    units = unit_table(state.ctx, segs, state.spec, cfg.mesh.size, state.training,
                       state.remat_curve)
    cuts = cuts or uniform_cuts(units.num_units, cfg.pp)
    if cuts is None:
        return None
    sched = "1f1b" if state.training else "gpipe"
    return evaluate_partition(units, cuts, cfg.micro_batches, sched, state.budget(), "auto")


def _solve_config(state: PlannerState, cfg: Config, deadline: float) -> list[Candidate]:
    """The Megatron layout and the time-optimal ILP layout of one configuration."""
    mbs = state.batch // cfg.micro_batches
    raw = state.raw(cfg.mesh, mbs)
    out: list[Candidate] = []
    seed = state_megatron(state, cfg.mesh, mbs)
    if not state.pins or respects_pins(state, seed):
        ev = _evaluate(state, cfg, seed)
        if ev is not None:
            out.append(Candidate(cfg, seed, ev, "megatron"))
    sol = _solve(_problem(state, cfg, raw, False), deadline)
    if sol is not None:
        cand = _candidate(state, cfg, raw, sol.choice, "ilp")
        if cand is not None:
            out.append(cand)
    return out


def _problem(state: PlannerState, cfg: Config, raw, recompute: bool) -> IntraOpProblem:
    per_stage = math.ceil(max(1, state.ctx.layers.repeats) / cfg.pp)
    inflight = min(cfg.micro_batches, cfg.pp) if state.training else 1
    return raw.intra_op(per_stage, inflight, cfg.micro_batches, recompute, None)


def _fit_memory(state: PlannerState, cfg: Config, deadline: float) -> list[Candidate]:
    """Fastest layouts within the device memory, without and with recomputation."""
    raw = state.raw(cfg.mesh, state.batch // cfg.micro_batches)
    out = []
    for recompute in (False, True):
        if time.perf_counter() > deadline:
            break
        choice = _memory_multiplier(_problem(state, cfg, raw, recompute), state.budget(), deadline)
        if choice is not None:
            c = _candidate(state, cfg, raw, choice, "ilp+recompute" if recompute else "ilp+mem")
            if c is not None:
                out.append(c)
                if c.evaluation.fits:
                    break  # recomputation only when the layout alone cannot fit
    return out


def _solve(prob: IntraOpProblem, deadline: float):
    limit = max(1.0, deadline - time.perf_counter())
    try:
        return solve_intra_op(prob, time_limit=limit, mip_rel_gap=1e-4)
    except (NoFeasiblePlanError, RuntimeError):
        return None


def _candidate(state: PlannerState, cfg: Config, raw, choice, source: str) -> Candidate | None:
    assign = raw.assignment(raw.decode(choice))
    ev = _evaluate(state, cfg, assign)
    return Candidate(cfg, assign, ev, source) if ev is not None else None


def _memory_multiplier(
    prob: IntraOpProblem, budget: float, deadline: float, steps: int = 5
) -> dict | None:
    """Fastest choice within `budget` by a Lagrange multiplier on memory: minimise
    time + lam * memory (no memory row, so ilp_reduce still collapses chains), doubling lam
    until the choice fits, then bisecting. Memory is the ILP's weighted per-device sum."""

    def solve(lam: float):
        lp = IntraOpProblem()
        for n in prob.nodes:
            lp.add_node(
                n.name,
                [
                    Strategy(
                        s.name, s.compute_time + lam * s.memory_bytes, s.comm_time, s.memory_bytes
                    )
                    for s in n.strategies
                ],
                n.weight,
            )
        for e in prob.edges:
            lp.add_edge(e.src, e.dst, e.cost, e.weight)
        sol = _solve(lp, deadline)
        if sol is None:
            return None, math.inf
        return sol.choice, prob.evaluate(sol.choice)["memory_bytes"]

    base, mem = solve(0.0)
    if base is None or mem <= budget:
        return base
    lam = prob.evaluate(base)["objective"] / budget
    lo, hi, best = 0.0, None, None
    for _ in range(steps):
        if time.perf_counter() > deadline:
            break
        choice, mem = solve(lam)
        if choice is not None and mem <= budget:
            hi, best = lam, choice
        else:
            lo = lam
        lam = lam * 4 if hi is None else (lo + hi) / 2
    return best


def _pipeline_round(state: PlannerState, cands: list[Candidate]) -> Candidate:
    """Re-cut the best candidates' layers with the pipeline DP; keep the fastest."""
    best = cands[0]
    for c in cands:
        if c.config.pp == 1:
            continue
        mbs = state.batch // c.config.micro_batches
        segs = assignment_segments(state.ctx, state.model(c.config.mesh, mbs), c.assign)
        units = unit_table(state.ctx, segs, state.spec, c.config.mesh.size, state.training,
                           state.remat_curve)
        table = stage_table(units, c.config.micro_batches, c.config.pp, state.budget())
        sched = "1f1b" if state.training else "gpipe"
        try:
            pipe = plan_pipeline(
                {c.config.micro_batches: table},
                units.num_units,
                (c.config.pp, 1),
                [c.config.micro_batches],
                state.budget(),
                schedules=(sched,),
                submesh_shapes=[(1, 1)],
            )
        except NoFeasiblePlanError:
            continue
        if pipe.num_stages != c.config.pp:
            continue
        cuts = [s.layers[0] for s in pipe.stages] + [units.num_units]
        ev = evaluate_partition(units, cuts, c.config.micro_batches, sched, state.budget(), "auto")
        if ev.fits and ev.total < best.step_time:
            best = Candidate(c.config, c.assign, ev, c.source + "+pipeline-dp")
    return best


def _submesh_round(
    state: PlannerState, n_dev: int, best: Candidate, cands: list[Candidate], deadline: float
) -> SubmeshCandidate | None:
    """Alpa-style stage sub-meshes (submesh_search.py), seeded by the best uniform
    candidates; None unless strictly faster than `best`."""
    if time.perf_counter() > deadline:
        return None
    seeds = [(c.config.pp, c.config.mesh, c.config.micro_batches) for c in [best, *cands]]
    known = [(c.config.mesh, state.batch // c.config.micro_batches, c.assign, c.source)
             for c in cands if c.source != "megatron"]

    def solve(mesh: DeviceMesh, mbs: int):
        """Time-optimal ILP layout of one stage mesh (weighted as a uniform stage would be)."""
        pp = max(1, n_dev // mesh.size)
        cfg = Config(pp, mesh, state.batch // mbs)
        try:
            raw = state.raw(mesh, mbs)
            sol = _solve(_problem(state, cfg, raw, False), deadline)
        except PlanningError:  # e.g. a pin this mesh cannot honour
            return None
        return raw.assignment(raw.decode(sol.choice)) if sol is not None else None

    return submesh_round(state, n_dev, seeds, known, best.step_time, deadline, solve)


def search_stats(plan: Plan) -> dict[str, Any]:
    """The search's own numbers: seconds, grid baseline, solver that won."""
    return {k: plan.search.get(k) for k in ("seconds", "grid_best", "solver", "grid_seconds")}


__all__ = [
    "NoFeasiblePlanError",
    "PlanningError",
    "megatron_grid",
    "plan_parallel",
    "stage_meshes",
]
