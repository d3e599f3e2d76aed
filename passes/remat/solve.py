"""The saved set of least recompute time under a byte budget: an ILP solved by HiGHS.

    sol = solve(problem, budget_bytes)    # RematSolution: saved, recomputed, bytes, seconds

Variables per candidate v: s_v (saved) and r_v (recomputed in the backward), both binary.

    minimise   sum_v cost_v r_v  (+ a tie-break of 1e-9 per saved byte share)
    subject to s_v + r_v >= 1            for every v the backward reads
               s_u + r_u >= r_v          for every forward input u of a recomputed v
               s_v = 0  where v is a view of an activation b (saving it would keep b's
                        storage: b is saved instead, and v recomputed from it for free)
               sum_v nbytes_v s_v <= B
               r_v = 0  where v may not be recomputed (random, mutating, collective)
               s_v = 0  where v is a tuple (its getitems are saved instead)

This is Checkmate's formulation restricted to one forward/backward boundary: the liveness of
values inside the backward (Checkmate's peak-memory constraint per stage) is not modelled, so
the peak is measured rather than bounded (cm.memory_stats()).

Graphs of up to EXACT_LIMIT candidates are solved as the MILP (relative gap 1e-4, or the
`time_limit`). Bigger ones (a 96-layer GPT-3 has ~7,000) take the Lagrangian route: without
the byte row the constraints are difference constraints (with x_v = 1 - r_v: s_u >= x_u - x_w),
a totally unimodular system, so the LP for a price lambda per saved byte is integral. A
bisection on lambda brackets the budget between two integral solutions; the connected groups
of nodes on which they differ (one per repeated layer, typically) are independent, and are
moved to the cheaper solution greedily, best cost-per-byte first, while the budget allows. The
gap against the LP relaxation with the byte row is reported.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .budget import RematError
from .problem import RematProblem


@dataclasses.dataclass
class RematSolution:
    saved: list[str]
    recomputed: list[str]  # candidates the backward recomputes, in forward order
    saved_bytes: float
    full_bytes: float
    recompute_seconds: float
    recompute_flops: float
    gap: float  # relative MIP gap at termination (0: proven optimal)
    solve_seconds: float


def closure(problem: RematProblem, saved: set[str]) -> list[str]:
    """The candidates the backward must recompute when exactly `saved` is kept."""
    need: set[str] = set()
    stack = [n for n in problem.needed if n not in saved]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(u for u in problem.candidates[n].inputs if u not in saved and u not in need)
    return [n for n in problem.candidates if n in need]


def evaluate(problem: RematProblem, saved: set[str], seconds: float = 0.0,
             gap: float = 0.0) -> RematSolution:
    rec = closure(problem, saved)
    bad = [n for n in rec if not problem.candidates[n].recompute]
    if bad:
        raise RematError(f"saved set leaves {bad[0]} to be recomputed, which may not be "
                         f"(a random, mutating or collective op)")
    c = problem.candidates
    kept = [n for n in c if n in saved]
    return RematSolution(
        saved=kept, recomputed=rec,
        saved_bytes=problem.storage_bytes(kept), full_bytes=problem.full_bytes,
        recompute_seconds=sum(c[n].cost for n in rec),
        recompute_flops=sum(c[n].flops for n in rec), gap=gap, solve_seconds=seconds)


def _model(problem: RematProblem):
    names = list(problem.candidates)
    idx = {n: i for i, n in enumerate(names)}
    k = len(names)
    rows, cols, vals, lo = [], [], [], []

    def row(entries, lb):
        r = len(lo)
        for col, v in entries:
            rows.append(r)
            cols.append(col)
            vals.append(v)
        lo.append(lb)

    for n in problem.needed:
        i = idx[n]
        row([(i, 1.0), (k + i, 1.0)], 1.0)
    for n, cand in problem.candidates.items():
        v = idx[n]
        for u in cand.inputs:
            j = idx[u]
            row([(j, 1.0), (k + j, 1.0), (k + v, -1.0)], 0.0)
    a = coo_matrix((vals, (rows, cols)), shape=(len(lo), 2 * k)).tocsr()
    nbytes = np.array([problem.candidates[n].nbytes for n in names])
    cost = np.array([problem.candidates[n].cost for n in names])
    upper = np.ones(2 * k)
    for n, cand in problem.candidates.items():
        if not cand.tensor or cand.base is not None:
            upper[idx[n]] = 0.0
        if not cand.recompute:
            upper[k + idx[n]] = 0.0
    return names, a, np.array(lo), nbytes, cost, upper


def _run(c, constraints, upper, time_limit):
    return milp(c, constraints=constraints, integrality=np.ones(len(c)),
                bounds=Bounds(np.zeros(len(c)), upper),
                options={"time_limit": time_limit, "mip_rel_gap": 1e-4, "presolve": True})


def smallest_feasible(problem: RematProblem, time_limit: float = 10.0) -> float:
    """The fewest saved bytes any valid saved set needs (the budget's floor)."""
    names, a, lo, nbytes, _, upper = _model(problem)
    if not names:
        return 0.0
    k = len(names)
    c = np.concatenate([nbytes, np.zeros(k)])
    # without the byte row the system is totally unimodular (lagrangian.py): the LP is integral
    res = milp(c, constraints=[LinearConstraint(a, lo, np.inf)], bounds=Bounds(0, upper))
    if res.x is None:
        raise RematError("no saved set is valid for this graph (a value the backward reads "
                         "can neither be saved nor recomputed)")
    return float(res.fun)


EXACT_LIMIT = 3000


def solve(problem: RematProblem, budget_bytes: float, time_limit: float = 10.0,
          exact: bool | None = None) -> RematSolution:
    """`exact`: force the MILP (True) or the Lagrangian (False); None picks by size."""
    t0 = time.perf_counter()
    names, a, lo, nbytes, cost, upper = _model(problem)
    k = len(names)
    if k == 0:
        return evaluate(problem, set(), time.perf_counter() - t0)
    if exact is False or (exact is None and k > EXACT_LIMIT):
        from .lagrangian import solve_lagrangian

        saved, gap = solve_lagrangian(problem, (names, a, lo, nbytes, cost, upper), budget_bytes)
        if saved is None:
            _infeasible(problem, budget_bytes, time_limit)
        return evaluate(problem, saved, time.perf_counter() - t0, gap)
    scale = max(float(cost.max()), 1e-12)
    tie = 1e-9 * scale / max(float(nbytes.sum()), 1.0)
    # normalised, so that HiGHS's absolute gap tolerance (1e-6) is not most of a small cost
    c = np.concatenate([tie * nbytes, cost]) / scale
    cons = [LinearConstraint(a, lo, np.inf),
            LinearConstraint(np.concatenate([nbytes, np.zeros(k)])[None, :], -np.inf,
                             budget_bytes)]
    res = _run(c, cons, upper, time_limit)
    if res.x is None:
        _infeasible(problem, budget_bytes, time_limit)
    saved = {names[i] for i in range(k) if res.x[i] > 0.5}
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    return evaluate(problem, saved, time.perf_counter() - t0, gap)


def _infeasible(problem: RematProblem, budget_bytes: float, time_limit: float):
    floor = smallest_feasible(problem, time_limit)
    raise RematError(
        f"memory_budget: no saved set keeps at most {budget_bytes:,.0f} bytes; the "
        f"smallest feasible budget is {floor:,.0f} bytes "
        f"({floor / max(problem.full_bytes, 1):.4f} of the {problem.full_bytes:,.0f} that "
        f"saving everything needs): values that may not be recomputed (random ops) "
        f"must be kept")
