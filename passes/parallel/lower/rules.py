"""Per-op rewrites of the parallel lowering, in the `LOWERING_RULES` table keyed by op name.

A rule gets the RankLowering, the original node, its args/kwargs on local values, the local
output types and the output placements, and returns the local output Values. Most ops need
only local shapes in their size arguments; the others:

  linear / addmm  with a Partial output (row parallel): the bias is added on one rank of the
  / quant.linear  group only (the others run without it: linear without bias, mm for addmm,
                  quant.linear with bias None); packed quant.linear weights need no rewrite
                  (their shards are row or column slices of the int32 words, shard_specs)
  embedding       vocab parallel (weight sharded on rows, output Partial): look up local rows,
                  zero the rows of ids outside this rank's vocabulary range
  mean            over a sharded dim (output Partial): scale the local mean by 1 / shards
  _log_softmax    vocab parallel (input split along the softmax dim): the row max and the sum
                  of exponentials all-reduced over the split axes (max without a gradient:
                  the result does not depend on the shift), Megatron's cross-entropy
  gather          from a vocab-split input (output Partial): indices outside this rank's
                  range read row 0 and are zeroed, as for the embedding
  moe.experts     expert parallel (experts and tokens split on one axis): moe.experts_ep,
                  the all_to_all dispatch and combine over that axis's group

`setup.block_sources` says how a piece-by-piece (blocked) layout requested by a split flows back
through an op to its inputs (to the fused weight, in the end).
"""

from __future__ import annotations

import itertools
import math

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.ir.types import TensorType
from .setup import LoweringError, LoweringSetup
from ..strategies.axis import node_inputs

LOWERING_RULES = RuleTable("parallel_lowering")


def _floats():
    import torch

    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_FLOATS = _floats()


def default_rule(
    rl, n: Node, args: tuple, kwargs: dict, out_types: list, out_pls: list
) -> list[Value]:
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


@LOWERING_RULES.register(
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.expand.default"
)
def sized_view_rule(rl, n, args, kwargs, out_types, out_pls):
    args = (args[0], list(out_types[0].shape)) + tuple(args[2:])
    op = n.op
    src = args[0].producer
    if op == "aten.view.default" and src is not None and src.op in _STRIDED:
        # Local shapes can make a traced view of a permuted tensor stride-incompatible
        # (the kernels' output layouts depend on sizes); reshape copies when it must.
        op = "aten.reshape.default"
    return rl.emit_like(n, op, args, kwargs, out_types, out_pls)


_STRIDED = {
    "aten.permute.default",
    "aten.transpose.int",
    "aten.t.default",
    "aten.expand.default",
    "aten.slice.Tensor",
    "aten.select.int",
    "aten.scaled_dot_product_attention.default",
}


@LOWERING_RULES.register(
    "aten.full.default", "aten.zeros.default", "aten.ones.default", "aten.empty.memory_format"
)
def fill_rule(rl, n, args, kwargs, out_types, out_pls):
    args = (list(out_types[0].shape),) + tuple(args[1:])
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


@LOWERING_RULES.register("aten.split_with_sizes.default")
def split_rule(rl, n, args, kwargs, out_types, out_pls):
    x = rl.su.types[n.args[0]]
    d = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.rank
    sizes = [t.shape[d] for t in out_types]
    args = (args[0], sizes) + tuple(args[2:])
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


def _partial_axes(pl) -> list[int]:
    return [a for a, p in enumerate(pl or ()) if isinstance(p, Partial)]


def _keeps_bias(rl, out_pl, bias_pl) -> bool:
    """With a Partial output, only coordinate 0 of the partial axes adds a replicated bias."""
    return all(
        rl.coords[a] == 0 for a in _partial_axes(out_pl) if isinstance(bias_pl[a], Replicate)
    )


@LOWERING_RULES.register("aten.linear.default")
def linear_rule(rl, n, args, kwargs, out_types, out_pls):
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if (
        isinstance(bias, Value)
        and _partial_axes(out_pls[0])
        and not _keeps_bias(rl, out_pls[0], rl.su.in_pl[n][2])
    ):
        return rl.emit_like(n, n.op, (args[0], args[1]), {}, out_types, out_pls)
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


@LOWERING_RULES.register("quant.linear")
def quant_linear_rule(rl, n, args, kwargs, out_types, out_pls):
    bias = args[4] if len(args) > 4 else kwargs.get("bias")
    if (
        isinstance(bias, Value)
        and _partial_axes(out_pls[0])
        and not _keeps_bias(rl, out_pls[0], rl.su.in_pl[n][_input_index(n, 4, "bias")])
    ):
        args = tuple(args[:4]) + (None,) + tuple(args[5:]) if len(args) > 4 else args
        kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


def _input_index(n: Node, i: int, name: str) -> int:
    """Position in node.inputs (in_pl's order) of tensor argument i / keyword `name`."""
    v = n.args[i] if i < len(n.args) else n.kwargs.get(name)
    return node_inputs(n).index(v)


@LOWERING_RULES.register("aten.addmm.default")
def addmm_rule(rl, n, args, kwargs, out_types, out_pls):
    if _partial_axes(out_pls[0]) and not _keeps_bias(rl, out_pls[0], rl.su.in_pl[n][0]):
        if kwargs.get("alpha", 1) != 1:
            raise LoweringError(f"%{n.outputs[0].name}: row-parallel addmm with alpha != 1")
        return rl.emit_like(n, "aten.mm.default", (args[1], args[2]), {}, out_types, out_pls)
    return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)


@LOWERING_RULES.register("aten.embedding.default")
def embedding_rule(rl, n, args, kwargs, out_types, out_pls):
    su: LoweringSetup = rl.su
    w_pl = su.in_pl[n][0]
    vocab_axes = [
        a for a in _partial_axes(out_pls[0]) if isinstance(w_pl[a], Shard) and w_pl[a].dim == 0
    ]
    if not vocab_axes:
        return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)
    rows_axes = [a for a, p in enumerate(w_pl) if isinstance(p, Shard) and p.dim == 0]
    w, idx = args[0], args[1]
    it: TensorType = idx.type
    name = n.outputs[0].name
    safe, outside = _local_ids(rl, idx, _chunk(rl, rows_axes), w.type.shape[0], name)
    emb = rl.emit_like(n, n.op, (w, safe) + tuple(args[2:]), kwargs, out_types, out_pls)[0]
    mt = TensorType(tuple(it.shape) + (1,), _bool(), it.device)
    mask = rl.add("aten.unsqueeze.default", (outside, -1), {}, [mt], f"{name}_mask")
    return [
        rl.add(
            "aten.masked_fill.Scalar",
            (emb, mask, 0.0),
            {},
            out_types,
            f"{name}_local",
            placements=out_pls,
        )
    ]


def _local_ids(rl, idx: Value, chunk: int, size: int, name: str) -> tuple[Value, Value]:
    """(ids shifted into this rank's chunk of `size` rows, 0 where outside it; the outside
    mask): the masked local lookup of a vocab-split table (embedding, gather)."""
    it: TensorType = idx.type
    b8 = TensorType(it.shape, _bool(), it.device)
    shifted = rl.add("aten.sub.Tensor", (idx, chunk * size), {}, [it], f"{name}_ids")
    low = rl.add("aten.lt.Scalar", (shifted, 0), {}, [b8], f"{name}_lo")
    high = rl.add("aten.ge.Scalar", (shifted, size), {}, [b8], f"{name}_hi")
    outside = rl.add("aten.logical_or.default", (low, high), {}, [b8], f"{name}_out")
    safe = rl.add("aten.masked_fill.Scalar", (shifted, outside, 0), {}, [it], f"{name}_safe")
    return safe, outside


def _vocab_axes(rl, pl, dim: int) -> list[int]:
    return [a for a, p in enumerate(pl) if isinstance(p, Shard) and p.dim == dim
            and rl.mesh.shape[a] > 1]


def _chunk(rl, axes: list[int]) -> int:
    """This rank's chunk index of a dim split over `axes` (axis 0 outermost)."""
    chunk = 0
    for a in axes:
        chunk = chunk * rl.mesh.shape[a] + rl.coords[a]
    return chunk


@LOWERING_RULES.register("aten._log_softmax.default")
def log_softmax_rule(rl, n, args, kwargs, out_types, out_pls):
    x = args[0]
    dim = n.args[1] % x.type.rank
    axes = _vocab_axes(rl, rl.su.in_pl[n][0], dim)
    if not axes:
        return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)
    t: TensorType = x.type
    if t.dtype not in _FLOATS:
        raise LoweringError(f"%{n.outputs[0].name}: vocab-parallel log_softmax of {t.dtype}")
    name, group = n.outputs[0].name, _group_over(rl, axes)
    kw = {"axis": ",".join(rl.mesh.names[a] for a in axes), "group": group}
    row = t.with_shape(tuple(1 if d == dim else s for d, s in enumerate(t.shape)))
    local_max = rl.add("aten.amax.default", (x, [dim], True), {}, [row], f"{name}_lmax")
    shift = rl.add("dist.all_reduce", (local_max,), {**kw, "reduce": "max"}, [row],
                   f"{name}_max")
    z = rl.add("aten.sub.Tensor", (x, shift), {}, [t], f"{name}_z")
    e = rl.add("aten.exp.default", (z,), {}, [t], f"{name}_exp")
    local_sum = rl.add("aten.sum.dim_IntList", (e, [dim], True), {}, [row], f"{name}_lsum")
    total = rl.add("dist.all_reduce", (local_sum,), {**kw, "reduce": "sum"}, [row],
                   f"{name}_sum")
    log_total = rl.add("aten.log.default", (total,), {}, [row], f"{name}_lse")
    return [rl.add("aten.sub.Tensor", (z, log_total), {}, out_types, f"{name}_local",
                   placements=out_pls)]


@LOWERING_RULES.register("aten.gather.default")
def gather_rule(rl, n, args, kwargs, out_types, out_pls):
    x, idx = args[0], args[2]
    dim = n.args[1] % x.type.rank
    axes = [a for a in _vocab_axes(rl, rl.su.in_pl[n][0], dim)
            if isinstance(out_pls[0][a], Partial)]
    if not axes:
        return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)
    name = n.outputs[0].name
    safe, outside = _local_ids(rl, idx, _chunk(rl, axes), x.type.shape[dim], name)
    picked = rl.emit_like(n, n.op, (x, n.args[1], safe) + tuple(args[3:]), kwargs, out_types,
                          out_pls)[0]
    return [rl.add("aten.masked_fill.Scalar", (picked, outside, 0.0), {}, out_types,
                   f"{name}_local", placements=out_pls)]


def _bool():
    import torch

    return torch.bool


@LOWERING_RULES.register("aten.mean.dim", "aten.mean.default")
def mean_rule(rl, n, args, kwargs, out_types, out_pls):
    outs = rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)
    in_pl = rl.su.in_pl[n][0]
    k = math.prod(
        rl.mesh.shape[a] for a in _partial_axes(out_pls[0]) if isinstance(in_pl[a], Shard)
    )
    if k == 1:
        return outs
    return [
        rl.add(
            "aten.mul.Tensor",
            (outs[0], 1.0 / k),
            {},
            out_types,
            f"{outs[0].name}_avg",
            placements=out_pls,
        )
    ]


@LOWERING_RULES.register("moe.experts")
def moe_experts_rule(rl, n, args, kwargs, out_types, out_pls):
    """Under the ep strategy (stacked expert weights split on E over mesh axes on which the
    tokens are split too) a rank runs `moe.experts_ep` (ir/ops/moe_ep.py) over the group of
    those axes; otherwise the local moe.experts on its tokens (batch) or f-slices (expert
    slicing: the output is the partial sum the plan says)."""
    ins = node_inputs(n)
    x, w_in = n.args[0], n.args[3]
    x_pl, w_pl = rl.su.in_pl[n][ins.index(x)], rl.su.in_pl[n][ins.index(w_in)]
    axes = [a for a, p in enumerate(w_pl)
            if isinstance(p, Shard) and p.dim == 0 and rl.mesh.shape[a] > 1]
    if not axes:
        return rl.emit_like(n, n.op, args, kwargs, out_types, out_pls)
    if any(x_pl[a] != Shard(0) for a in axes):
        where = f" (from {n.source})" if n.source else ""
        raise LoweringError(
            f"moe.experts %{n.outputs[0].name}{where}: experts split on E over mesh axes "
            f"{[rl.mesh.names[a] for a in axes]} with tokens {tuple(map(str, x_pl))}; expert "
            f"parallelism needs the tokens split (dim 0) on every axis that splits the experts"
        )
    kw = dict(kwargs, axis=",".join(rl.mesh.names[a] for a in axes),
              group=_group_over(rl, axes), num_experts=rl.su.types[w_in].shape[0])
    return rl.emit_like(n, "moe.experts_ep", args, kw, out_types, out_pls)


def _group_over(rl, axes: list[int]) -> list[int]:
    """This rank's group over mesh `axes`, ordered as the shard specs number the chunks of a
    dim split over them (axis 0 outermost): ascending global ranks."""
    out = []
    for point in itertools.product(*(range(rl.mesh.shape[a]) for a in axes)):
        c = list(rl.coords)
        for a, k in zip(axes, point):
            c[a] = k
        out.append(rl.mesh.coords_rank(c))
    return out
