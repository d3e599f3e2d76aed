"""The pass's memory-versus-recompute curve, for the parallel planner.

    curve = remat_curve(problem)      # ((1.0, 0.0), (0.7, 0.01), ..., (floor, c))

Each point is (kept, extra): solving the remat ILP at a budget keeps `kept` of the activation
bytes that saving everything needs, and recomputes `extra` of the step's compute time (the
recomputed nodes' seconds over forward + backward, taken as three forwards). The first point
is saving everything, the last the smallest feasible budget. The planner
(passes/parallel/search/staging.py) prices a stage that does not fit at the first point that
does, instead of whole-layer recomputation, and writes that point's `kept` into the plan as
the stage's budget (StagePlan.memory_budget), which each of the stage's ranks then runs.

The curve comes from the model's own joint graph (compile(training=True) builds it before it
plans); a graph's layers repeat, so the fractions of one model are the fractions of each of
its layers, to the accuracy of the planner's per-layer model.
"""

from __future__ import annotations

from .problem import RematProblem
from .solve import smallest_feasible, solve

FRACTIONS = (0.7, 0.5, 0.3, 0.2, 0.1)


def remat_curve(problem: RematProblem, fractions=FRACTIONS,
                time_limit: float = 10.0) -> tuple[tuple[float, float], ...]:
    """(kept fraction, extra compute fraction) points, kept decreasing, from (1.0, 0.0) down
    to the smallest feasible budget; points that keep no less than a previous one are left
    out."""
    full = problem.full_bytes
    forward = sum(c.cost for c in problem.candidates.values())
    if full <= 0 or forward <= 0:
        return ((1.0, 0.0),)
    floor = smallest_feasible(problem, time_limit) / full
    points = [(1.0, 0.0)]
    for f in sorted({*fractions, floor}, reverse=True):
        if f < floor - 1e-12 or f >= points[-1][0]:
            continue
        sol = solve(problem, max(f, floor) * full, time_limit=time_limit)
        kept = sol.saved_bytes / full
        if kept < points[-1][0] - 1e-9:
            points.append((kept, sol.recompute_seconds / (3.0 * forward)))
    return tuple(points)
