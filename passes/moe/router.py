"""The router of an MoE block: top-k over the scores of a linear layer of the tokens.

A candidate is an `aten.topk` whose input is, through casts and views, a softmax (or sigmoid)
of a linear/mm whose weight is a parameter, or that linear's logits directly (routers that
normalise after the top-k). Top-k nodes over anything else (sampling, beam search) are not MoE
routers and are left alone without a report.
"""

from __future__ import annotations

import dataclasses

from meshweave.ir.graph import Graph, Node, Value
from .graph_walk import LINEAR_OPS, through_shape_ops

TOPK = "aten.topk.default"
TRANSPOSES = {"aten.t.default", "aten.transpose.int", "aten.permute.default"}
SCORE_OPS = {
    "aten._softmax.default": "softmax",
    "aten.softmax.int": "softmax",
    "aten.sigmoid.default": "sigmoid",
}


@dataclasses.dataclass
class Router:
    topk: Node
    linear: Node  # the router's projection
    weight: Value  # its parameter, [E, d] (linear) or [d, E] (mm)
    scoring: str  # "softmax", "sigmoid" or "logits"
    num_experts: int
    top_k: int
    tokens: int

    @property
    def values(self) -> Value:
        return self.topk.outputs[0]

    @property
    def ids(self) -> Value:
        return self.topk.outputs[1]

    @property
    def scores(self) -> Value:
        """What the top-k ranks: the router's probabilities (or logits)."""
        return self.topk.args[0]

    def describe(self) -> str:
        w = self.weight.target or self.weight.name
        return (f"%{self.linear.outputs[0].name} = {self.linear.op.split('.')[1]}({w}) -> "
                f"{self.scoring} -> top-{self.top_k}")


def _linear_weight(n: Node) -> Value | None:
    """The parameter operand of a linear-like node, or None."""
    if n.op not in LINEAR_OPS:
        return None
    for v in n.inputs:
        if v.producer is not None and v.producer.op in TRANSPOSES:  # mm(x, t(w)): AOTAutograd's
            v = v.producer.args[0]
        if v.producer is None and v.kind == "param" and len(v.type.shape) == 2:
            return v
    return None


def _topk_dim_is_last(n: Node) -> bool:
    rank = len(n.args[0].type.shape)
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", -1)
    return dim in (-1, rank - 1)


def find_router(topk: Node) -> Router | None:
    """The Router behind `topk`, or None when the top-k is not over a linear's scores."""
    if topk.op != TOPK or len(topk.outputs) != 2 or not _topk_dim_is_last(topk):
        return None
    scores = topk.args[0]
    shape = scores.type.shape
    if len(shape) != 2 or not all(isinstance(s, int) for s in (shape[-1],)):
        return None
    scoring = "logits"
    src = through_shape_ops(scores)[-1]
    if src.producer is not None and src.producer.op in SCORE_OPS:
        scoring = SCORE_OPS[src.producer.op]
        src = through_shape_ops(src.producer.args[0])[-1]
    if src.producer is None:
        return None
    weight = _linear_weight(src.producer)
    if weight is None:
        return None
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    return Router(topk, src.producer, weight, scoring, int(shape[-1]), int(k), shape[0])


def find_routers(graph: Graph) -> list[Router]:
    found = []
    for n in graph.nodes:
        if n.op == TOPK:
            r = find_router(n)
            if r is not None:
                found.append(r)
    return found
