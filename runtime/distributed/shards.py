"""Slicing a full tensor into a rank's shard, and reassembling shards, by placements.

Placements follow DTensor: entry `a` is the layout over mesh axis `a`. When several axes shard
the same dim, axis 0's split is the outer one (the dim is cut into mesh.shape[0] blocks, each
block cut again over the next sharding axis). Partial means each rank holds a summand.
These helpers serve user inputs, labels and outputs (the planner's lowering slices parameters
with its own `shard_tensor` and `graph.meta["shard_specs"]`, when it provides them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ...ir.sharding import Partial, Placement, Replicate, Shard
from .errors import DistributedError


def local_shard(
    full: torch.Tensor,
    placements: Sequence[Placement],
    coords: Sequence[int],
    mesh_shape: Sequence[int],
) -> torch.Tensor:
    """This rank's piece of `full` (Partial: the whole tensor on coordinate 0, zeros elsewhere)."""
    t = full
    for p, c, n in zip(placements, coords, mesh_shape):
        if isinstance(p, Shard):
            d = p.dim % t.dim()
            if t.shape[d] % n:
                raise DistributedError(
                    f"cannot shard dim {d} of shape {tuple(t.shape)} over {n} ranks evenly"
                )
            t = t.chunk(n, d)[c]
        elif isinstance(p, Partial):
            t = t if c == 0 else torch.zeros_like(t)
    return t.contiguous()


def assemble(
    shards: Mapping[tuple[int, ...], torch.Tensor],
    placements: Sequence[Placement],
    mesh_shape: Sequence[int],
) -> torch.Tensor:
    """Inverse of local_shard: the full tensor from every mesh coordinate's shard."""

    def rec(axis: int, prefix: tuple[int, ...]) -> torch.Tensor:
        if axis == len(mesh_shape):
            return shards[prefix]
        p = placements[axis]
        parts = [rec(axis + 1, prefix + (c,)) for c in range(mesh_shape[axis])]
        if isinstance(p, Shard):
            return torch.cat(parts, p.dim % parts[0].dim())
        if isinstance(p, Partial):
            return torch.stack(parts).sum(0)
        return parts[0]

    return rec(0, ())


def as_placements(p, ndim: int) -> tuple[Placement, ...]:
    """Placements from a tuple of Placement objects or strings ("R", "S(0)", "P"), or None."""
    from ...ir.sharding import parse_placement

    if p is None:
        return tuple(Replicate() for _ in range(ndim))
    out = tuple(parse_placement(x) if isinstance(x, str) else x for x in p)
    if len(out) != ndim:
        raise DistributedError(f"placements {p} do not have one entry per mesh axis ({ndim})")
    return out


def spec_from_placements(
    placements: Sequence[Placement], coords: Sequence[int], mesh_shape: Sequence[int]
) -> list[tuple[int, int, int]]:
    """The `shard_specs` entry (lower.py's format) that local_shard's placements amount to."""
    out = []
    for p, c, n in zip(placements, coords, mesh_shape):
        if isinstance(p, Partial):
            raise DistributedError("a Partial value has no shard spec")
        if isinstance(p, Shard):
            out.append((p.dim, c, n))
    return out


def apply_spec(full: torch.Tensor, spec: Sequence[tuple]) -> torch.Tensor:
    """Cut `full` by a shard spec (ir.ops.collectives.cut_by_spec; lower.py's `shard_tensor`
    without its final copy)."""
    from ...ir.ops.collectives import cut_by_spec

    return cut_by_spec(full, spec)


def assemble_from_specs(
    shape: Sequence[int], pieces: Sequence[tuple[Sequence[tuple], torch.Tensor]]
) -> torch.Tensor:
    """The full tensor from (shard spec, shard) pairs, whatever the specs cut (fused blocks
    too): each shard is scattered to the positions its spec selects from an index tensor."""
    index = torch.arange(math.prod(shape)).view(tuple(shape))
    flat = torch.zeros(math.prod(shape), dtype=pieces[0][1].dtype)
    seen = torch.zeros(math.prod(shape), dtype=torch.bool)
    for spec, shard in pieces:
        where = apply_spec(index, spec).reshape(-1)
        flat[where] = shard.detach().reshape(-1).to(flat.dtype)
        seen[where] = True
    if not bool(seen.all()):
        raise DistributedError(
            f"the shards cover {int(seen.sum())} of {seen.numel()} elements "
            f"of a tensor of shape {tuple(shape)}"
        )
    return flat.view(tuple(shape))
