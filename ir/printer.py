"""Stable text form of a Graph: the format of every dump file.

    graph gpt_tiny(%input_ids: i64[s0, 16]) {
      %p_wte: f32[128, 64] = param "wte.weight"
      %embedding: f32[s0, 16, 64] = aten.embedding.default(%p_wte, %input_ids)  # gpt.py:41
      return (%logits)
    }

Value names, argument order and attribute order are deterministic, so two dumps of the same
program compare equal as text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sharding import placements_str
from .types import dtype_short
from .values import Node, Value

if TYPE_CHECKING:
    from .graph import Graph


def format_arg(a) -> str:
    if isinstance(a, Value):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(format_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return dtype_short(a)
    if isinstance(a, torch.device):
        return f'"{a}"'
    if isinstance(a, torch.memory_format):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.layout):
        return str(a).replace("torch.", "")
    if isinstance(a, str):
        return f'"{a}"'
    if isinstance(a, float):
        return repr(a)
    return str(a)


def _value_decl(v: Value) -> str:
    pl = placements_str(v.placements)
    return f"%{v.name}: {v.type}" + (f" {pl}" if pl else "")


def format_node(n: Node, with_source: bool = True) -> str:
    outs = ", ".join(_value_decl(o) for o in n.outputs)
    args = [format_arg(a) for a in n.args]
    args += [f"{k}={format_arg(v)}" for k, v in n.kwargs.items()]
    line = f"{outs} = {n.op}({', '.join(args)})"
    tags = [f"{k}={format_arg(v)}" for k, v in sorted(n.attrs.items()) if not k.startswith("_")]
    if tags:
        line += "  [" + ", ".join(tags) + "]"
    if with_source and n.source:
        line += f"  # {n.source}"
    return line


def print_graph(g: Graph, with_source: bool = True, with_timings: bool = False) -> str:
    """The graph as text. Timings are off by default so that dumps of one program compare
    equal across runs."""
    users = ", ".join(_value_decl(v) for v in g.user_inputs)
    lines = [f"graph {g.name}({users}) {{"]
    for v in g.state_inputs:
        lines.append(f'  {_value_decl(v)} = {v.kind} "{v.target}"')
    for n in g.nodes:
        lines.append("  " + format_node(n, with_source))
    lines.append("  return (" + ", ".join(f"%{v.name}" for v in g.outputs) + ")")
    lines.append("}")
    for sym, (hint, lo, hi) in sorted(g.symbols.items(), key=lambda kv: str(kv[0])):
        lines.append(f"# symbol {sym} = {hint} in [{lo}, {'inf' if hi is None else hi}]")
    for rec in g.provenance:
        timing = f"{rec.seconds * 1e3:.2f} ms, " if with_timings else ""
        lines.append(f"# pass {rec.name}: {timing}nodes {rec.nodes_before} -> {rec.nodes_after}")
    return "\n".join(lines) + "\n"
