"""What autograd saves for backward, per op: the activation memory of training.

A rule takes a node and `needs_grad(value)` and returns what the node's backward keeps: some of
its inputs or outputs (Values), and bytes of tensors the IR does not name (the logsumexp of
fused attention, the per-pair hidden states of moe.experts). The rules follow torch's
tools/autograd/derivatives.yaml, including its conditions: mm keeps its second operand only if
the first needs a gradient (the generated autograd code saves a tensor only when a backward
formula that reads it will run). A node none of whose inputs needs a gradient saves nothing.

`saved_activation_bytes` is the union over a graph: a value saved by several consumers counts
once; a view saves its base's storage; parameters, buffers and constants are not activations
(they are resident anyway, counted by the planner as inputs). Ops without a rule save their
outputs, the planner's old assumption, unless they are views or creations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Union

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.registry import RuleTable, lookup
from meshweave.ir.types import TensorType

Saved = list[Union[Value, int]]  # Values kept for backward, and extra bytes the IR has no name for
NeedsGrad = Callable[[Value], bool]
SAVED = RuleTable("saved_for_backward")
_SAVE_NOTHING_CATEGORIES = {"view", "sym", "constant", "assert", "creation", "copy"}
_VIEW_LIKE = {"aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default"}


def _arg(n: Node, i: int, name: str = "") -> Value | None:
    """The node's positional tensor argument `i` (or keyword `name`), None if absent."""
    v = n.args[i] if i < len(n.args) else n.kwargs.get(name)
    return v if isinstance(v, Value) else None


def _if(cond: bool, *vals: Value | None) -> Saved:
    return [v for v in vals if v is not None] if cond else []


@SAVED.register(
    "aten.add.Tensor", "aten.sub.Tensor", "aten.add.Scalar", "aten.sub.Scalar", "aten.rsub.Scalar",
    "aten.neg.default", "aten.mul.Scalar", "aten.div.Scalar", "aten.clone.default",
    "aten._to_copy.default", "aten.mean.dim", "aten.sum.dim_IntList", "aten.sum.default",
    "aten.mean.default", "aten.cat.default", "aten.copy.default", "aten.contiguous.default",
    "aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default",
)
def _save_nothing(n: Node, needs_grad: NeedsGrad) -> Saved:
    return []  # the backward needs only sizes and dims


@SAVED.register("aten.where.self", "aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _save_mask(n: Node, needs_grad: NeedsGrad) -> Saved:
    """The boolean condition (where's first argument, masked_fill's second)."""
    return _if(True, _arg(n, 0 if n.op == "aten.where.self" else 1))


@SAVED.register("aten.mul.Tensor", "aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def _save_each_others(n: Node, needs_grad: NeedsGrad) -> Saved:
    """d(a*b)/da reads b and d/db reads a: each operand is kept if the other needs a grad."""
    a, b = _arg(n, 0), _arg(n, 1)
    return _if(a is not None and needs_grad(a), b) + _if(b is not None and needs_grad(b), a)


@SAVED.register("aten.addmm.default", "aten.baddbmm.default")
def _save_addmm(n: Node, needs_grad: NeedsGrad) -> Saved:
    m1, m2 = _arg(n, 1), _arg(n, 2)
    return _if(m1 is not None and needs_grad(m1), m2) + _if(m2 is not None and needs_grad(m2), m1)


@SAVED.register("aten.linear.default")
def _save_linear(n: Node, needs_grad: NeedsGrad) -> Saved:
    """linear is x @ w.T (+ b): the input for the weight's gradient, the weight for the input's."""
    x, w = _arg(n, 0), _arg(n, 1)
    return _if(needs_grad(w), x) + _if(needs_grad(x), w)


@SAVED.register("aten.div.Tensor")
def _save_div(n: Node, needs_grad: NeedsGrad) -> Saved:
    """grad_a = g / b; grad_b = -g * a / b^2: b for either, a only for b's gradient."""
    a, b = _arg(n, 0), _arg(n, 1)
    b_needs = b is not None and needs_grad(b)
    return _if(needs_grad(a) or b_needs, b) + _if(b_needs, a)


# Unary ops whose derivative is written with the input (self) or with the result.
_SAVE_INPUT = (
    "aten.silu.default", "aten.gelu.default", "aten.pow.Tensor_Scalar", "aten.log.default",
    "aten.sin.default", "aten.cos.default", "aten.erf.default", "aten.abs.default",
    "aten.leaky_relu.default", "aten.hardtanh.default", "aten.mish.default",
    "aten.softplus.default", "aten.log1p.default", "aten.square.default",
)
_SAVE_RESULT = (
    "aten.rsqrt.default", "aten.sqrt.default", "aten.exp.default", "aten.sigmoid.default",
    "aten.tanh.default", "aten.relu.default", "aten.reciprocal.default", "aten._softmax.default",
    "aten.softmax.int", "aten._log_softmax.default", "aten.elu.default",
)


@SAVED.register(*_SAVE_INPUT)
def _save_input(n: Node, needs_grad: NeedsGrad) -> Saved:
    return _if(True, _arg(n, 0))


@SAVED.register(*_SAVE_RESULT)
def _save_result(n: Node, needs_grad: NeedsGrad) -> Saved:
    return [n.outputs[0]]


@SAVED.register("aten.amax.default", "aten.amin.default")
def _save_input_and_result(n: Node, needs_grad: NeedsGrad) -> Saved:
    return _if(True, _arg(n, 0), n.outputs[0])


@SAVED.register("aten.native_layer_norm.default")
def _save_layer_norm(n: Node, needs_grad: NeedsGrad) -> Saved:
    """native_layer_norm_backward(grad, input, shape, mean, rstd, weight, bias, ...)."""
    return _if(True, _arg(n, 0), _arg(n, 2), _arg(n, 3), *n.outputs[1:3])


@SAVED.register("aten.embedding.default")
def _save_embedding(n: Node, needs_grad: NeedsGrad) -> Saved:
    return _if(needs_grad(_arg(n, 0)), _arg(n, 1))  # the indices, for the weight's scatter


@SAVED.register("aten.native_dropout.default")
def _save_dropout(n: Node, needs_grad: NeedsGrad) -> Saved:
    return list(n.outputs[1:2])  # the mask


@SAVED.register("aten.topk.default", "aten.max.dim", "aten.min.dim", "aten.sort.default")
def _save_indices(n: Node, needs_grad: NeedsGrad) -> Saved:
    return list(n.outputs[1:2])  # the indices, to scatter the gradient back


@SAVED.register("aten.scaled_dot_product_attention.default")
def _save_attention(n: Node, needs_grad: NeedsGrad) -> Saved:
    """The fused kernels (flash, efficient, CPU flash) keep q, k, v, the output and a float32
    logsumexp of [batch, heads, query length], the attention mask if any."""
    q = _arg(n, 0)
    lse = 4 * math.prod(q.type.shape[:-1]) if isinstance(q.type, TensorType) else 0
    return _if(True, q, _arg(n, 1), _arg(n, 2), _arg(n, 3, "attn_mask"), n.outputs[0]) + [lse]


@SAVED.register("moe.experts")
def _save_experts(n: Node, needs_grad: NeedsGrad) -> Saved:
    """Per (token, expert) pair, what the sparse reference's backward reads: the gathered input
    row, the up (and gate) projections and the activation (and gated product), the expert
    output, its weighted copy (index_add keeps its source), the routing weight, and two int64
    gather indices. x, the weights and ids themselves are not kept (gathers keep indices)."""
    x, w, _, w_in, w_gate = (_arg(n, i) for i in range(5))
    t, d = x.type.shape
    k = w.type.shape[1]
    fused = bool(n.kwargs.get("fused_gate_up", False))
    f = w_in.type.shape[-1] if n.kwargs.get("layout", "kn") == "kn" else w_in.type.shape[-2]
    f = f // 2 if fused else f
    # relu's backward reads its result, which the down projection keeps anyway
    saves_act_input = n.kwargs.get("act", "silu") != "relu"
    hidden = (3 + saves_act_input) * f if (w_gate is not None or fused) else (
        1 + saves_act_input) * f
    return [t * k * ((hidden + 3 * d + 1) * x.type.itemsize + 16)]


def saved_for(n: Node, needs_grad: NeedsGrad) -> Saved:
    """What `n`'s backward keeps: its rule, or its outputs for an op without one."""
    if not any(needs_grad(v) for v in n.inputs):
        return []
    rule = SAVED.get(n.op)
    if rule is not None:
        return rule(n, needs_grad)
    info = lookup(n.op)
    if n.op in _VIEW_LIKE or (info is not None and info.category in _SAVE_NOTHING_CATEGORIES):
        return []
    return [o for o in n.outputs if isinstance(o.type, TensorType)]


def storage_base(v: Value) -> Value:
    """The value whose storage `v` aliases: `v` itself unless a chain of views made it."""
    while v.producer is not None:
        n = v.producer
        info = lookup(n.op)
        if not (n.op in _VIEW_LIKE or (info is not None and info.category == "view")):
            break
        ins = [x for x in n.inputs if isinstance(x.type, TensorType)]
        if not ins:
            break
        v = ins[0]
    return v


@dataclasses.dataclass
class SavedActivations:
    """A graph's saved-for-backward activations: the union, and who keeps each one."""

    owner: dict[Value, Node]  # base value -> the first node that saves it
    extra: dict[Node, int]  # bytes a node keeps that the IR does not name
    total_bytes: int

    def node_bytes(self, n: Node, value_bytes: Callable[[Value], float]) -> float:
        """Bytes node `n` is the one to save, with `value_bytes` sizing a value (local shapes
        under a strategy, say)."""
        own = sum(value_bytes(v) for v, o in self.owner.items() if o is n)
        return own + self.extra.get(n, 0)


def saved_activations(graph: Graph, grad_free: set[Value]) -> SavedActivations:
    """The union of what every node saves; `grad_free` (cost_model.grad_free_values) are the
    values no gradient needs."""
    def needs_grad(v: Value | None) -> bool:
        return (v is not None and v not in grad_free and isinstance(v.type, TensorType)
                and v.type.dtype.is_floating_point)

    owner: dict[Value, Node] = {}
    extra: dict[Node, int] = {}
    for n in graph.nodes:
        for s in saved_for(n, needs_grad):
            if isinstance(s, Value):
                base = storage_base(s)
                if base.kind in ("param", "buffer", "constant") or base in owner:
                    continue
                if isinstance(base.type, TensorType):
                    owner[base] = n
            elif s:
                extra[n] = extra.get(n, 0) + int(s)
    total = sum(v.type.nbytes() for v in owner) + sum(extra.values())
    return SavedActivations(owner, extra, int(total))


def saved_activation_bytes(graph: Graph, grad_free: set[Value]) -> int:
    """Bytes autograd keeps for backward after one forward of `graph`."""
    return saved_activations(graph, grad_free).total_bytes
