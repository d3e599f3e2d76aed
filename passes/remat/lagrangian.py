"""The budgeted saved set for big graphs: Lagrangian bisection, then mixing per layer.

    saved, gap = solve_lagrangian(problem, model, budget_bytes)

For a price lambda per saved byte, min sum cost*r + lambda * sum nbytes*s over the closure
constraints is an LP with an integral optimum (solve.py's docstring says why), solved by HiGHS
in a fraction of a second on a 96-layer graph. Bisection on lambda finds the cheapest solution
within the budget (`hi`) and the most frugal one above it (`lo`). Where they differ, the
differing nodes fall into connected groups (of the joint graph restricted to them) that can be
switched independently: every constraint between a group and the rest holds in both solutions.
Groups move from `hi` to `lo` by best recompute saved per byte added, while the budget allows.
The gap is measured against the LP relaxation of the full problem (the byte row included).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .problem import RematProblem


def _lp(c, a, lo, upper, extra=()):
    res = milp(c, constraints=[LinearConstraint(a, lo, np.inf), *extra],
               bounds=Bounds(np.zeros(len(c)), upper))
    return res


def _groups(problem: RematProblem, names: list[str], differ: np.ndarray) -> list[list[int]]:
    idx = {n: i for i, n in enumerate(names)}
    parent = list(range(len(names)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for n, cand in problem.candidates.items():
        v = idx[n]
        if not differ[v]:
            continue
        for u in cand.inputs:
            j = idx[u]
            if differ[j]:
                parent[find(j)] = find(v)
    out: dict[int, list[int]] = {}
    for i in np.flatnonzero(differ):
        out.setdefault(find(int(i)), []).append(int(i))
    return list(out.values())


def solve_lagrangian(problem: RematProblem, model, budget: float, iters: int = 24):
    names, a, lo, nbytes, cost, upper = model
    k = len(names)
    scale = max(float(cost.sum()), 1e-12) / max(float(nbytes.sum()), 1.0)

    def at(lam):
        c = np.concatenate([lam * nbytes, cost + 1e-12 * scale])
        res = _lp(c / max(float(c.max()), 1e-30), a, lo, upper)  # normalised for the tolerances
        x = np.round(res.x)
        return x, float(nbytes @ x[:k]), float(cost @ x[k:])

    best_hi = best_lo = None
    x, b, _ = at(1e-6 * scale)
    if b <= budget:
        return _saved(names, x, k), 0.0
    best_lo = x
    lam_lo, lam_hi = np.log(1e-6 * scale), np.log(1e6 * scale)
    x, b, _ = at(np.exp(lam_hi))
    if b > budget:
        return None, 0.0
    best_hi = x
    for _ in range(iters):
        mid = 0.5 * (lam_lo + lam_hi)
        x, b, _ = at(np.exp(mid))
        if b <= budget:
            lam_hi, best_hi = mid, x
        else:
            lam_lo, best_lo = mid, x
    x = _mix(problem, names, best_hi, best_lo, nbytes, cost, budget)
    # the LP relaxation with the byte row bounds the optimum from below
    row = LinearConstraint(np.concatenate([nbytes, np.zeros(k)])[None, :], -np.inf, budget)
    cmax = max(float(cost.max()), 1e-30)
    relaxed = _lp(np.concatenate([np.zeros(k), cost / cmax]), a, lo, upper, [row])
    got = float(cost @ x[k:])
    bound = float(relaxed.fun) * cmax if relaxed.x is not None else got
    gap = 0.0 if got <= 0 else max(0.0, (got - bound) / got)
    return _saved(names, x, k), gap


def _mix(problem, names, hi, lo, nbytes, cost, budget):
    k = len(names)
    x = hi.copy()
    differ = (hi[:k] != lo[:k]) | (hi[k:] != lo[k:])
    moves = []
    for g in _groups(problem, names, differ):
        cols = np.array(g)
        d_bytes = float(nbytes[cols] @ (lo[cols] - hi[cols]))
        d_cost = float(cost[cols] @ (lo[k + cols] - hi[k + cols]))
        if d_cost < 0 or (d_cost <= 0 and d_bytes < 0):  # only moves that recompute less
            moves.append((d_cost / d_bytes if d_bytes > 0 else -np.inf, cols, d_bytes))
    used = float(nbytes @ x[:k])
    for _, cols, d_bytes in sorted(moves, key=lambda m: m[0]):
        if used + d_bytes <= budget:
            x[cols], x[k + cols] = lo[cols], lo[k + cols]
            used += d_bytes
    return x


def _saved(names, x, k) -> set[str]:
    return {names[i] for i in range(k) if x[i] > 0.5}
