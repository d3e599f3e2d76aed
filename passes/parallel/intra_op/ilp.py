"""Intra-operator parallelism as a mixed-integer linear program, solved by HiGHS.

Formulation (after the exact reductions of ilp_reduce.py): a binary s[v,i] per node strategy
with sum_i s[v,i] = 1, and per edge (a, b) continuous e[ij] >= 0 for every finite pair, tied
to the node choices by the marginal constraints

    sum_j e[ij] = s[a,i]   for every i,        sum_i e[ij] = s[b,j]   for every j.

With integral s these force e to the indicator of the chosen pair, so the edge variables need
no integrality and `inf` pairs simply get no variable. This is the tight (local polytope)
linearisation of the quadratic edge terms: its LP relaxation is never weaker than the
classic e <= s_a, e <= s_b, e >= s_a + s_b - 1 form and has fewer rows.

    minimise   sum unary[v,i] s[v,i] + sum C[ij] e[ij]
    subject to sum mem[v,i] s[v,i] <= budget - (memory of eliminated nodes)

Edges whose strategies share identical cost rows (columns) share one marginal row, which
is exact and keeps the model small. Costs and the memory row are rescaled to O(1) for the
solver; the reported objective is re-evaluated on the original problem.

Solve path: LP relaxation (lower bound) -> LP-guided plan (ilp_heuristic.py, upper bound)
-> done if within the gap, else the MILP with that plan's objective as HiGHS' cutoff. If the
budget cannot be met, a second MILP minimising memory gives the smallest budget that would
work, carried by `NoFeasiblePlanError`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .clustering import LayerCluster, cluster_layers, expand_clusters
from .heuristic import lp_guided_plan, reduced_objective
from .problem import (
    Edge,
    IntraOpProblem,
    IntraOpSolution,
    Node,
    NoFeasiblePlanError,
    Strategy,
    brute_force_solve,
    memory_fits,
)
from .reduce import Reduced, expand_choice, reduce_problem

__all__ = [
    "Edge",
    "IntraOpProblem",
    "IntraOpSolution",
    "LayerCluster",
    "NoFeasiblePlanError",
    "Node",
    "Strategy",
    "brute_force_solve",
    "cluster_layers",
    "expand_clusters",
    "min_memory",
    "solve_intra_op",
]


class _Milp:
    """Sparse MILP over the nodes and edges left in a `Reduced` problem."""

    def __init__(self, red: Reduced, objective: str) -> None:
        self.nodes = sorted(red.alive)
        self.offset: dict[int, int] = {}
        c: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        nvar = nrow = 0
        for v in self.nodes:  # s variables and their "choose one" rows
            k = len(red.alive[v])
            self.offset[v] = nvar
            c.append(red.unary[v] if objective == "time" else red.mem[v])
            rows.append(np.full(k, nrow))
            cols.append(np.arange(nvar, nvar + k))
            vals.append(np.ones(k))
            nvar, nrow = nvar + k, nrow + 1
        self.n_choice_rows, self.n_s = nrow, nvar
        for (a, b), m in red.edges.items():
            # Strategies with identical rows (columns) share one marginal: exact and smaller.
            urows, row_of = np.unique(m, axis=0, return_inverse=True)
            small, col_of = np.unique(urows, axis=1, return_inverse=True)
            ii, jj = np.nonzero(np.isfinite(small))
            ne = len(ii)
            evars = np.arange(nvar, nvar + ne)
            c.append(small[ii, jj] if objective == "time" else np.zeros(ne))
            # one row per row group of a, then per column group of b: sum e - sum s = 0
            for idx, owner, group_of in ((ii, a, row_of), (jj, b, col_of)):
                group_of = np.ravel(group_of)
                rows += [nrow + idx, nrow + group_of]
                cols += [evars, self.offset[owner] + np.arange(len(group_of))]
                vals += [np.ones(ne), -np.ones(len(group_of))]
                nrow += int(group_of.max()) + 1
            nvar += ne
        self.c = np.concatenate(c) if c else np.zeros(0)
        self.nvar, self.nrow = nvar, nrow
        self.A = sparse.csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(nrow, nvar),
        )
        self.lb = np.zeros(nrow)
        self.lb[: self.n_choice_rows] = 1.0
        self.ub = self.lb.copy()
        self.mem_row = np.concatenate([red.mem[v] for v in self.nodes])

    def solve(
        self, budget: float | None, time_limit: float | None, gap: float,
        mem_scale: float = 1.0, relax: bool = False, cutoff: float | None = None,
    ) -> tuple[Any, float]:
        """Run HiGHS; `cutoff` (in scaled objective units) prunes plans no better than it."""
        constraints = [LinearConstraint(self.A, self.lb, self.ub)]
        if budget is not None:
            scale = max(mem_scale, 1.0)
            row = np.zeros(self.nvar)
            row[: self.n_s] = self.mem_row / scale
            constraints.append(LinearConstraint(row[None, :], -np.inf, budget / scale))
        integrality = np.zeros(self.nvar)
        if not relax:
            integrality[: self.n_s] = 1
        options: dict[str, Any] = {"mip_rel_gap": gap, "disp": False}
        if time_limit is not None:
            options["time_limit"] = max(time_limit, 0.01)
        if cutoff is not None:
            options["objective_bound"] = cutoff  # a HiGHS option scipy passes through
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unrecognized options")
            res = milp(self.c / self.cscale, integrality=integrality, bounds=Bounds(0, 1),
                       constraints=constraints, options=options)
        return res, self.cscale

    @property
    def cscale(self) -> float:
        return float(np.abs(self.c).max(initial=0.0)) or 1.0

    def node_values(self, red: Reduced, x: np.ndarray) -> dict[int, np.ndarray]:
        return {v: x[self.offset[v] : self.offset[v] + len(red.alive[v])] for v in self.nodes}

    def decode(self, red: Reduced, x: np.ndarray) -> dict[int, int]:
        vals = self.node_values(red, x)
        return {v: int(red.alive[v][int(np.argmax(vals[v]))]) for v in self.nodes}


def _solve_reduced(
    red: Reduced, budget: float | None, mem_scale: float, time_limit: float | None,
    gap: float, stats: dict[str, Any],
) -> tuple[dict[int, int] | None, str]:
    """LP bound, LP-guided plan, then (if the gap is not closed) the MILP with a cutoff.

    Returns (original strategy per remaining node, status) or (None, "infeasible").
    """
    t0 = time.perf_counter()
    model = _Milp(red, "time")
    stats.update(variables=model.nvar, constraints=model.nrow + (budget is not None))
    lp, scale = model.solve(budget, time_limit, gap, mem_scale, relax=True)
    if lp.status == 2:
        return None, "infeasible"
    inc = ub = None
    if lp.x is not None:
        stats["lp_bound"] = float(lp.fun) * scale + red.const_cost
        inc = lp_guided_plan(red, model.node_values(red, lp.x), budget)
    if inc is not None:
        ub = reduced_objective(red, inc) / scale
        stats["heuristic_gap"] = (ub - lp.fun) / max(abs(ub), 1e-300)
        if ub - lp.fun <= gap * abs(ub) + 1e-12:
            stats.update(method="lp+heuristic", lp_seconds=time.perf_counter() - t0)
            return {v: int(red.alive[v][k]) for v, k in inc.items()}, "optimal"
    left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
    cutoff = None if ub is None else ub + 1e-9 * abs(ub) + 1e-12
    res, _ = model.solve(budget, left, gap, mem_scale, cutoff=cutoff)
    stats.update(method="milp", milp_seconds=time.perf_counter() - t0)
    if res.x is not None and (ub is None or res.fun < ub):
        return model.decode(red, res.x), "optimal" if res.status == 0 else "time_limit"
    if inc is not None:  # HiGHS found nothing better than the cutoff (status 2) or ran out
        return {v: int(red.alive[v][k]) for v, k in inc.items()}, (
            "optimal" if res.status in (0, 2) else "time_limit")
    if res.status == 2:
        return None, "infeasible"
    raise RuntimeError(f"solve_intra_op: HiGHS stopped without a solution: {res.message}")


def _min_memory_of(red: Reduced, time_limit: float | None) -> float:
    if not red.alive:
        return red.const_mem
    model = _Milp(red, "memory")
    res, scale = model.solve(None, time_limit, 1e-9)
    if res.x is None:
        raise NoFeasiblePlanError("no assignment has finite cost (check pins and inf edges)")
    return red.const_mem + float(res.fun) * scale


def min_memory(problem: IntraOpProblem, time_limit: float | None = None) -> float:
    """The smallest total (weighted) memory of any finite-cost assignment."""
    return _min_memory_of(reduce_problem(problem, memory_matters=True), time_limit)


def _raise_infeasible(problem: IntraOpProblem, red: Reduced, time_limit: float | None) -> None:
    need = _min_memory_of(red, time_limit)
    budget = problem.memory_budget
    raise NoFeasiblePlanError(
        f"no strategy assignment fits the memory budget of {budget:.6g} bytes; the minimum "
        f"any assignment needs is {need:.6g} bytes ({need / max(budget or 1.0, 1.0):.3g}x the "
        "budget): raise the budget, add devices or enable sharding/recomputation",
        min_memory_bytes=need, memory_budget=budget,
    )


def solve_intra_op(
    problem: IntraOpProblem,
    *,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-3,
    simplify: bool = True,
) -> IntraOpSolution:
    """Choose one strategy per node minimising total time within the memory budget.

    Solves the LP relaxation, rounds it with `ilp_heuristic.lp_guided_plan` and stops if
    that plan is within `mip_rel_gap` of the LP bound; otherwise runs the MILP with the
    plan's objective as a cutoff. Status "optimal" means proven within `mip_rel_gap`
    (default 1e-3: far below the error of any cost model; pass 0 to prove optimality);
    "time_limit" is the best plan found in `time_limit` seconds; "trivial" means the exact
    preprocessing decided every node. Many identical layers are best clustered first
    (clustering.py): symmetric copies make branch and bound slow, and one weighted
    representative is as small as a single layer.

    Raises `NoFeasiblePlanError` (with `min_memory_bytes`) when the budget cannot be met or
    no assignment has finite cost; `RuntimeError` if HiGHS stops without any solution.
    """
    t0 = time.perf_counter()
    budget = problem.memory_budget
    red = reduce_problem(problem, memory_matters=budget is not None, simplify=simplify)
    t_pre = time.perf_counter() - t0
    stats: dict[str, Any] = {
        "nodes": len(problem.nodes), "edges": len(problem.edges),
        "strategies": sum(red.n_orig), "nodes_after": len(red.alive),
        "edges_after": len(red.edges), "strategies_after": sum(len(a) for a in red.alive.values()),
        "preprocess_seconds": t_pre,
    }
    status = "trivial"
    partial: dict[int, int] = {}
    if red.alive:
        rest = None if budget is None else budget - red.const_mem
        found, status = _solve_reduced(red, rest, abs(budget or 1.0), time_limit, mip_rel_gap,
                                       stats)
        if found is None:
            _raise_infeasible(problem, red, time_limit)
        partial = found
    elif budget is not None and not memory_fits(red.const_mem, budget):
        _raise_infeasible(problem, red, time_limit)
    full = expand_choice(red, partial)
    choice = {n.name: full[i] for i, n in enumerate(problem.nodes)}
    ev = problem.evaluate(choice)
    if not math.isfinite(ev["objective"]) or not memory_fits(ev["memory_bytes"], budget):
        raise AssertionError(f"solve_intra_op: decoded plan is invalid: {ev}")
    return IntraOpSolution(
        choice, ev["objective"], ev["memory_bytes"], ev["compute_time"], ev["comm_time"],
        ev["resharding_time"], status, time.perf_counter() - t0, stats,
    )
