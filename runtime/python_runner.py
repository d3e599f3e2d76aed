"""The reference executor's program as generated Python: the eager backend's fast path.

    run = python_runner(graph)     # generated once per graph
    outs = run(args)               # == run_graph(graph, args), node for node

run_graph interprets the IR: per node it looks the op up in the registry (or resolves an
eager-fallback op by name), maps Values through a dict and checks liveness, which at small
sizes costs more than the ops themselves. `python_runner` writes the same program as one
Python function instead (as torch.fx's GraphModule does): each node a direct call of the
callable run_graph would use, resolved once; arguments as local variables; intermediates
deleted after their last use, as run_graph frees them. The oracle stays run_graph:

  - under a live-bytes meter (runtime/memory.py: cm.memory_stats) the call goes through
    run_graph, which feeds it;
  - when the generated code raises, the call is repeated through run_graph, whose
    ExecutionError names the node and the user's source line.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any

from ..ir.graph import Graph, Value
from .memory import active_meter
from .reference import _last_uses, node_callable, run_graph


def python_runner(graph: Graph) -> Callable[[list[Any]], list[Any]]:
    """`graph` as a generated function of its user inputs (state inputs are read from
    graph.tensors at each call)."""
    names: dict[Value, str] = {}
    consts: dict[str, Any] = {"_T": graph.tensors}

    def name(v: Value) -> str:
        if v not in names:
            names[v] = f"v{len(names)}"
        return names[v]

    def const(x: Any) -> str:
        key = f"c{len(consts)}"
        consts[key] = x
        return key

    def expr(x: Any) -> str:
        if isinstance(x, Value):
            return name(x)
        if isinstance(x, list):
            return "[" + ", ".join(expr(y) for y in x) + "]"
        if isinstance(x, tuple):
            return "(" + "".join(expr(y) + ", " for y in x) + ")"
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return "{" + ", ".join(f"{k!r}: {expr(y)}" for k, y in x.items()) + "}"
        if x is None or isinstance(x, (bool, int)):
            return repr(x)
        return const(x)

    lines = ["def run(args):"]
    users = graph.user_inputs
    if users:
        lines.append(f"    {', '.join(name(v) for v in users)}, = args")
    for v in graph.state_inputs:
        lines.append(f"    {name(v)} = _T[{v.name!r}]")
    last_use = _last_uses(graph)
    for i, n in enumerate(graph.nodes):
        fn = const(node_callable(n))
        plain = all(k.isidentifier() and not keyword.iskeyword(k) for k in n.kwargs)
        kwargs = ([f"{k}={expr(a)}" for k, a in n.kwargs.items()] if plain
                  else [f"**{expr(dict(n.kwargs))}"])
        args = ", ".join([expr(a) for a in n.args] + kwargs)
        if n.multi_output:
            lines.append(f"    _r = {fn}({args})")
            lines += [f"    {name(o)} = _r[{k}]" for k, o in enumerate(n.outputs)]
        else:
            lines.append(f"    {name(n.outputs[0])} = {fn}({args})")
        dead = [name(v) for v in last_use.get(i, ()) if v in names]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    lines.append("    return [" + ", ".join(name(v) for v in graph.outputs) + "]")
    scope: dict[str, Any] = dict(consts)
    exec(compile("\n".join(lines), f"<meshweave {graph.name}>", "exec"), scope)  # noqa: S102
    generated = scope["run"]
    n_users = len(users)

    def run(args: list[Any]) -> list[Any]:
        if active_meter() is not None or len(args) != n_users:
            return run_graph(graph, args)  # the meter, or run_graph's own input error
        try:
            return generated(args)
        except Exception:
            return run_graph(graph, args)  # raises ExecutionError with the node and line

    run.source = "\n".join(lines)
    return run
