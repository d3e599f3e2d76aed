"""When no configuration fits: the smallest per-device memory any plan needs, in the error.

For each (pp, stage mesh) the memory-minimal assignment (recomputation on, the most
micro-batches) is solved and evaluated, so the message can say how much memory would do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .candidates import Config, PlannerState, microbatch_options
from ..cost.hardware import format_bytes
from ..intra_op.ilp import solve_intra_op
from ..intra_op.problem import IntraOpProblem, NoFeasiblePlanError, Strategy
from .megatron_grid import GridEntry
from .context import Key, assignment_segments
from .staging import evaluate_partition, uniform_cuts, unit_table


def raise_no_fit(state: PlannerState, entries: list[GridEntry]) -> None:
    """Name the smallest per-device memory any configuration needs, then raise."""
    need, where = math.inf, None
    seen = set()
    for e in entries:
        key = (e.config.pp, e.config.mesh.shape)
        if key in seen:
            continue
        seen.add(key)
        opts = microbatch_options(state.batch, e.config.pp, e.config.dp, state.training,
                                  rebatchable=not state.ctx.batch.lost_at)
        cfg = Config(e.config.pp, e.config.mesh, max(opts))
        mem = _min_memory(state, cfg)
        if mem < need:
            need, where = mem, cfg
    budget = state.budget()
    if state.memory_budget is not None:
        where_budget = "the given memory budget"
    else:
        where_budget = (
            f"{state.spec.name}, {state.spec.memory_bytes / 2**30:.1f} GiB with "
            f"{1 - budget / state.spec.memory_bytes:.0%} reserved"
        )
    raise NoFeasiblePlanError(
        f"no parallel plan fits in {format_bytes(budget)} per device ({where_budget}); the smallest "
        f"per-device memory any plan needs is {format_bytes(need)} ({need:.4g} bytes, "
        f"{where.label() if where else 'n/a'}, recomputation on)",
        min_memory_bytes=need,
        memory_budget=budget,
    )


def _min_memory(state: PlannerState, cfg: Config) -> float:
    """Peak stage memory of the memory-minimal assignment (recomputation on)."""
    mbs = state.batch // cfg.micro_batches
    raw = state.raw(cfg.mesh, mbs)
    per_stage = math.ceil(max(1, state.ctx.layers.repeats) / cfg.pp)
    inflight = min(cfg.micro_batches, cfg.pp) if state.training else 1
    prob = raw.intra_op(per_stage, inflight, cfg.micro_batches, True, None)
    mem_prob = IntraOpProblem()
    for n in prob.nodes:
        mem_prob.add_node(
            n.name, [Strategy(s.name, s.memory_bytes, 0.0, 0.0) for s in n.strategies], n.weight
        )
    for e in prob.edges:
        mem_prob.add_edge(e.src, e.dst, np.where(np.isfinite(e.cost), 0.0, np.inf), e.weight)
    sol = solve_intra_op(mem_prob, time_limit=10.0)
    assign = raw.assignment(raw.decode(sol.choice))
    return _evaluate_forced(state, cfg, assign)


def _evaluate_forced(state: PlannerState, cfg: Config, assign: dict[Key, Any]) -> float:
    mbs = state.batch // cfg.micro_batches
    segs = assignment_segments(state.ctx, state.model(cfg.mesh, mbs), assign)
    units = unit_table(state.ctx, segs, state.spec, cfg.mesh.size, state.training,
                       state.remat_curve)
    cuts = uniform_cuts(units.num_units, cfg.pp)
    sched = "1f1b" if state.training else "gpipe"
    ev = evaluate_partition(units, cuts, cfg.micro_batches, sched, None, state.training)
    return ev.peak_memory
