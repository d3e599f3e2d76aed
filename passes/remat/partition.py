"""The pass as AOTAutograd's partition function: meshweave chooses the saved set.

    partition = remat_partition(MemoryBudget.parse(0.5), spec, report)
    build_joint(..., partition=partition)   # frontend/joint.py

AOTAutograd traces the joint forward+backward graph and asks a partition function to split it.
This one builds the rematerialization problem from the joint graph (problem.py), solves it
(solve.py) and hands the chosen saved set to torch's graph extraction, which copies every
forward node the backward needs but does not receive into the backward: those copies are the
recomputation. `report` receives the solution and the names of the recomputed nodes, which
frontend/joint.py marks `[recompute=True]` in the backward IR (their source lines are the
forward's).

With no budget (None), torch's default partition runs unchanged: everything the backward reads
is saved, which is budget 1.0's answer too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from .budget import MemoryBudget
from .problem import build_problem
from .solve import evaluate, smallest_feasible, solve


def remat_partition(budget: MemoryBudget | None, spec, report: dict[str, Any]) -> Callable:
    from torch._functorch.partitioners import (
        _extract_fwd_bwd_modules,
        default_partition,
        is_not_collective,
    )

    def partition(joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **kw):
        problem = build_problem(joint, num_fwd_outputs, spec)
        report["problem"] = problem
        report["budget"] = budget
        if budget is None:
            fw, bw = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)
            report["solution"] = evaluate(problem, set(problem.needed))
            report["recomputed"] = _recomputed(bw, problem)
            return fw, bw
        limit = budget.bytes_for(problem.full_bytes)
        if budget.at_least_feasible:
            limit = max(limit, smallest_feasible(problem))
        sol = solve(problem, limit)
        # the parameters and inputs the backward reads, directly or to recompute from
        free = set(problem.free)
        for n in sol.recomputed:
            free.update(u.name for u in _node(joint, n).all_input_nodes
                        if u.op == "placeholder" and "tangents" not in u.name)
        nodes = {n.name: n for n in joint.graph.nodes}
        primals = [nodes[n] for n in nodes if n in free and nodes[n].op == "placeholder"]
        tensors = [nodes[n] for n in sol.saved if not problem.candidates[n].sym]
        syms = [nodes[n] for n in sol.saved if problem.candidates[n].sym]
        fw, bw = _extract_fwd_bwd_modules(joint, primals + tensors, saved_sym_nodes=syms,
                                          num_fwd_outputs=num_fwd_outputs)
        # torch's own call (is_impure_node=is_not_collective) keeps every non-collective
        # node, so a forward node copied into the backward but read by nothing (a fused
        # attention whose outputs were all saved) would run again: drop dead nodes there
        fw.graph.eliminate_dead_code(is_impure_node=is_not_collective)
        bw.graph.eliminate_dead_code(is_impure_node=_keep)
        fw.recompile()
        bw.recompile()
        report["solution"] = sol
        report["recomputed"] = _recomputed(bw, problem)
        return fw, bw

    return partition


def _keep(n: fx.Node) -> bool:
    """Backward nodes dead-code elimination must keep: mutations and other side effects, and
    collectives (every rank of a group issues them, read or not). A dead copy of a seeded op
    goes: the forward drew its numbers, and the backward reads what was saved."""
    if getattr(n.target, "namespace", None) == "_c10d_functional":
        return True
    try:
        return n.is_impure(impure_random=False)
    except TypeError:  # older torch: no impure_random argument
        return n.is_impure()


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def _recomputed(bw: fx.GraphModule, problem) -> list[str]:
    """The backward's nodes that are copies of forward candidates."""
    return [n.name for n in bw.graph.nodes
            if n.op == "call_function" and n.name in problem.candidates]


def partition_for(memory_budget, hardware: str | None, report: dict[str, Any],
                  device: str = "cpu", budget: MemoryBudget | None = None) -> Callable:
    """The pass as a joint graph's partition function for CompileOptions' `memory_budget`
    and `hardware` (the model's joint, or under mesh= each rank's: the budget is then the
    rank's own; `budget` overrides memory_budget, as a plan stage's does). Recompute is priced
    on `hardware`, or on the device the step runs on: the "cpu" preset for CPU tensors (where
    a matmul is compute-bound at sizes an H100 would find memory-bound), h100 otherwise."""
    from ..parallel.cost.hardware import get_spec

    if budget is None and memory_budget is not None:
        budget = MemoryBudget.parse(memory_budget)
    return remat_partition(budget, get_spec(hardware or ("cpu" if device == "cpu" else "h100")),
                           report)
