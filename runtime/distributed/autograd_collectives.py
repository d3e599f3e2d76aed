"""Differentiable collectives: each forward's backward is its exact adjoint.

Training runs the rank's IR under autograd, so every collective needs a backward. We use the
exact adjoint of each collective as a linear map over the ranks' local copies:

    all_reduce (P -> R)        backward: all_reduce of the output grads
    all_gather (S(d) -> R)     backward: reduce_scatter along d
    reduce_scatter (P -> S(d)) backward: all_gather along d
    all_to_all (S(i) -> S(j))  backward: all_to_all (S(j) -> S(i))
    send / recv                backward: recv / send of the gradient

With exact adjoints a replicated value's gradient is the *sum* over its copies, so the executor
(1) seeds each rank's loss with 1 / (number of ranks holding an identical copy of it) and
(2) sums a parameter's gradient over the mesh axes on which the parameter is replicated. That
convention is right for any placement the planner picks (Megatron's f/g operators are the
special case where the redundant copies are left unsummed and not divided).

Groups are looked up by their global rank lists (groups.get_group). Shards are even: a dim that
does not divide by the group size is an error naming the shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import DistributedError
from .groups import get_group

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group(ranks):
    return get_group(list(ranks))


def _raw_all_reduce(x: torch.Tensor, ranks) -> torch.Tensor:
    y = x.detach().clone(memory_format=torch.contiguous_format)
    if len(ranks) > 1:
        dist.all_reduce(y, group=_group(ranks))
    return y


def _raw_all_gather(x: torch.Tensor, dim: int, ranks) -> torch.Tensor:
    n = len(ranks)
    if n == 1:
        return x.detach().clone()
    dim = dim % x.dim()
    src = x.detach().movedim(dim, 0).contiguous()
    out = src.new_empty((n * src.shape[0], *src.shape[1:]))
    _all_gather_single(out, src, group=_group(ranks))
    return out.movedim(0, dim)


def _raw_reduce_scatter(x: torch.Tensor, dim: int, ranks) -> torch.Tensor:
    n = len(ranks)
    if n == 1:
        return x.detach().clone()
    dim = dim % x.dim()
    if x.shape[dim] % n:
        raise DistributedError(
            f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} does not "
            f"divide over {n} ranks {list(ranks)}"
        )
    src = x.detach().movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
    _reduce_scatter_single(out, src, group=_group(ranks))
    return out.movedim(0, dim)


def _raw_all_to_all(x: torch.Tensor, split_dim: int, cat_dim: int, ranks) -> torch.Tensor:
    n = len(ranks)
    if n == 1:
        return x.detach().clone()
    split_dim, cat_dim = split_dim % x.dim(), cat_dim % x.dim()
    if x.shape[split_dim] % n:
        raise DistributedError(
            f"all_to_all: dim {split_dim} of shape {tuple(x.shape)} does "
            f"not divide over {n} ranks {list(ranks)}"
        )
    src = torch.stack(x.detach().chunk(n, split_dim)).contiguous()
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src, group=_group(ranks))
    return torch.cat(list(out.unbind(0)), cat_dim)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return _raw_all_reduce(x, ranks)

    @staticmethod
    def backward(ctx, g):
        return _raw_all_reduce(g, ctx.ranks), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return _raw_all_gather(x, dim, ranks)

    @staticmethod
    def backward(ctx, g):
        return _raw_reduce_scatter(g, ctx.dim, ctx.ranks), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ranks):
        ctx.dim, ctx.ranks = dim, ranks
        return _raw_reduce_scatter(x, dim, ranks)

    @staticmethod
    def backward(ctx, g):
        return _raw_all_gather(g, ctx.dim, ctx.ranks), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split_dim, cat_dim, ranks):
        ctx.dims, ctx.ranks = (split_dim, cat_dim), ranks
        return _raw_all_to_all(x, split_dim, cat_dim, ranks)

    @staticmethod
    def backward(ctx, g):
        split_dim, cat_dim = ctx.dims
        return _raw_all_to_all(g, cat_dim, split_dim, ctx.ranks), None, None, None


def _tuple(ranks) -> tuple[int, ...]:
    return tuple(int(r) for r in ranks)


def all_reduce(x: torch.Tensor, ranks) -> torch.Tensor:
    """Sum over `ranks` (Partial -> Replicate)."""
    return _AllReduce.apply(x, _tuple(ranks))


def all_reduce_max(x: torch.Tensor, ranks) -> torch.Tensor:
    """Elementwise max over `ranks`, without a gradient: the IR uses it only for the shift of
    a vocab-parallel log-softmax, whose result does not depend on the shift."""
    y = x.detach().clone(memory_format=torch.contiguous_format)
    if len(ranks) > 1:
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=_group(ranks))
    return y


def all_gather(x: torch.Tensor, dim: int, ranks) -> torch.Tensor:
    """Concatenate the shards of `ranks` along `dim`, in rank order (Shard(dim) -> Replicate)."""
    return _AllGather.apply(x, dim, _tuple(ranks))


def reduce_scatter(x: torch.Tensor, dim: int, ranks) -> torch.Tensor:
    """Sum over `ranks`, keep this rank's slice along `dim` (Partial -> Shard(dim))."""
    return _ReduceScatter.apply(x, dim, _tuple(ranks))


def all_to_all(x: torch.Tensor, split_dim: int, cat_dim: int, ranks) -> torch.Tensor:
    """Split along `split_dim`, exchange, concatenate along `cat_dim` (S(cat) -> S(split))."""
    return _AllToAll.apply(x, split_dim, cat_dim, _tuple(ranks))


# ------------------------------------------------------------------------ point to point
class P2P:
    """Stage-to-stage transfers for one executor: async sends, blocking receives.

    Sends are `isend`s kept pending until `flush()`, so that a schedule in which two
    neighbouring stages both send before they receive (1F1B's steady state) cannot deadlock.
    Each transfer has its own tags (value, layout header, gradient), so receives may be posted
    in any order. A value travels in its memory layout: the sender sends the dim order of its
    strides first, so that the receiver's tensor has the same strides (IR `view`s after a
    `permute` depend on them). Both ends decide whether a gradient flows back the same way
    (`grad` and a floating dtype). Receives whose gradient autograd never asked for (the value
    did not reach the loss) are answered with zeros by `answer_unused(key)` after that
    micro-batch's backward, so the sender's backward does not wait forever.

    `tag_offset` is added to every transfer's tag: a caller that runs several micro-batches
    forward and leaves their backward to one autograd call (runtime/distributed/module.py),
    in whatever order the engine takes them, gives each micro-batch its own tags.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[object, torch.Tensor]] = []
        self.open_recvs: dict[object, list[dict]] = {}
        self.tag_offset = 0

    def isend(self, t: torch.Tensor, peer: int, tag: int) -> None:
        t = t.detach().contiguous()
        self.pending.append((dist.isend(t, peer, tag=tag), t))

    def recv(self, shape, dtype, device, peer: int, tag: int) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(t, peer, tag=tag)
        return t

    def send_value(self, x: torch.Tensor, peer: int, tag: int) -> None:
        strides = list(x.stride()) if 0 not in x.stride() else list(x.contiguous().stride())
        self.isend(torch.tensor(strides, dtype=torch.long, device=x.device), peer, 4 * tag + 1)
        self.isend(x, peer, 4 * tag)

    def recv_value(self, shape, dtype, device, peer: int, tag: int) -> torch.Tensor:
        strides = torch.zeros(len(shape), dtype=torch.long, device=device)
        dist.recv(strides, peer, tag=4 * tag + 1)
        data = self.recv(shape, dtype, device, peer, 4 * tag)
        if tuple(strides.tolist()) == data.stride():
            return data
        out = torch.empty_strided(tuple(shape), tuple(strides.tolist()), dtype=dtype, device=device)
        return out.copy_(data)

    def send(self, x: torch.Tensor, peer: int, tag: int, grad: bool) -> torch.Tensor | None:
        """Send x. With `grad`, returns a scalar to backprop from: its backward receives x's
        gradient from `peer` (and passes it into x's autograd graph)."""
        tag += self.tag_offset
        if not (grad and x.is_floating_point()):
            self.send_value(x, peer, tag)
            return None
        if not x.requires_grad:  # the peer sends a gradient anyway: receive and drop it
            x = x.detach().requires_grad_()
        return _Send.apply(x, peer, tag, self)

    def receive(
        self, shape, dtype, device, peer: int, tag: int, grad: bool, key: object = None
    ) -> torch.Tensor:
        """Receive a value; with `grad`, its backward sends the gradient back to `peer`."""
        tag += self.tag_offset
        if not (grad and dtype.is_floating_point):
            return self.recv_value(shape, dtype, device, peer, tag)
        record = {
            "peer": peer,
            "tag": tag,
            "shape": tuple(shape),
            "dtype": dtype,
            "device": device,
            "answered": False,
        }
        self.open_recvs.setdefault(key, []).append(record)
        anchor = torch.zeros((), device=device, requires_grad=True)
        return _Recv.apply(anchor, record, self)

    def answer_unused(self, key: object = None) -> None:
        for r in self.open_recvs.pop(key, []):
            if not r["answered"]:
                zeros = torch.zeros(r["shape"], dtype=r["dtype"], device=r["device"])
                self.isend(zeros, r["peer"], 4 * r["tag"] + 2)

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, peer, tag, p2p):
        ctx.meta = (tuple(x.shape), x.dtype, x.device, peer, tag, p2p)
        p2p.send_value(x, peer, tag)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        shape, dtype, device, peer, tag, p2p = ctx.meta
        return p2p.recv(shape, dtype, device, peer, 4 * tag + 2), None, None, None


class _Recv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, record, p2p):
        ctx.record, ctx.p2p = record, p2p
        return p2p.recv_value(
            record["shape"], record["dtype"], record["device"], record["peer"], record["tag"]
        )

    @staticmethod
    def backward(ctx, g):
        r = ctx.record
        ctx.p2p.isend(g, r["peer"], 4 * r["tag"] + 2)
        r["answered"] = True
        return torch.zeros((), device=g.device), None, None
