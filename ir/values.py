"""The IR's building blocks: Value (one SSA value) and Node (one op application).

Graph (graph.py) holds them; the printer and the passes read them. This module imports nothing
of the IR but its types, so both graph.py and printer.py can build on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from .sharding import Placements
from .types import TensorType, ValueType

INPUT_KINDS = ("user", "param", "buffer", "constant")


@dataclasses.dataclass(eq=False, slots=True)
class Value:
    """One SSA value. Identity-compared; `name` is unique within a graph."""

    name: str
    type: ValueType
    producer: Node | None = None  # None for graph inputs
    kind: str = "activation"  # "activation" or one of INPUT_KINDS
    target: str | None = None  # parameter/buffer fully-qualified name, or user input name
    placements: Placements | None = None  # one per mesh axis, set by the planner

    @property
    def tensor_type(self) -> TensorType:
        if not isinstance(self.type, TensorType):
            raise TypeError(f"value %{self.name} is {self.type}, not a tensor")
        return self.type

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclasses.dataclass(eq=False, slots=True)
class Node:
    """An op application. `op` names a registry entry, e.g. 'aten.add.Tensor'."""

    op: str
    args: tuple
    kwargs: dict
    outputs: tuple[Value, ...]
    source: str = ""  # the user's source line, "file:line in function: code"
    attrs: dict = dataclasses.field(default_factory=dict)  # pass annotations, e.g. fallback
    multi_output: bool = False  # the op returns a tuple/list (even of length 1)

    @property
    def inputs(self) -> list[Value]:
        return list(iter_values((self.args, self.kwargs)))

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op} has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        outs = ", ".join(repr(o) for o in self.outputs)
        return f"<Node {outs} = {self.op}>"


def iter_values(tree: Any) -> Iterator[Value]:
    """Values in a nested structure of tuples, lists and dicts, in order."""
    if isinstance(tree, Value):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from iter_values(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from iter_values(x)


def map_values(tree: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild a nested structure with every Value replaced by fn(value)."""
    if isinstance(tree, Value):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(map_values(x, fn) for x in tree)
    if isinstance(tree, list):
        return [map_values(x, fn) for x in tree]
    if isinstance(tree, dict):
        return {k: map_values(v, fn) for k, v in tree.items()}
    return tree
