"""Collective and point-to-point ops of per-rank programs (`dist.*`), from the parallel lowering.

passes/parallel/lower/ turns a planned graph into one program per rank; the data movement
between ranks is explicit in it as these ops. Keyword arguments (the contract with the
distributed runtime):

  dist.all_reduce(x, axis=, group=, reduce="sum")          same shape; reduce "sum" or "max"
                                                           ("max" carries no gradient: the
                                                           shift of a vocab-parallel softmax)
  dist.all_gather(x, axis=, group=, dim=)                  shape[dim] * len(group)
  dist.reduce_scatter(x, axis=, group=, dim=, reduce="sum") shape[dim] / len(group)
  dist.all_to_all(x, axis=, group=, dim=, concat_dim=)     split `dim`, concatenate `concat_dim`
  dist.local_shard(x, axis=, group=, dim=, index=, count=, blocks=None)
                                                           this rank's slice, no communication
  dist.send(x, dst=, tag=)                                 -> an opaque token
  dist.recv(src=, tag=, shape=, dtype=)                    -> the tensor sent with that tag

`axis` names the mesh axis; `group` lists the global ranks of this rank's group along it, in
mesh-coordinate order (ascending ranks), so chunk i of a gather or scatter belongs to
group[i]. `blocks` (local_shard) cuts each of the given consecutive blocks of `dim` (global
sizes) separately, for tensors that a later split hands out piece by piece (a fused QKV
projection). The eager implementations use torch.distributed with the process group that
`meshweave.runtime.distributed.groups.get_group(group)` returns (imported lazily: nothing
here needs torch.distributed unless a program runs).
"""

from __future__ import annotations

import torch

from ..registry import register_op
from ..types import OpaqueType, TensorType, dtype_from_short
from .common import norm_dim


def _group(ranks):
    from meshweave.runtime.distributed.groups import get_group

    return get_group(ranks)


def _my_index(group) -> int:
    import torch.distributed as dist

    return list(group).index(dist.get_rank())


def _resize(x: TensorType, dim: int, factor: float) -> TensorType:
    d = norm_dim(dim, x.rank)
    shape = list(x.shape)
    shape[d] = shape[d] * factor if factor >= 1 else shape[d] // round(1 / factor)
    return x.with_shape(shape)


# ------------------------------------------------------------------------------ eager impls
def all_reduce(x: torch.Tensor, *, axis=None, group, reduce: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if reduce not in ("sum", "max"):
        raise ValueError(f"dist.all_reduce: reduce must be 'sum' or 'max', got {reduce!r}")
    y = x.clone()
    op = dist.ReduceOp.SUM if reduce == "sum" else dist.ReduceOp.MAX
    dist.all_reduce(y, op=op, group=_group(group))
    return y


def all_gather(x: torch.Tensor, *, axis=None, group, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in group]
    dist.all_gather(parts, x, group=_group(group))
    return torch.cat(parts, dim)


def reduce_scatter(
    x: torch.Tensor, *, axis=None, group, dim: int, reduce: str = "sum"
) -> torch.Tensor:
    # gloo has no reduce_scatter: all-reduce, then keep this rank's chunk.
    y = all_reduce(x, group=group, reduce=reduce)
    return y.chunk(len(group), dim)[_my_index(group)].contiguous()


def all_to_all(x: torch.Tensor, *, axis=None, group, dim: int, concat_dim: int) -> torch.Tensor:
    import torch.distributed as dist

    n = len(group)
    src = torch.stack(x.chunk(n, dim)).contiguous()  # chunk i goes to group[i]
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src, group=_group(group))
    return torch.cat(list(out.unbind(0)), concat_dim)


def local_shard(
    x: torch.Tensor, *, axis=None, group=None, dim: int, index: int, count: int, blocks=None
) -> torch.Tensor:
    return shard_slice(x, dim, index, count, blocks)


def shard_slice(x: torch.Tensor, dim: int, index: int, count: int, blocks=None) -> torch.Tensor:
    """Chunk `index` of `count` along `dim`; with `blocks`, that chunk of every block."""
    pieces = torch.split(x, list(blocks), dim) if blocks else [x]
    for p in pieces:
        if p.shape[dim] % count:
            raise ValueError(
                f"cannot cut dim {dim} of size {p.shape[dim]} into {count} equal shards"
            )
    return torch.cat([p.chunk(count, dim)[index] for p in pieces], dim).contiguous()


def cut_by_spec(full: torch.Tensor, spec) -> torch.Tensor:
    """A rank's piece of `full` by a shard spec, entries applied in order: (dim, index, count),
    (dim, index, count, blocks) cut as shard_slice does, ("rebatch", dim, size) keeps `size`
    rows (broadcasting a single one). Meta tensors get the piece's shape, nothing else."""
    t = full
    for entry in spec:
        if entry[0] == "rebatch":
            _, dim, size = entry
            if t.shape[dim] >= size:
                t = t.narrow(dim, 0, size)
            else:
                t = t.narrow(dim, 0, 1).expand([*t.shape[:dim], size, *t.shape[dim + 1 :]])
            continue
        dim, index, count = entry[:3]
        if t.device.type == "meta":
            shape = list(t.shape)
            shape[dim] //= count
            t = torch.empty(shape, dtype=t.dtype, device="meta")
        else:
            t = shard_slice(t, dim, index, count, entry[3] if len(entry) > 3 else None)
    return t


def send(x: torch.Tensor, *, dst: int, tag: int = 0):
    import torch.distributed as dist

    dist.send(x.contiguous(), dst, tag=tag)


def recv(*, src: int, tag: int = 0, shape, dtype) -> torch.Tensor:
    import torch.distributed as dist

    dt = dtype if isinstance(dtype, torch.dtype) else dtype_from_short(str(dtype))
    t = torch.empty(tuple(shape), dtype=dt)
    dist.recv(t, src, tag=tag)
    return t


# ------------------------------------------------------------------------------ registration
def _gather_rule(x, *, axis=None, group, dim):
    return [_resize(x, dim, len(group))]


def _scatter_rule(x, *, axis=None, group, dim, reduce="sum"):
    return [_resize(x, dim, 1 / len(group))]


def _a2a_rule(x, *, axis=None, group, dim, concat_dim):
    return [_resize(_resize(x, dim, 1 / len(group)), concat_dim, len(group))]


def _shard_rule(x, *, axis=None, group=None, dim, index, count, blocks=None):
    return [_resize(x, dim, 1 / count)]


def _recv_rule(*, src, tag=0, shape, dtype):
    dt = dtype if isinstance(dtype, torch.dtype) else dtype_from_short(str(dtype))
    return [TensorType(tuple(shape), dt)]


def _zero(args, kwargs, outs):
    return 0


def _moved(args, kwargs, outs):
    t = args[0] if args else outs[0]
    return t.nbytes() if isinstance(t, TensorType) else 0


_DOC = "see ir/ops/collectives.py for the keyword contract"
register_op(
    "dist.all_reduce",
    all_reduce,
    shape=lambda x, **kw: [x],
    flops=_zero,
    bytes=_moved,
    category="collective",
    doc=_DOC,
)
register_op(
    "dist.all_gather",
    all_gather,
    shape=_gather_rule,
    flops=_zero,
    bytes=_moved,
    category="collective",
    doc=_DOC,
)
register_op(
    "dist.reduce_scatter",
    reduce_scatter,
    shape=_scatter_rule,
    flops=_zero,
    bytes=_moved,
    category="collective",
    doc=_DOC,
)
register_op(
    "dist.all_to_all",
    all_to_all,
    shape=_a2a_rule,
    flops=_zero,
    bytes=_moved,
    category="collective",
    doc=_DOC,
)
register_op(
    "dist.local_shard",
    local_shard,
    shape=_shard_rule,
    flops=_zero,
    bytes=_moved,
    category="copy",
    doc="this rank's slice of a replicated value (no communication)",
)
register_op(
    "dist.send",
    send,
    shape=lambda x, **kw: [OpaqueType("token")],
    flops=_zero,
    bytes=_moved,
    category="collective",
    doc=_DOC,
)
register_op(
    "dist.recv", recv, shape=_recv_rule, flops=_zero, bytes=_moved, category="collective", doc=_DOC
)
