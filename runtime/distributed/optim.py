"""Gradient synchronization and the optimizer step for one rank's parameter shards.

After backward, a parameter shard's gradient is this rank's contribution only (see
autograd_collectives: exact adjoints). The true gradient of a shard is the sum over every rank
holding the same shard, i.e. over the mesh axes on which the parameter is replicated, so
`ShardedOptimizer.step` all-reduces (sum) over those axes, bucketed: one collective per set of
axes. Every rank issues the same sequence of collectives, because the buckets are keyed by
axis indices and every rank of a stage holds the same parameters.

ZeRO-1 (plan.zero): over the "dp" axis the gradient is reduce-scattered instead; each dp rank
owns a 1/dp slice of every parameter replicated over dp (flattened, padded to a multiple of
dp), keeps optimizer state only for its slices, updates them and all-gathers the updated
slices back into the full local shard.

The optimizer is torch.optim's SGD (default: lr 0.1, momentum 0.9) or Adam, on both the
distributed and the single-device side, so the two compare element for element.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .autograd_collectives import _all_gather_single, _reduce_scatter_single
from .groups import get_group


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer of a training run: "sgd" (with momentum) or "adam"."""

    kind: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in ("sgd", "adam"):
            raise ValueError(f"OptimConfig.kind={self.kind!r}: expected 'sgd' or 'adam'")

    def build(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        cls, kwargs = self.torch_args()
        return cls(params, **kwargs)

    def torch_args(self) -> tuple[type, dict]:
        """(torch optimizer class, its keyword arguments): what `build` constructs."""
        if self.kind == "sgd":
            return torch.optim.SGD, {"lr": self.lr, "momentum": self.momentum, "foreach": False}
        return torch.optim.Adam, {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                                  "foreach": False}


@dataclasses.dataclass
class ParamSync:
    """How one parameter shard's gradient is completed.

    sum_axes: mesh axes to all-reduce over (the parameter is replicated there);
    zero_axis: the axis whose ranks each own a slice of it (ZeRO-1), or None.
    """

    sum_axes: tuple[int, ...]
    zero_axis: int | None = None


class ShardedOptimizer:
    """Completes gradients and steps the optimizer for a rank's parameter shards.

    `axis_ranks[a]` is the list of global ranks along mesh axis `a` through this rank.
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        sync: Mapping[str, ParamSync],
        axis_ranks: Sequence[Sequence[int]],
        my_rank: int,
        config: OptimConfig,
        ties: Sequence[tuple[Sequence[str], Sequence[int]]] = (),
        full_ties: Sequence = (),
    ):
        self.params = dict(params)
        self.ties = [(list(names), list(ranks)) for names, ranks in ties]
        # program.FullTie (copies on differently shaped stages), with the flat positions of
        # each local shard in the full tensor, computed once
        self.full_ties = [(tie, *_tie_layout(tie, self.params)) for tie in full_ties]
        self.sync = dict(sync)
        self.axis_ranks = [list(r) for r in axis_ranks]
        self.config = config
        self.zero_names = sorted(n for n, s in self.sync.items() if s.zero_axis is not None)
        self.plain_names = sorted(n for n in self.params if n not in self.zero_names)
        self.slices: dict[str, torch.nn.Parameter] = {}
        self._zero_layout: dict[str, tuple[int, int]] = {}  # name -> (chunk, offset in row)
        zero_axes = {self.sync[n].zero_axis for n in self.zero_names}
        if len(zero_axes) > 1:
            raise ValueError(f"ZeRO over several axes {zero_axes} is not supported")
        self.zero_axis = zero_axes.pop() if zero_axes else None
        if self.zero_axis is not None:
            ranks = sorted(self.axis_ranks[self.zero_axis])
            self.zero_n, self.zero_k = len(ranks), ranks.index(my_rank)
            self._init_zero_slices()
        opt_params = [self.params[n] for n in self.plain_names]
        opt_params += [self.slices[n] for n in self.zero_names]
        self.optimizer = config.build(opt_params) if opt_params else None

    def _init_zero_slices(self) -> None:
        offset = 0
        for n in self.zero_names:
            p = self.params[n]
            chunk = -(-p.numel() // self.zero_n)
            self._zero_layout[n] = (chunk, offset)
            offset += chunk
            flat = _padded(p.detach().reshape(-1), chunk * self.zero_n)
            piece = flat[self.zero_k * chunk : (self.zero_k + 1) * chunk].clone()
            self.slices[n] = torch.nn.Parameter(piece)

    # ---------------------------------------------------------------- gradients
    def sync_grads(self) -> None:
        """All-reduce gradients over the replicated axes (bucketed by axis set)."""
        buckets: dict[tuple[int, ...], list[str]] = {}
        for n in sorted(self.params):
            axes = tuple(a for a in self.sync[n].sum_axes if len(self.axis_ranks[a]) > 1)
            if axes:
                buckets.setdefault(axes, []).append(n)
        for axes in sorted(buckets):
            names = buckets[axes]
            flat = torch.cat([self._grad(n).reshape(-1) for n in names])
            for a in axes:
                dist.all_reduce(flat, group=get_group(self.axis_ranks[a]))
            self._scatter_back(flat, names)

    def sync_ties(self) -> None:
        """Tied parameters: every copy gets the sum of all copies' gradients.

        `ties` holds (value names, ranks holding a copy at this rank's mesh coordinates), in
        the same order on every rank; ranks holding none of the names skip the group.
        """
        for names, ranks in self.ties:
            local = [n for n in names if n in self.params]
            if not local:
                continue
            total = torch.stack([self._grad(n) for n in local]).sum(0)
            if len(ranks) > 1:
                dist.all_reduce(total, group=get_group(ranks))
            for n in local:
                self._grad(n).copy_(total)
        for tie, numel, flat in self.full_ties:
            self._sync_full_tie(tie, numel, flat)

    def _sync_full_tie(self, tie, numel: int, flat: dict[str, torch.Tensor]) -> None:
        """Sum tied copies whose shards do not line up (stages of different mesh shapes).

        Each rank adds its shard's gradient into a zero full-size tensor, divided by the
        number of ranks of its stage that hold the same, already summed, gradient (the
        replicated axes sync_grads reduced). The all-reduce over every rank of the tie's
        stages then gives the full sum of all copies; each rank takes its shard back. Under
        ZeRO the zero axis is still unreduced: the shard is divided by its size, so the
        reduce-scatter that follows sums it back to the total.
        """
        first = self._grad(next(iter(flat)))
        total = torch.zeros(numel, dtype=first.dtype, device=first.device)
        for n, idx in flat.items():
            copies = math.prod(len(self.axis_ranks[a]) for a in self.sync[n].sum_axes)
            total.index_add_(0, idx, self._grad(n).reshape(-1) / copies)
        dist.all_reduce(total, group=get_group(tie.ranks))
        for n, idx in flat.items():
            z = self.sync[n].zero_axis
            div = len(self.axis_ranks[z]) if z is not None else 1
            self._grad(n).copy_((total[idx] / div).view_as(self._grad(n)))

    def _grad(self, name: str) -> torch.Tensor:
        p = self.params[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad

    def _scatter_back(self, flat: torch.Tensor, names: list[str]) -> None:
        offset = 0
        for n in names:
            g = self._grad(n)
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---------------------------------------------------------------- step
    def step(self) -> None:
        self.sync_grads()
        self.sync_ties()
        if self.zero_names:
            self._zero_reduce_scatter()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.zero_names:
            self._zero_all_gather()

    def zero_grad(self) -> None:
        for p in [*self.params.values(), *self.slices.values()]:
            p.grad = None

    def _zero_reduce_scatter(self) -> None:
        """One reduce-scatter: row k of a [dp, C] buffer holds rank k's slice of each grad."""
        n = self.zero_n
        rows = []
        for name in self.zero_names:
            chunk, _ = self._zero_layout[name]
            rows.append(_padded(self._grad(name).reshape(-1), chunk * n).view(n, chunk))
        buf = torch.cat(rows, 1).contiguous()
        mine = buf.new_empty((1, buf.shape[1]))
        _reduce_scatter_single(mine, buf, group=get_group(self.axis_ranks[self.zero_axis]))
        for name in self.zero_names:
            chunk, off = self._zero_layout[name]
            self.slices[name].grad = mine[0, off : off + chunk].clone()

    def _zero_all_gather(self) -> None:
        n = self.zero_n
        mine = torch.cat([self.slices[name].detach() for name in self.zero_names]).view(1, -1)
        full = mine.new_empty((n, mine.shape[1]))
        _all_gather_single(full, mine, group=get_group(self.axis_ranks[self.zero_axis]))
        with torch.no_grad():
            for name in self.zero_names:
                chunk, off = self._zero_layout[name]
                p = self.params[name]
                flat = full[:, off : off + chunk].reshape(-1)[: p.numel()]
                p.copy_(flat.view_as(p))

    # ---------------------------------------------------------------- inspection
    def state_numel(self) -> int:
        """Elements of optimizer state held by this rank (momentum / Adam moments)."""
        if self.optimizer is None:
            return 0
        return sum(
            t.numel()
            for st in self.optimizer.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )


def _padded(flat: torch.Tensor, size: int) -> torch.Tensor:
    if flat.numel() == size:
        return flat
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


def _tie_layout(tie, params: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """(numel of the full tensor, local name -> flat positions of its shard in it)."""
    from ...ir.ops.collectives import cut_by_spec

    local = [n for n in tie.names if n in params]
    shape = _full_shape(params[local[0]].shape, tie.specs[local[0]])
    index = torch.arange(math.prod(shape), device=params[local[0]].device).view(shape)
    return math.prod(shape), {n: cut_by_spec(index, tie.specs[n]).reshape(-1) for n in local}


def _full_shape(local: Sequence[int], spec: Sequence[tuple]) -> tuple[int, ...]:
    """The full shape behind a shard cut by `spec` (each (dim, index, count[, blocks]) entry
    divided dim `dim` by `count`)."""
    shape = list(local)
    for entry in spec:
        if entry[0] == "rebatch":
            raise ValueError("a tied parameter cannot be cut along a batch dim")
        shape[entry[0]] *= entry[2]
    return tuple(shape)
