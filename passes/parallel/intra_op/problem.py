"""The intra-operator sharding problem: costs in, a strategy choice per node out.

The planner front end turns a graph into an `IntraOpProblem`: every node has a list of
candidate `Strategy`s (compute time, the node's own collective time, memory), every data edge
a matrix of resharding times between the producer's and consumer's strategies (`inf` forbids
a pair). The solver (ilp.py) minimises

    sum_v w_v * (compute + comm)[choice_v] + sum_(u,v) w_uv * C_uv[choice_u, choice_v]

subject to sum_v w_v * memory[choice_v] <= memory_budget and the pins. A node weight `w_v`
lets one node stand for k identical layers (see clustering.py); an edge's weight defaults to
the smaller weight of its ends.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from meshweave.ir.errors import MeshweaveError


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to execute a node; `data` is the caller's payload (e.g. placements)."""

    name: str = ""
    compute_time: float = 0.0
    comm_time: float = 0.0
    memory_bytes: float = 0.0
    data: Any = dataclasses.field(default=None, compare=False)

    @property
    def time(self) -> float:
        return self.compute_time + self.comm_time


@dataclasses.dataclass
class Node:
    name: Hashable
    strategies: Sequence[Strategy]
    weight: float = 1.0


@dataclasses.dataclass
class Edge:
    src: Hashable
    dst: Hashable
    cost: np.ndarray  # [len(src strategies), len(dst strategies)] seconds
    weight: float | None = None


class NoFeasiblePlanError(MeshweaveError):
    """No strategy assignment satisfies the memory budget (or has finite cost)."""

    def __init__(
        self, message: str, *, min_memory_bytes: float | None = None,
        memory_budget: float | None = None,
    ) -> None:
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes
        self.memory_budget = memory_budget


@dataclasses.dataclass
class IntraOpProblem:
    nodes: list[Node] = dataclasses.field(default_factory=list)
    edges: list[Edge] = dataclasses.field(default_factory=list)
    memory_budget: float | None = None
    pins: dict[Hashable, int] = dataclasses.field(default_factory=dict)

    def add_node(
        self, name: Hashable, strategies: Sequence[Strategy], weight: float = 1.0
    ) -> Node:
        node = Node(name, list(strategies), weight)
        self.nodes.append(node)
        return node

    def add_edge(
        self, src: Hashable, dst: Hashable, cost: Any, weight: float | None = None
    ) -> Edge:
        edge = Edge(src, dst, np.asarray(cost, dtype=float), weight)
        self.edges.append(edge)
        return edge

    def index(self) -> dict[Hashable, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    def edge_weight(self, edge: Edge, idx: Mapping[Hashable, int] | None = None) -> float:
        if edge.weight is not None:
            return edge.weight
        idx = idx or self.index()
        return min(self.nodes[idx[edge.src]].weight, self.nodes[idx[edge.dst]].weight)

    def validate(self) -> None:
        """Check names, matrix shapes, weights and pins; raise ValueError with the culprit."""
        idx = self.index()
        if len(idx) != len(self.nodes):
            raise ValueError("IntraOpProblem: duplicate node names")
        for n in self.nodes:
            if not n.strategies:
                raise ValueError(f"IntraOpProblem: node {n.name!r} has no strategies")
            if not n.weight > 0:
                raise ValueError(f"IntraOpProblem: node {n.name!r} weight must be > 0")
        for e in self.edges:
            for end in (e.src, e.dst):
                if end not in idx:
                    raise ValueError(f"IntraOpProblem: edge endpoint {end!r} is not a node")
            if e.src == e.dst:
                raise ValueError(f"IntraOpProblem: self edge on {e.src!r}")
            want = (len(self.nodes[idx[e.src]].strategies), len(self.nodes[idx[e.dst]].strategies))
            if np.shape(e.cost) != want:
                raise ValueError(
                    f"IntraOpProblem: edge {e.src!r}->{e.dst!r} cost has shape "
                    f"{np.shape(e.cost)}, expected {want}"
                )
            if e.weight is not None and not e.weight >= 0:
                raise ValueError(f"IntraOpProblem: edge {e.src!r}->{e.dst!r} weight must be >= 0")
            if np.isnan(e.cost).any() or (np.asarray(e.cost) < 0).any():
                raise ValueError(f"IntraOpProblem: edge {e.src!r}->{e.dst!r} has NaN/negative cost")
        for name, k in self.pins.items():
            if name not in idx:
                raise ValueError(f"IntraOpProblem: pin on unknown node {name!r}")
            if not 0 <= k < len(self.nodes[idx[name]].strategies):
                raise ValueError(f"IntraOpProblem: pin {name!r}={k} out of range")

    def evaluate(self, choice: Mapping[Hashable, int]) -> dict[str, float]:
        """Objective terms and memory of a full assignment (weights applied)."""
        idx = self.index()
        compute = comm = mem = reshard = 0.0
        for n in self.nodes:
            s = n.strategies[choice[n.name]]
            compute += n.weight * s.compute_time
            comm += n.weight * s.comm_time
            mem += n.weight * s.memory_bytes
        for e in self.edges:
            c = float(e.cost[choice[e.src], choice[e.dst]])
            reshard += c if math.isinf(c) else self.edge_weight(e, idx) * c
        return {
            "objective": compute + comm + reshard, "compute_time": compute,
            "comm_time": comm, "resharding_time": reshard, "memory_bytes": mem,
        }


@dataclasses.dataclass(frozen=True)
class IntraOpSolution:
    choice: dict[Hashable, int]
    objective: float
    memory_bytes: float
    compute_time: float
    comm_time: float
    resharding_time: float
    status: str  # "optimal" | "time_limit" | "trivial" (solved by preprocessing alone)
    solve_seconds: float
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def strategy(self, problem: IntraOpProblem, node: Hashable) -> Strategy:
        return problem.nodes[problem.index()[node]].strategies[self.choice[node]]


def memory_fits(memory: float, budget: float | None) -> bool:
    """Budget check with the same small relative slack the MILP tolerances allow."""
    return budget is None or memory <= budget + 1e-6 * max(abs(budget), 1.0)


def brute_force_solve(problem: IntraOpProblem, max_combinations: int = 2_000_000) -> IntraOpSolution:
    """Exhaustive search (for tests and tiny problems); same contract as `solve_intra_op`."""
    problem.validate()
    sizes = [len(n.strategies) for n in problem.nodes]
    if math.prod(sizes) > max_combinations:
        raise ValueError(f"brute_force_solve: {math.prod(sizes)} combinations is too many")
    names = [n.name for n in problem.nodes]
    ranges = [
        [problem.pins[n.name]] if n.name in problem.pins else range(len(n.strategies))
        for n in problem.nodes
    ]
    best: tuple[float, dict[Hashable, int], dict[str, float]] | None = None
    min_mem = math.inf
    for combo in itertools.product(*ranges):
        choice = dict(zip(names, combo))
        ev = problem.evaluate(choice)
        if not math.isfinite(ev["objective"]):
            continue
        min_mem = min(min_mem, ev["memory_bytes"])
        if not memory_fits(ev["memory_bytes"], problem.memory_budget):
            continue
        if best is None or ev["objective"] < best[0]:
            best = (ev["objective"], choice, ev)
    if best is None:
        raise NoFeasiblePlanError(
            "brute force: no feasible assignment", memory_budget=problem.memory_budget,
            min_memory_bytes=min_mem if math.isfinite(min_mem) else None,
        )
    ev = best[2]
    return IntraOpSolution(
        best[1], ev["objective"], ev["memory_bytes"], ev["compute_time"], ev["comm_time"],
        ev["resharding_time"], "optimal", 0.0,
    )
