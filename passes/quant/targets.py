"""Which nodes the quantization pass rewrites, and how each one reads its weight.

A target is a linear or a matmul whose weight is a 2-D floating-point parameter:
  aten.linear(x, W[N, K], bias)       W^T is the [K, N] weight
  aten.mm(x, W[K, N]), aten.matmul(x[..., K], W[K, N])
  aten.addmm(bias, x, W[K, N])        (beta = alpha = 1 only)
Adding a target op means adding an entry to TARGETS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from meshweave.ir.graph import Graph, Node, Value


@dataclasses.dataclass(frozen=True)
class Target:
    """How to read one op: (x, weight, bias) Values, and whether the weight is [N, K]."""

    operands: Callable[[Node], tuple[Value, Value, Value | None] | None]
    weight_is_nk: bool


def _linear(n: Node):
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return n.args[0], n.args[1], bias if isinstance(bias, Value) else None


def _mm(n: Node):
    return n.args[0], n.args[1], None


def _addmm(n: Node):
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    return n.args[1], n.args[2], n.args[0]


TARGETS: dict[str, Target] = {
    "aten.linear.default": Target(_linear, True),
    "aten.mm.default": Target(_mm, False),
    "aten.matmul.default": Target(_mm, False),
    "aten.addmm.default": Target(_addmm, False),
}


@dataclasses.dataclass(frozen=True)
class Site:
    """One node to rewrite: its operands and its weight as [N, K] (rows = output channels)."""

    node: Node
    x: Value
    weight: Value
    bias: Value | None
    weight_is_nk: bool

    def weight_nk(self, graph: Graph) -> torch.Tensor:
        w = graph.tensors[self.weight.name]
        return w if self.weight_is_nk else w.T


def find_sites(graph: Graph, skip: tuple[str, ...] = ()) -> list[Site]:
    sites = []
    for n in graph.nodes:
        target = TARGETS.get(n.op)
        if target is None:
            continue
        ops = target.operands(n)
        if ops is None:
            continue
        x, w, bias = ops
        if not (isinstance(w, Value) and w.kind == "param" and w.name in graph.tensors):
            continue
        t = graph.tensors[w.name]
        if t.dim() != 2 or not t.dtype.is_floating_point or t.device.type == "meta":
            continue
        if any(s in (w.target or "") for s in skip):
            continue
        if not isinstance(x, Value) or x.type.rank < 1:
            continue
        if bias is not None and (bias.type.rank != 1):
            continue  # a broadcast 2-D addmm bias is not a per-channel bias
        sites.append(Site(n, x, w, bias, target.weight_is_nk))
    return sites
