"""Exact preprocessing of an `IntraOpProblem` before the MILP.

All reductions keep at least one optimal assignment (and, when a memory budget is set, the
memory-minimal one too):

* pins and infinite costs shrink strategy lists (arc consistency: a strategy whose row is all
  `inf` on some edge can never be used);
* a strategy is dropped when another is no worse in time, memory and every incident edge row;
* single-strategy nodes are folded into their neighbours' unary costs and a constant;
* nodes of degree 0, 1 or 2 whose strategies all use the same memory are eliminated by
  dynamic programming (leaf: min over its strategies per neighbour strategy; degree 2: the
  min-plus product becomes an edge between its neighbours). With no memory budget this
  collapses chains and trees entirely.

Eliminations are recorded on a trail and replayed backwards to recover the full choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import numpy as np

from .problem import IntraOpProblem, NoFeasiblePlanError

_MAX_PAIR_TABLE = 2_000_000  # elements of the a x v x b tensor of a degree-2 elimination


@dataclasses.dataclass
class Reduced:
    names: list[Hashable]
    n_orig: list[int]
    alive: dict[int, np.ndarray]  # node -> original strategy ids still possible
    unary: dict[int, np.ndarray]  # weighted compute + comm (+ folded edges)
    mem: dict[int, np.ndarray]  # weighted memory
    edges: dict[tuple[int, int], np.ndarray]  # (a, b) with a < b: [len(alive a), len(alive b)]
    adj: dict[int, set[int]]
    memory_matters: bool
    const_cost: float = 0.0
    const_mem: float = 0.0
    trail: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------ edge helpers
    def edge(self, a: int, b: int) -> np.ndarray:
        """Cost matrix with `a`'s strategies on rows."""
        return self.edges[(a, b)] if a < b else self.edges[(b, a)].T

    def add_edge(self, a: int, b: int, m: np.ndarray) -> None:
        key, m = ((a, b), m) if a < b else ((b, a), m.T)
        self.edges[key] = self.edges[key] + m if key in self.edges else np.array(m, dtype=float)
        self.adj[a].add(b)
        self.adj[b].add(a)

    def drop_edge(self, a: int, b: int) -> None:
        self.edges.pop((min(a, b), max(a, b)))
        self.adj[a].discard(b)
        self.adj[b].discard(a)

    def drop_node(self, v: int) -> None:
        for u in list(self.adj[v]):
            self.drop_edge(v, u)
        for d in (self.alive, self.unary, self.mem, self.adj):
            d.pop(v)

    def restrict(self, v: int, keep: np.ndarray) -> None:
        """Keep only the strategies of `v` where the boolean mask `keep` is set."""
        if not keep.any():
            raise NoFeasiblePlanError(
                f"node {self.names[v]!r}: every strategy has infinite cost given its "
                "neighbours (check pins and forbidden resharding pairs)"
            )
        self.alive[v] = self.alive[v][keep]
        self.unary[v] = self.unary[v][keep]
        self.mem[v] = self.mem[v][keep]
        for u in self.adj[v]:
            key = (min(u, v), max(u, v))
            self.edges[key] = self.edges[key][keep, :] if v < u else self.edges[key][:, keep]

    def const_memory(self, v: int) -> bool:
        m = self.mem[v]
        return not self.memory_matters or bool(np.all(m == m[0]))


def build(problem: IntraOpProblem, memory_matters: bool) -> Reduced:
    problem.validate()
    idx = problem.index()
    red = Reduced(
        names=[n.name for n in problem.nodes],
        n_orig=[len(n.strategies) for n in problem.nodes],
        alive={}, unary={}, mem={}, edges={}, adj={}, memory_matters=memory_matters,
    )
    for v, n in enumerate(problem.nodes):
        red.alive[v] = np.arange(len(n.strategies))
        red.unary[v] = n.weight * np.array([s.time for s in n.strategies], dtype=float)
        red.mem[v] = n.weight * np.array([s.memory_bytes for s in n.strategies], dtype=float)
        red.adj[v] = set()
    for e in problem.edges:
        w = problem.edge_weight(e, idx)  # inf stays a prohibition even with weight 0
        red.add_edge(idx[e.src], idx[e.dst], np.where(np.isinf(e.cost), np.inf, w * e.cost))
    for name, k in problem.pins.items():
        v = idx[name]
        red.restrict(v, red.alive[v] == k)
    return red


def prune_infinite(red: Reduced) -> bool:
    """Arc consistency on `inf` costs; returns whether anything changed."""
    changed, work = False, set(red.alive)
    while work:
        v = work.pop()
        keep = np.isfinite(red.unary[v])
        for u in red.adj[v]:
            keep &= np.isfinite(red.edge(v, u)).any(axis=1)
        if not keep.all():
            red.restrict(v, keep)
            work |= red.adj[v]
            changed = True
    return changed


def remove_dominated(red: Reduced, v: int) -> bool:
    """Drop strategies of `v` that another strategy matches or beats everywhere."""
    if len(red.alive[v]) < 2:
        return False
    cols = [red.unary[v][:, None]]
    if red.memory_matters:
        cols.append(red.mem[v][:, None])
    cols += [red.edge(v, u) for u in sorted(red.adj[v])]
    feat = np.concatenate(cols, axis=1)
    le = np.all(feat[:, None, :] <= feat[None, :, :], axis=2)  # le[k, i]: k no worse than i
    n = len(feat)
    older = np.arange(n)[:, None] < np.arange(n)[None, :]
    beats = le & (~le.T | older)
    np.fill_diagonal(beats, False)
    dominated = beats.any(axis=0)
    if not dominated.any():
        return False
    red.restrict(v, ~dominated)
    return True


def fold_fixed(red: Reduced, v: int) -> None:
    """Remove a node whose strategy is decided, moving its costs to neighbours/constants."""
    k = int(np.argmin(red.unary[v])) if len(red.alive[v]) > 1 else 0
    red.const_cost += float(red.unary[v][k])
    red.const_mem += float(red.mem[v][k])
    for u in red.adj[v]:
        red.unary[u] = red.unary[u] + red.edge(u, v)[:, k]
    red.trail.append(("fixed", v, int(red.alive[v][k])))
    red.drop_node(v)


def eliminate_leaf(red: Reduced, v: int, u: int) -> None:
    """Fold degree-1 node `v` into its neighbour `u`."""
    t = red.edge(u, v) + red.unary[v][None, :]
    best = np.argmin(t, axis=1)
    red.unary[u] = red.unary[u] + t[np.arange(len(best)), best]
    table = np.full(red.n_orig[u], -1)
    table[red.alive[u]] = red.alive[v][best]
    red.const_mem += float(red.mem[v][0])
    red.trail.append(("leaf", v, u, table))
    red.drop_node(v)


def eliminate_pair(red: Reduced, v: int, a: int, b: int) -> bool:
    """Fold degree-2 node `v` into an edge between `a` and `b` if that is not bigger."""
    sa, sv, sb = len(red.alive[a]), len(red.alive[v]), len(red.alive[b])
    exists = (min(a, b), max(a, b)) in red.edges
    if sa * sv * sb > _MAX_PAIR_TABLE or (not exists and sa * sb > sv * (sa + sb + 1)):
        return False
    t = red.edge(a, v)[:, :, None] + red.unary[v][None, :, None] + red.edge(v, b)[None, :, :]
    best = np.argmin(t, axis=1)
    mins = np.take_along_axis(t, best[:, None, :], axis=1)[:, 0, :]
    table = np.full((red.n_orig[a], red.n_orig[b]), -1)
    table[np.ix_(red.alive[a], red.alive[b])] = red.alive[v][best]
    red.const_mem += float(red.mem[v][0])
    red.trail.append(("pair", v, a, b, table))
    red.drop_node(v)
    red.add_edge(a, b, mins)
    return True


def eliminate(red: Reduced, v: int) -> bool:
    """Try single-strategy folding, then low-degree elimination, on node `v`."""
    if len(red.alive[v]) == 1:
        fold_fixed(red, v)
        return True
    if not red.const_memory(v):
        return False
    nbrs = sorted(red.adj[v])
    if not nbrs:
        fold_fixed(red, v)
        return True
    if len(nbrs) == 1:
        eliminate_leaf(red, v, nbrs[0])
        return True
    if len(nbrs) == 2:
        return eliminate_pair(red, v, nbrs[0], nbrs[1])
    return False


def reduce_problem(problem: IntraOpProblem, memory_matters: bool, simplify: bool = True) -> Reduced:
    """Build the reduced problem; with `simplify=False` only pins and `inf` pruning run."""
    red = build(problem, memory_matters)
    prune_infinite(red)
    changed = simplify
    while changed:
        changed = False
        for v in list(red.alive):
            changed |= remove_dominated(red, v)
        for v in list(red.alive):
            if v in red.alive:
                changed |= eliminate(red, v)
        changed |= prune_infinite(red)
    return red


def expand_choice(red: Reduced, partial: dict[int, int]) -> list[int]:
    """Full original-strategy choice from the choice of the nodes left in `red`."""
    choice = [-1] * len(red.names)
    for v, k in partial.items():
        choice[v] = k
    for rec in reversed(red.trail):
        kind, v = rec[0], rec[1]
        if kind == "fixed":
            choice[v] = rec[2]
        elif kind == "leaf":
            choice[v] = int(rec[3][choice[rec[2]]])
        else:
            choice[v] = int(rec[4][choice[rec[2]], choice[rec[3]]])
    if min(choice) < 0:
        raise AssertionError("expand_choice: a node was left undecided")
    return choice
