"""Stage-to-stage transfers between stage meshes of different shapes (Alpa's cross-mesh
resharding).

A value produced on stage s in placements P (over s's mesh) is read on stage d in the same
placement strings over d's mesh, e.g. ("S(0)", "R") on a (2, 2) mesh and on a (1, 2) mesh:
the batch is split in two on the first stage and whole on the second. Every rank's piece of
a (non-partial) value is a box of the global tensor: per dim a contiguous interval, because
placements cut dims into equal chunks, mesh axis 0 first (the order of lower.shard_tensor).

`transfer_schedule` intersects each destination rank's box with the distinct boxes the source
ranks hold and lists the pieces (src rank, dst rank, box). Source replicas hold the same box;
the one that sends to a destination is the destination's peer at the same local index when it
is a replica, otherwise one picked round-robin, so sends spread over the replicas. Between two
meshes of the same shape and the same placements this is the plain peer-to-peer transfer.
The source slices its piece out of its local tensor and sends it; the destination receives
its pieces, which tile its box as a grid, and concatenates them (`assemble_order`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Partial, Placement, Shard
from .setup import LoweringError

Box = tuple[tuple[int, int], ...]  # per dim [start, end) in global coordinates


@dataclasses.dataclass(frozen=True)
class Piece:
    src: int  # global rank that sends
    dst: int  # global rank that receives
    box: Box  # the part of the global tensor it carries


def rank_box(
    shape: Sequence[int], placements: Sequence[Placement], mesh: DeviceMesh, rank: int, what: str
) -> Box:
    """The box of the global tensor `rank` holds under `placements` on `mesh`."""
    coords = mesh.rank_coords(rank)
    lo, size = [0] * len(shape), list(shape)
    for a, p in enumerate(placements):
        if isinstance(p, Partial):
            raise LoweringError(f"{what}: a partial value has no box; reduce it first")
        if isinstance(p, Shard):
            d, n = p.dim % len(shape), mesh.shape[a]
            if size[d] % n:
                raise LoweringError(
                    f"{what}: dim {d} of size {size[d]} does not split into {n} equal shards "
                    f"over mesh axis {mesh.names[a]!r} of stage mesh {mesh.shape}"
                )
            size[d] //= n
            lo[d] += coords[a] * size[d]
    return tuple((s, s + n) for s, n in zip(lo, size))


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def transfer_schedule(
    shape: Sequence[int],
    src_pl: Sequence[Placement],
    src_mesh: DeviceMesh,
    dst_pl: Sequence[Placement],
    dst_mesh: DeviceMesh,
    what: str = "transfer",
) -> list[Piece]:
    """Every piece that moves, in a fixed order (the same on every rank)."""
    owners: dict[Box, list[int]] = {}
    for r in src_mesh.devices:
        owners.setdefault(rank_box(shape, src_pl, src_mesh, r, what), []).append(r)
    pieces = []
    for j, r in enumerate(dst_mesh.devices):
        mine = rank_box(shape, dst_pl, dst_mesh, r, what)
        for box, ranks in owners.items():
            inter = _intersect(mine, box)
            if inter is None:
                continue
            peer = src_mesh.devices[j] if j < src_mesh.size else None
            src = peer if peer in ranks else ranks[j % len(ranks)]
            pieces.append(Piece(src, r, inter))
    return pieces


def relative(box: Box, within: Box) -> Box:
    """`box` in the coordinates of the local tensor that holds `within`."""
    return tuple((lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, within))


def assemble_order(boxes: Sequence[Box]) -> list:
    """How to concatenate pieces that tile a box as a grid: a nested [dim, [parts...]]
    tree whose leaves are indexes into `boxes` (a single index when nothing is cut)."""
    idx = list(range(len(boxes)))
    return _order(boxes, idx, 0)


def _order(boxes: Sequence[Box], idx: list[int], dim: int):
    if len(idx) == 1:
        return idx[0]
    ndim = len(boxes[idx[0]])
    while dim < ndim and len({boxes[i][dim] for i in idx}) == 1:
        dim += 1
    if dim == ndim:
        raise LoweringError(f"cross-mesh pieces overlap: {[boxes[i] for i in idx]}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i in idx:
        groups.setdefault(boxes[i][dim], []).append(i)
    parts = [_order(boxes, groups[k], dim + 1) for k in sorted(groups)]
    return [dim, parts]
