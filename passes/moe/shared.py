"""The shared expert beside an MoE block: a dense MLP of the same tokens added to its output.

It stays dense (every token runs it; the parallel planner replicates or TP-shards it); this
only names it for the report. The pattern: the combine y, possibly scaled by a coefficient, is
added to a value that reaches the block's input x through at least two linear layers with
parameter weights. Its gate is reported as found: a sigmoid of a linear (Qwen2-MoE), or
softmax coefficients mixing the two (DeepSpeed PR-MoE, moe-tiny).
"""

from __future__ import annotations

import dataclasses
import os

from meshweave.ir.graph import Node, Value
from .graph_walk import LINEAR_OPS, SHAPE_OPS, through_shape_ops

ADD = "aten.add.Tensor"
SCALE_OPS = {"aten.mul.Tensor", "aten.div.Tensor"}
MAX_WALK = 48  # nodes searched back from the other addend before giving up
MAX_GATE_WIDTH = 8  # a linear this narrow is a gate or a mixing coefficient, not an MLP layer


@dataclasses.dataclass(frozen=True)
class SharedExpert:
    weights: tuple[str, ...]  # the dense MLP's parameter names
    gate: str  # "sigmoid gate", "softmax coefficients" or "none"
    add: str  # the value that sums it with the routed experts

    def describe(self) -> str:
        prefix = os.path.commonprefix(list(self.weights)).rstrip("._")
        return f"{prefix or ', '.join(self.weights)} ({self.gate}; summed at %{self.add})"


def find_shared_expert(y: Value, x: Value, users: dict[Value, list[Node]]) -> SharedExpert | None:
    root = through_shape_ops(x)[-1]
    cur, scaled_by = y, None
    for _ in range(4):
        nxt = users.get(cur, [])
        if len(nxt) != 1:
            return None
        n = nxt[0]
        if n.op in SHAPE_OPS:
            cur = n.outputs[0]
            continue
        if n.op in SCALE_OPS and scaled_by is None:
            scaled_by = next((v for v in n.inputs if v is not cur), None)
            cur = n.outputs[0]
            continue
        if n.op != ADD:
            return None
        other = next((v for v in n.inputs if v is not cur), None)
        if other is None:
            return None
        weights, gate, reached = _dense_mlp(other, root)
        if not reached or len(weights) < 2:
            return None
        if gate == "none" and scaled_by is not None and _has_op(scaled_by, "softmax"):
            gate = "softmax coefficients"
        return SharedExpert(tuple(weights), gate, n.outputs[0].name)
    return None


def _dense_mlp(v: Value, root: Value) -> tuple[list[str], str, bool]:
    """Parameter names of the linears between `root` and `v` (gates left out), the gate kind,
    and whether `v` reaches `root` at all (the residual stream does not: it is x's ancestor)."""
    weights: list[str] = []
    gate, reached = "none", False
    stack, seen = [v], set()
    while stack and len(seen) < MAX_WALK:
        cur = stack.pop()
        n = cur.producer
        if through_shape_ops(cur)[-1] is root:
            reached = True
            continue
        if n is None or n in seen:
            continue
        seen.add(n)
        if n.op in LINEAR_OPS and n.outputs[0].type.shape[-1] > MAX_GATE_WIDTH:
            w = [i for i in n.inputs if i.producer is None and i.kind == "param"
                 and len(i.type.shape) == 2]
            weights += [i.target or i.name for i in w if (i.target or i.name) not in weights]
        elif n.op == "aten.sigmoid.default" and n.outputs[0].type.shape[-1] == 1:
            gate = "sigmoid gate"  # a per-token scalar gate, not the SiLU of a hidden layer
        stack.extend(i for i in n.inputs if i.producer is not None)
    return weights, gate, reached


def _has_op(v: Value, word: str) -> bool:
    n, hops = v.producer, 0
    while n is not None and hops < 4:
        if word in n.op:
            return True
        ins = [i for i in n.inputs if i.producer is not None]
        n = ins[0].producer if ins else None
        hops += 1
    return False
