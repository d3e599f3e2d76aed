"""The graph IR: Graph, Node and Value.

A Graph is a straight-line program in SSA form. Node.args / Node.kwargs keep the aten call's
structure, with Values in place of tensors (lists of Values allowed, as in aten.cat), so the
reference executor can call the op exactly as torch.export recorded it. Each Value has one
producer: a Node, or the graph itself for inputs (user inputs, parameters, buffers, constants).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import sympy
import torch

from .printer import print_graph
from .values import INPUT_KINDS, Node, Value, iter_values, map_values  # noqa: F401 (re-exported)



@dataclasses.dataclass(frozen=True, slots=True)
class PassRecord:
    """Provenance: one pass that ran over the graph."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclasses.dataclass(eq=False)
class Graph:
    """A program: inputs, nodes in topological order, outputs.

    `tensors` holds the data behind param/buffer/constant inputs (real or meta tensors),
    keyed by the input Value's name. `symbols` maps each shape symbol to its example value
    (hint) and its (low, high) range from torch.export.
    """

    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    symbols: dict[sympy.Symbol, tuple[int, int, int | None]] = dataclasses.field(
        default_factory=dict
    )  # symbol -> (hint, low, high or None)
    provenance: list[PassRecord] = dataclasses.field(default_factory=list)
    name: str = "graph"
    meta: dict = dataclasses.field(default_factory=dict)

    # --- queries ---------------------------------------------------------------------------
    @property
    def user_inputs(self) -> list[Value]:
        return [v for v in self.inputs if v.kind == "user"]

    @property
    def state_inputs(self) -> list[Value]:
        return [v for v in self.inputs if v.kind != "user"]

    def hints(self) -> dict[sympy.Symbol, int]:
        return {s: h for s, (h, _, _) in self.symbols.items()}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {v: [] for v in self.all_values()}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def all_values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.all_values():
            if v.name == name:
                return v
        raise KeyError(f"no value %{name} in graph {self.name}")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    # --- construction helpers -------------------------------------------------------------
    def copy(self) -> Graph:
        """A structural copy: new Values and Nodes; tensors are shared (never mutated)."""
        vmap: dict[Value, Value] = {}

        def clone_value(v: Value, producer: Node | None) -> Value:
            nv = Value(v.name, v.type, producer, v.kind, v.target, v.placements)
            vmap[v] = nv
            return nv

        inputs = [clone_value(v, None) for v in self.inputs]
        nodes = []
        for n in self.nodes:
            nn = Node(
                n.op,
                map_values(n.args, vmap.__getitem__),
                map_values(n.kwargs, vmap.__getitem__),
                (),
                n.source,
                dict(n.attrs),
                n.multi_output,
            )
            nn.outputs = tuple(clone_value(o, nn) for o in n.outputs)
            nodes.append(nn)
        return Graph(
            inputs,
            nodes,
            [vmap[v] for v in self.outputs],
            dict(self.tensors),
            dict(self.symbols),
            list(self.provenance),
            self.name,
            dict(self.meta),
        )

    def __str__(self) -> str:
        return print_graph(self)


class NameGen:
    """Fresh value names that do not clash with a graph's existing ones."""

    def __init__(self, graph: Graph | None = None, prefix: str = "v"):
        self.taken = {v.name for v in graph.all_values()} if graph else set()
        self.prefix = prefix
        self.counter = itertools.count()

    def __call__(self, hint: str | None = None) -> str:
        base = hint or self.prefix
        if base not in self.taken:
            self.taken.add(base)
            return base
        while True:
            name = f"{base}_{next(self.counter)}"
            if name not in self.taken:
                self.taken.add(name)
                return name
