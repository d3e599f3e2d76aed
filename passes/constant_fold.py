"""Constant folding: evaluate nodes whose inputs are all constants, within a size budget.

Inputs count as constant when they are lifted tensor constants or outputs of folded nodes.
Parameters and buffers are not folded: the planner shards them and users may reload them.
Folded results become new `constant` graph inputs; results above FOLD_MAX_ELEMENTS stay as ops
(folding a large `full` would trade a cheap kernel for memory).
"""

from __future__ import annotations

import torch

from ..ir.graph import Graph, Value, iter_values
from ..ir.types import TensorType, tensor_type_of
from ..runtime.reference import run_node

FOLD_MAX_ELEMENTS = 1 << 16
_NEVER_FOLD = ("rand", "dropout", "bernoulli", "normal", "uniform", "empty")


def _foldable_output(v: Value) -> bool:
    t = v.type
    return isinstance(t, TensorType) and t.is_static and t.numel() <= FOLD_MAX_ELEMENTS


def constant_fold(graph: Graph) -> Graph:
    g = graph.copy()
    env: dict[Value, object] = {v: g.tensors[v.name] for v in g.inputs if v.kind == "constant"}
    if any(t.device.type == "meta" for t in env.values()):
        return g
    kept, new_inputs = [], []
    for n in g.nodes:
        ins = n.inputs
        foldable = (
            not n.attrs.get("fallback")
            and n.op != "prim.constant"
            and not any(w in n.op for w in _NEVER_FOLD)
            and all(v in env for v in ins)
            and all(_foldable_output(o) for o in n.outputs)
            and not any(not isinstance(a, (int, float, bool, type(None), str, torch.dtype,
                                           torch.device, torch.layout, torch.memory_format,
                                           list, tuple, Value))
                        for a in list(n.args) + list(n.kwargs.values()))
        )
        if not foldable:
            kept.append(n)
            continue
        run_node(n, env)
        for o in n.outputs:
            tensor = env[o]
            o.producer, o.kind, o.target = None, "constant", f"folded.{o.name}"
            o.type = tensor_type_of(tensor, device=o.type.device)
            g.tensors[o.name] = tensor
            new_inputs.append(o)
    g.nodes = kept
    g.inputs = g.inputs + new_inputs
    used = {v for n in g.nodes for v in iter_values((n.args, n.kwargs))} | set(g.outputs)
    g.inputs = [v for v in g.inputs if v.kind != "constant" or v in used]
    g.tensors = {k: t for k, t in g.tensors.items() if any(v.name == k for v in g.inputs)}
    return g
