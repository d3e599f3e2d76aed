"""The reference executor: runs a Graph with torch eager ops. The oracle for every backend.

Each node calls its registry entry's eager implementation (the torch op itself for aten ops),
or, for nodes marked as eager fallback, the torch op resolved by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..ir.errors import MeshweaveError
from ..ir.graph import Graph, Node, Value, map_values
from ..ir.printer import format_node
from ..ir.registry import lookup, resolve_torch_op
from .memory import active_meter


class ExecutionError(MeshweaveError):
    """A node raised while executing; names the node and the user's source line."""


def node_callable(n: Node):
    info = lookup(n.op)
    if info is not None:
        return info.eager
    return resolve_torch_op(n.op)


def run_node(n: Node, env: dict[Value, Any]) -> None:
    args = map_values(n.args, env.__getitem__)
    kwargs = map_values(n.kwargs, env.__getitem__)
    try:
        result = node_callable(n)(*args, **kwargs)
    except Exception as e:
        where = f" (from {n.source})" if n.source else ""
        raise ExecutionError(f"{format_node(n, False)}{where} raised {type(e).__name__}: {e}") \
            from e
    if n.multi_output:
        for o, r in zip(n.outputs, result):
            env[o] = r
    else:
        env[n.outputs[0]] = result


def run_graph(
    graph: Graph,
    user_inputs: Sequence[Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> list[Any]:
    """Execute `graph` on the user inputs; state inputs come from `tensors` (default: graph's)."""
    tensors = graph.tensors if tensors is None else tensors
    users = graph.user_inputs
    if len(users) != len(user_inputs):
        raise ValueError(f"graph {graph.name} takes {len(users)} user inputs, got "
                         f"{len(user_inputs)}")
    env: dict[Value, Any] = dict(zip(users, user_inputs))
    for v in graph.state_inputs:
        env[v] = tensors[v.name]
    last_use = _last_uses(graph)
    meter = active_meter()  # runtime/memory.py: counts the live bytes a step holds
    if meter is not None:
        return _run_metered(graph, env, last_use, meter)
    for i, n in enumerate(graph.nodes):
        run_node(n, env)
        for v in last_use.get(i, ()):
            env.pop(v, None)  # free intermediates early, as a real runtime would
    return [env[v] for v in graph.outputs]


def _run_metered(graph: Graph, env: dict, last_use: dict, meter) -> list[Any]:
    for v in graph.inputs:
        meter.add(env[v])
    for i, n in enumerate(graph.nodes):
        run_node(n, env)
        for o in n.outputs:
            meter.add(env[o])
        for v in last_use.get(i, ()):
            meter.drop(env.pop(v, None))
    outs = [env[v] for v in graph.outputs]
    # the inputs die with the call (a backward's saved values and gradients); the outputs stay
    alive = {id(t) for t in outs}
    for v in graph.inputs:
        if id(env[v]) not in alive:
            meter.drop(env[v], all_holders=True)
    return outs


def _last_uses(graph: Graph) -> dict[int, list[Value]]:
    keep = set(graph.outputs) | set(graph.inputs)
    last: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[v] = i
    out: dict[int, list[Value]] = {}
    for v, i in last.items():
        if v not in keep:
            out.setdefault(i, []).append(v)
    return out
