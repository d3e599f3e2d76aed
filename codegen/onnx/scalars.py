"""Non-tensor user inputs (a `use_cache=False` flag, an int) in ONNX export.

torch.export specializes Python scalars: the traced graph holds one value of each, and the IR
keeps them as ScalarType user inputs only so that calls line up with the model's signature.
ONNX graph inputs are tensors, so the export folds them: a node that reads one gets the value
as a constant, and the input leaves the exported graph (and the manifest). The value comes from
the example inputs the caller passes, else from the trace (`ScalarType.expr`); a value the
graph reads but that is known from neither is an error naming the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, Node, map_values
from meshweave.ir.types import TensorType


class ScalarInputError(MeshweaveError):
    """A non-tensor input the export cannot fold (its value is unknown, or not the traced one)."""


def scalar_inputs(graph: Graph) -> list:
    return [v for v in graph.user_inputs if not isinstance(v.type, TensorType)]


def full_inputs(graph: Graph, inputs: Sequence[Any]) -> list[Any]:
    """Every user input's value, in order, from either all user inputs or only the tensor ones
    (the non-tensor ones then take their traced values)."""
    users = graph.user_inputs
    inputs = list(inputs)
    if len(inputs) == len(users):
        return inputs
    tensors = [v for v in users if isinstance(v.type, TensorType)]
    if len(inputs) != len(tensors):
        raise ValueError(f"graph {graph.name} takes {len(users)} user inputs "
                         f"({len(tensors)} of them tensors), got {len(inputs)} values")
    it = iter(inputs)
    return [next(it) if isinstance(v.type, TensorType) else v.type.expr for v in users]


def tensor_leaves(graph: Graph, full: Sequence[Any]) -> list[Any]:
    """The values of the tensor user inputs: what the exported ONNX graph takes."""
    return [x for v, x in zip(graph.user_inputs, full) if isinstance(v.type, TensorType)]


def fold_scalar_inputs(graph: Graph, full: Sequence[Any]) -> Graph:
    """`graph` without its non-tensor user inputs, each read replaced by its value in `full`
    (every user input's value). A graph with only tensor inputs is returned as is."""
    scalars = scalar_inputs(graph)
    if not scalars:
        return graph
    g = graph.copy()
    values = dict(zip(g.user_inputs, full))
    readers: dict[Any, list[Node]] = {}
    for n in g.nodes:
        for v in n.inputs:
            readers.setdefault(v, []).append(n)
    folded = {}
    for v in [u for u in g.user_inputs if not isinstance(u.type, TensorType)]:
        value, traced = values[v], getattr(v.type, "expr", None)
        if traced is not None and value is not None and value != traced:
            raise ScalarInputError(
                f"graph {graph.name}: input %{v.name} was traced as {traced!r} (torch.export "
                f"specializes Python scalars), but the export was given {value!r}; compile "
                f"with {v.name}={value!r} to export that variant")
        value = traced if value is None else value
        if readers.get(v) and value is None:
            raise ScalarInputError(
                f"graph {graph.name}: input %{v.name} ({v.type}) is read by "
                f"{readers[v][0].op} but its value is unknown; pass it in the export's inputs")
        folded[v] = value
        g.inputs.remove(v)
    for n in g.nodes:
        n.args = map_values(n.args, lambda u: folded.get(u, u))
        n.kwargs = map_values(n.kwargs, lambda u: folded.get(u, u))
    for v in g.outputs:
        if v in folded:
            raise ScalarInputError(f"graph {graph.name}: output %{v.name} is the non-tensor "
                                   "input itself; ONNX graph outputs must be tensors")
    return g
