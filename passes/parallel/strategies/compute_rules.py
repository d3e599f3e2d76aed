"""Sharding rules of compute ops: pointwise, matmuls, attention, embedding, reductions, norms.

Each rule registers in axis.py's `SHARDING_RULES` (by op name) or `CATEGORY_RULES` (by op
category); axis.py's docstring lists what each one allows.
"""

from __future__ import annotations

from typing import Any

from meshweave.ir.graph import Value
from meshweave.ir.sharding import Placement, Shard
from .axis import CATEGORY_RULES, SHARDING_RULES, AxisStrategy, OpView, P, R, _norm


# ------------------------------------------------------------------------------ pointwise
# Partial sums flow through sums and layout ops only: that is where delaying a reduction
# pays (Megatron's embedding P + P), and every extra Partial strategy on a 2-D mesh multiplies
# the ILP. Scaling ops (mul/div by a replicated factor) are linear too but kept out.
_LINEAR_ALL = {"add", "sub"}  # all tensor inputs Partial
_LINEAR_FIRST: set[str] = set()  # first input Partial, the rest replicated
_LINEAR_ONE: set[str] = set()  # any one input Partial
_LINEAR_UNARY = {"alias", "detach", "lift_fresh_copy"}


def _aligned(op: OpView, v: Value, out_rank: int, d: int, size: Any) -> Placement:
    """S(k) for the dim of `v` that broadcasts to output dim d with the same size, else R."""
    t = op.t(v)
    k = d - (out_rank - t.rank)
    if k >= 0 and t.shape[k] == size:
        return Shard(k)
    return R


def pointwise_rule(op: OpView) -> list[AxisStrategy]:
    out_t = op.out_types[0]
    if out_t is None:
        return []
    ins = op.tensor_inputs()
    out = []
    for d, size in enumerate(out_t.shape):
        if size == 1:
            continue
        out.append(
            op.make({v: _aligned(op, v, out_t.rank, d, size) for v in ins}, Shard(d), "follow")
        )
    out += _partial_pointwise(op, ins)
    return out


def _partial_pointwise(op: OpView, ins: list[Value]) -> list[AxisStrategy]:
    args = list(op.node.args)
    scalars = [a for a in args if not isinstance(a, Value)]
    if op.base in _LINEAR_UNARY and len(ins) == 1:
        return [op.make({ins[0]: P}, P, "partial")]
    if op.base in _LINEAR_ALL and ins and not scalars:
        return [op.make({v: P for v in ins}, P, "partial")]
    if op.base in _LINEAR_FIRST and ins and args and args[0] is ins[0]:
        return [op.make({ins[0]: P}, P, "partial")]
    if op.base in _LINEAR_ONE and ins:
        uniq = list(dict.fromkeys(ins))
        if len(uniq) != len(ins):
            return []  # x * x is not linear in x
        return [op.make({v: P}, P, "partial") for v in uniq]
    return []


# --------------------------------------------------------------------------------- matmuls
@SHARDING_RULES.register("aten.linear.default")
def linear_rule(op: OpView) -> list[AxisStrategy]:
    x, w = op.node.args[0], op.node.args[1]
    b = op.arg(2, "bias")
    b = b if isinstance(b, Value) else None
    xt = op.t(x)
    last = xt.rank - 1
    out = [op.make({x: Shard(d)}, Shard(d), "batch") for d in range(last) if xt.shape[d] != 1]
    col = {w: Shard(0)}
    if b is not None:
        col[b] = Shard(0)
    out.append(op.make(col, Shard(last), "col"))
    out.append(op.make({x: Shard(last), w: Shard(1)}, P, "row"))
    return out


@SHARDING_RULES.register("aten.mm.default")
def mm_rule(op: OpView) -> list[AxisStrategy]:
    a, b = op.node.args[0], op.node.args[1]
    return [
        op.make({a: Shard(0)}, Shard(0), "batch"),
        op.make({b: Shard(1)}, Shard(1), "col"),
        op.make({a: Shard(1), b: Shard(0)}, P, "row"),
    ]


@SHARDING_RULES.register("aten.addmm.default")
def addmm_rule(op: OpView) -> list[AxisStrategy]:
    bias, a, b = op.node.args[0], op.node.args[1], op.node.args[2]
    bt = op.t(bias)
    out = [
        op.make({a: Shard(0), bias: _aligned(op, bias, 2, 0, op.t(a).shape[0])}, Shard(0), "batch")
    ]
    out.append(
        op.make({b: Shard(1), bias: _aligned(op, bias, 2, 1, op.t(b).shape[1])}, Shard(1), "col")
    )
    if bt is None or all(s == 1 for s in bt.shape[:-1]):
        out.append(op.make({a: Shard(1), b: Shard(0)}, P, "row"))
    return out


@SHARDING_RULES.register("aten.bmm.default")
def bmm_rule(op: OpView) -> list[AxisStrategy]:
    """Batch dim (tagged "expert" when an operand is a stacked weight [E, ., .]: expert
    parallelism, each device runs its experts), rows of `a`, columns of `b`, or the contracted
    dim (-> Partial)."""
    a, b = op.node.args[0], op.node.args[1]
    stacked = any(v.producer is None and v.kind != "user" for v in (a, b))
    return [
        op.make({a: Shard(0), b: Shard(0)}, Shard(0), "expert" if stacked else "batch"),
        op.make({a: Shard(1)}, Shard(1), "batch"),
        op.make({b: Shard(2)}, Shard(2), "col"),
        op.make({a: Shard(2), b: Shard(1)}, P, "row"),
    ]


@SHARDING_RULES.register("aten.scaled_dot_product_attention.default")
def sdpa_rule(op: OpView) -> list[AxisStrategy]:
    q, k, v = op.node.args[0], op.node.args[1], op.node.args[2]
    mask = op.arg(3, "attn_mask")
    mask = mask if isinstance(mask, Value) else None
    causal = bool(op.arg(5, "is_causal", False))
    qt = op.t(q)
    out = []
    for d in range(qt.rank - 2):
        if qt.shape[d] == 1:
            continue
        kp = _aligned(op, k, qt.rank, d, qt.shape[d])
        vp = _aligned(op, v, qt.rank, d, qt.shape[d])
        if any(p == R and _dim_size(op, t, qt.rank, d) != 1 for p, t in ((kp, k), (vp, v))):
            continue  # grouped-query heads: k/v heads do not line up with q's
        assign = {q: Shard(d), k: kp, v: vp}
        if mask is not None:
            assign[mask] = _aligned(op, mask, qt.rank, d, qt.shape[d])
        out.append(op.make(assign, Shard(d), "heads" if d == qt.rank - 3 else "batch"))
    if not causal:  # a causal mask is relative to the whole sequence
        d = qt.rank - 2
        assign = {q: Shard(d)}
        if mask is not None:
            assign[mask] = _aligned(op, mask, qt.rank, d, qt.shape[d])
        out.append(op.make(assign, Shard(d), "seq"))
    return out


def _dim_size(op: OpView, v: Value, out_rank: int, d: int) -> Any:
    t = op.t(v)
    k = d - (out_rank - t.rank)
    return t.shape[k] if k >= 0 else 1


@SHARDING_RULES.register("aten.embedding.default")
def embedding_rule(op: OpView) -> list[AxisStrategy]:
    w, idx = op.node.args[0], op.node.args[1]
    it = op.t(idx)
    out = [op.make({idx: Shard(d)}, Shard(d), "batch") for d in range(it.rank) if it.shape[d] != 1]
    out.append(op.make({w: Shard(0)}, P, "vocab"))
    out.append(op.make({w: Shard(1)}, Shard(it.rank), "hidden"))
    return out


@SHARDING_RULES.register("aten._native_batch_norm_legit_no_training.default")
def batch_norm_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    return [op.make({x: Shard(0)}, [Shard(0), R, R], "batch")]


@SHARDING_RULES.register("aten.convolution.default")
def conv_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    return [op.make({x: Shard(0)}, Shard(0), "batch")]


# ------------------------------------------------------------------------------ reductions
def _dims_arg(op: OpView, rank: int, i: int = 1, name: str = "dim") -> set[int]:
    dims = op.arg(i, name)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return set(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return {_norm(d, rank) for d in dims}


def _keep_dims_strategies(
    op: OpView, x: Value, reduced: set[int], keepdim: bool, tag: str = "follow"
) -> list[AxisStrategy]:
    xt = op.t(x)
    out = []
    for d in range(xt.rank):
        if d in reduced or xt.shape[d] == 1:
            continue
        od = d if keepdim else d - sum(1 for r in reduced if r < d)
        out.append(op.make({x: Shard(d)}, Shard(od), tag))
    return out


def reduction_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    if xt is None:
        return []
    name = op.node.op
    if name.endswith(".default") and op.base in ("sum", "mean", "any", "all"):
        reduced, keep = set(range(xt.rank)), False
    else:
        reduced = _dims_arg(op, xt.rank)
        keep = bool(op.arg(2, "keepdim", False))
    out = _keep_dims_strategies(op, x, reduced, keep)
    if op.base in ("sum", "mean"):
        for d in reduced:
            if xt.shape[d] != 1:
                out.append(op.make({x: Shard(d)}, P, "partial"))
    return out


@SHARDING_RULES.register("aten.var.correction")
def var_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    reduced = _dims_arg(op, xt.rank)
    return _keep_dims_strategies(op, x, reduced, bool(op.node.kwargs.get("keepdim", False)))


VOCAB_SOFTMAX = "vocab"


@SHARDING_RULES.register(
    "aten._softmax.default", "aten._log_softmax.default", "aten.cumsum.default"
)
def softmax_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    dim = _norm(op.node.args[1], xt.rank)
    out = _keep_dims_strategies(op, x, {dim}, True)
    if op.node.op == "aten._log_softmax.default" and xt.shape[dim] != 1:
        # vocab-parallel log-softmax (Megatron's cross-entropy): the row max and the sum of
        # exponentials are all-reduced over the axis, so the logits stay split
        # (lower/rules.py emits it; cost_model.py prices the all-reduces)
        out.append(op.make({x: Shard(dim)}, Shard(dim), VOCAB_SOFTMAX))
    return out


@SHARDING_RULES.register("aten.topk.default")
def topk_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    return _keep_dims_strategies(op, x, {_norm(op.arg(2, "dim", -1), xt.rank)}, True)


@SHARDING_RULES.register("aten.sort.default")
def sort_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    return _keep_dims_strategies(op, x, {_norm(op.arg(1, "dim", -1), xt.rank)}, True)


@SHARDING_RULES.register("aten.native_layer_norm.default")
def layer_norm_rule(op: OpView) -> list[AxisStrategy]:
    x = op.node.args[0]
    xt = op.t(x)
    k = len(op.node.args[1])
    return [
        op.make({x: Shard(d)}, Shard(d), "follow") for d in range(xt.rank - k) if xt.shape[d] != 1
    ]


CATEGORY_RULES.register("pointwise")(pointwise_rule)
CATEGORY_RULES.register("reduction")(reduction_rule)


@CATEGORY_RULES.register("pool")
def pool_rule(op: OpView) -> list[AxisStrategy]:
    return [op.make({op.node.args[0]: Shard(0)}, Shard(0), "batch")]
