"""Calibration for GPTQ: run the calibration batches through the reference executor in lock
step, quantizing each target layer when execution reaches it.

Running all batches node by node (rather than each batch end to end) lets a layer's Hessian
come from the inputs it will really see: the outputs of the layers before it, already
quantized. That is GPTQ's sequential scheme; the later layers correct for the earlier ones'
error. Memory is the activations of every calibration batch at once, fine for the few short
batches GPTQ uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from meshweave.ir.graph import Graph, Node, Value, map_values
from meshweave.runtime.reference import node_callable

# site node -> the dequantized [N, K]-oriented weight to run it with, given its inputs X
Quantizer = Callable[[Node, list[torch.Tensor]], torch.Tensor]


def run_lockstep(graph: Graph, batches: Sequence[Sequence[Any]],
                 weights: dict[Node, Value], quantize: Quantizer) -> None:
    """Execute `graph` on every batch; at each node in `weights`, call `quantize(node, xs)`
    with the node's first input from every batch, then run the node with the returned weight
    in place of the weight Value (so later layers see quantized outputs)."""
    users = graph.user_inputs
    envs: list[dict[Value, Any]] = []
    for i, leaves in enumerate(batches):
        if len(leaves) != len(users):
            raise ValueError(f"calibration batch {i}: {len(leaves)} inputs after flattening, "
                             f"the model takes {len(users)}")
        env = dict(zip(users, leaves))
        for v in graph.state_inputs:
            env[v] = graph.tensors[v.name]
        envs.append(env)
    last = _last_uses(graph)
    for idx, n in enumerate(graph.nodes):
        override: dict[Value, Any] = {}
        if n in weights:
            xs = [env[n.inputs[0]] if n.op != "aten.addmm.default" else env[n.args[1]]
                  for env in envs]
            override[weights[n]] = quantize(n, xs)
        fn = node_callable(n)
        for env in envs:
            args = map_values(n.args, lambda v: override.get(v, env.get(v)))
            kwargs = map_values(n.kwargs, lambda v: override.get(v, env.get(v)))
            with torch.no_grad():
                result = fn(*args, **kwargs)
            if n.multi_output:
                for o, r in zip(n.outputs, result):
                    env[o] = r
            else:
                env[n.outputs[0]] = result
            for v in last.get(idx, ()):
                env.pop(v, None)


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
