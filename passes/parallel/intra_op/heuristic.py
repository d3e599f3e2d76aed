"""Primal heuristic for the intra-op MILP: LP rounding, memory repair, local search.

The LP relaxation of the marginal formulation is usually tight (often integral without a
memory budget); what makes branch and bound slow on big problems is finding a good feasible
plan, especially when identical layers make many plans equivalent. Starting from the LP
solution this heuristic

1. picks each node's largest LP value;
2. while over the memory budget, applies the switch with the least extra time per byte saved
   (time measured with the neighbours' current choices);
3. repeatedly moves single nodes to their best strategy given their neighbours, keeping the
   budget, until nothing improves.

The result is an upper bound; together with the LP lower bound it either proves the plan
within the requested gap or seeds the MILP with an objective cutoff.
"""

from __future__ import annotations

import numpy as np

from .reduce import Reduced

_MAX_PASSES = 50


def local_cost(red: Reduced, v: int, choice: dict[int, int]) -> np.ndarray:
    """Cost of each strategy of `v` given the neighbours' current (local) choices."""
    cost = red.unary[v].copy()
    for u in red.adj[v]:
        cost = cost + red.edge(v, u)[:, choice[u]]
    return cost


def reduced_objective(red: Reduced, choice: dict[int, int]) -> float:
    """Objective of a choice on the reduced problem, without the folded constant."""
    total = sum(float(red.unary[v][choice[v]]) for v in choice)
    for (a, b), m in red.edges.items():
        total += float(m[choice[a], choice[b]])
    return total


def _repair(red: Reduced, choice: dict[int, int], mem: float, budget: float) -> float | None:
    """Lower memory to the budget by cheapest time-per-byte switches; new memory or None."""
    while mem > budget:
        best: tuple[float, int, int] | None = None
        for v, c in choice.items():
            saved = red.mem[v][c] - red.mem[v]
            cost = local_cost(red, v, choice)
            ok = (saved > 0) & np.isfinite(cost)
            if not ok.any():
                continue
            with np.errstate(invalid="ignore"):
                delta = cost - cost[c]  # -inf: leaves an infinite-cost pair, most welcome
            ratio = np.where(ok & ~np.isnan(delta), delta / np.where(ok, saved, 1.0), np.inf)
            k = int(np.argmin(ratio))
            if best is None or ratio[k] < best[0]:
                best = (float(ratio[k]), v, k)
        if best is None:
            return None
        _, v, k = best
        mem += float(red.mem[v][k] - red.mem[v][choice[v]])
        choice[v] = k
    return mem


def _improve(red: Reduced, choice: dict[int, int], mem: float, budget: float | None) -> None:
    """First-improvement single-node moves that keep the budget."""
    for _ in range(_MAX_PASSES):
        changed = False
        for v, c in choice.items():
            cost = local_cost(red, v, choice)
            if budget is not None:
                cost = np.where(mem + red.mem[v] - red.mem[v][c] <= budget, cost, np.inf)
            k = int(np.argmin(cost))
            cur = cost[c]
            if np.isfinite(cur):
                better = cost[k] < cur - 1e-12 * abs(cur)
            else:
                better = bool(np.isfinite(cost[k]))
            if better:
                mem += float(red.mem[v][k] - red.mem[v][c])
                choice[v] = k
                changed = True
        if not changed:
            return


def lp_guided_plan(
    red: Reduced, lp_values: dict[int, np.ndarray], budget: float | None
) -> dict[int, int] | None:
    """A feasible choice (local strategy indices) near the LP solution, or None."""
    choice = {v: int(np.argmax(x)) for v, x in lp_values.items()}
    mem = float(sum(red.mem[v][k] for v, k in choice.items()))
    if budget is not None:
        repaired = _repair(red, choice, mem, budget)
        if repaired is None:
            return None
        mem = repaired
    _improve(red, choice, mem, budget)
    if not np.isfinite(reduced_objective(red, choice)):
        return None
    return choice
