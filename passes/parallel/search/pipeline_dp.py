"""The stage-partition dynamic program behind `pipeline.plan_pipeline`.

State (j, k, d): layers k.. remain to be placed on d devices and j stages remain (j < K),
or at least K remain (j = K). K = B for 1F1B (stage i of S holds min(B, S - i) micro-batches,
so only "how many stages remain, capped at B" matters) and K = 1 for GPipe (always B).

    F[j, k, d] = min_{e > k, m} t_j(k, e, m) + F[next(j), e, d - |m|]

where t_j is the stage time, or inf when above t_max or over the memory budget with j's
in-flight count, and next(j) = j - 1 (or either K - 1 or K from the capped state K). Rows k
are filled from the last layer backwards, each row in one vectorised min over (e, m).

`search` minimises F(t_max) + (B - 1) t_max over the sorted distinct stage times by
bisection: F is non-increasing in t_max, so on a range of candidates whose ends have the same
F the left end is best, and a range is dropped once F(right) + (B - 1) t(left) cannot beat the
best latency found. Only the candidates around the steps of F get a DP.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..cost.optimizer_shard import inflight_microbatches
from ..cost.pipeline_costs import StageCostTable


def num_states(schedule: str, b: int, smax: int) -> int:
    return 1 if schedule == "gpipe" else max(1, min(b, smax))


def masked_times(
    table: StageCostTable, b: int, schedule: str, k_states: int, budget: float | None
) -> np.ndarray:
    """[K + 1, L, L + 1, M] stage times with memory-infeasible entries set to inf."""
    out = np.full((k_states + 1, *table.time.shape), np.inf)
    for j in range(1, k_states + 1):
        if budget is None:
            out[j] = table.time
            continue
        inflight = inflight_microbatches(schedule, b, j, 0)
        mem = table.weight_memory + inflight * table.activation_memory
        out[j] = np.where(mem <= budget * (1 + 1e-9), table.time, np.inf)
    return out


def _next_rows(f: np.ndarray, e: int) -> np.ndarray:
    """For each state j = 1..K, the best F of the state that follows it, at layer e."""
    nxt = f[:-1, e, :].copy()
    nxt[-1] = np.minimum(f[-2, e, :], f[-1, e, :])
    return nxt


def run_dp(times: np.ndarray, sizes: np.ndarray, n_dev: int) -> np.ndarray:
    """F[j, k, d] for capped stage times `times` ([K + 1, L, L + 1, M])."""
    k_states, n_layers, n_sub = times.shape[0] - 1, times.shape[1], times.shape[3]
    f = np.full((k_states + 1, n_layers + 1, n_dev + 1), np.inf)
    f[0, n_layers, 0] = 0.0
    # h[j, m, e, d] = F[next(j), e, d - size_m]
    h = np.full((k_states, n_sub, n_layers + 1, n_dev + 1), np.inf)

    def fill(e: int) -> None:
        nxt = _next_rows(f, e)
        for m, size in enumerate(sizes):
            if size <= n_dev:
                h[:, m, e, size:] = nxt[:, : n_dev + 1 - size]

    fill(n_layers)
    for k in range(n_layers - 1, -1, -1):
        t = times[1:, k, k + 1 :, :].transpose(0, 2, 1)  # [K, M, E]
        cand = t[:, :, :, None] + h[:, :, k + 1 :, :]  # [K, M, E, D + 1]
        f[1:, k, :] = cand.reshape(k_states, -1, n_dev + 1).min(axis=1)
        fill(k)
    return f


def best_total(f: np.ndarray, n_dev: int) -> float:
    return float(f[1:, 0, n_dev].min())


def backtrack(
    times: np.ndarray, sizes: np.ndarray, n_dev: int, f: np.ndarray
) -> list[tuple[int, int, int]]:
    """Stages (start, end, submesh index) of the plan achieving `best_total`."""
    j = int(np.argmin(f[1:, 0, n_dev])) + 1
    k, d, out = 0, n_dev, []
    n_layers = times.shape[1]
    while k < n_layers:
        best, arg = math.inf, None
        for e in range(k + 1, n_layers + 1):
            for m, size in enumerate(sizes):
                if size > d:
                    continue
                nxt = [j - 1] if j < f.shape[0] - 1 else [j - 1, j]
                for jn in nxt:
                    v = times[j, k, e, m] + f[jn, e, d - size]
                    if v < best:
                        best, arg = v, (e, m, jn)
        if arg is None:
            raise AssertionError("pipeline DP backtrack found no stage")
        e, m, j = arg
        out.append((k, e, m))
        k, d = e, d - int(sizes[m])
    return out


def search(
    base: np.ndarray, sizes: np.ndarray, n_dev: int, b: int, best_latency: float,
    rel_gap: float = 0.0,
    deadline: float | None = None,
) -> tuple[float, float] | None:
    """(latency, t_max) of the best plan if it beats `best_latency`, else None. Past
    `deadline` (time.perf_counter()) the bisection stops with the best found so far."""
    finite = base[np.isfinite(base)]
    if finite.size == 0:
        return None
    cands = np.unique(finite)
    if rel_gap > 0:  # thin out candidates closer than rel_gap (keeps the largest)
        keep = np.append(cands[1:] > cands[:-1] * (1 + rel_gap), True)
        cands = cands[keep]
    cache: dict[int, float] = {}

    def total(i: int) -> float:
        if i not in cache:
            capped = np.where(base <= cands[i], base, np.inf)
            cache[i] = best_total(run_dp(capped, sizes, n_dev), n_dev)
        return cache[i]

    found: list[tuple[float, float]] = []
    stack = [(0, len(cands) - 1)]
    while stack:
        if deadline is not None and found and time.perf_counter() > deadline:
            break
        lo, hi = stack.pop()
        f_lo, f_hi = total(lo), total(hi)
        if f_hi + (b - 1) * cands[lo] >= best_latency:
            continue
        for i, fv in ((lo, f_lo), (hi, f_hi)):
            lat = fv + (b - 1) * float(cands[i])
            if lat < best_latency:
                best_latency = lat
                found.append((lat, float(cands[i])))
        if f_lo == f_hi or hi - lo <= 1:
            continue
        mid = (lo + hi) // 2
        stack += [(mid, hi), (lo, mid)]  # left half first: smaller t_max, tighter bounds
    return found[-1] if found else None
