"""Alpha-beta cost model of collectives and of resharding between placements.

Every collective over a group of `n` devices is modelled as a ring (or pairwise exchange) of
`steps` messages, each paying the link latency alpha, plus the bytes each device pushes through
its link at bandwidth beta (bytes/s per direction):

    all_reduce      2(n-1) alpha + 2(n-1)/n * nbytes / beta   (reduce-scatter + all-gather)
    all_gather       (n-1) alpha +  (n-1)/n * nbytes / beta   nbytes = gathered (output) size
    reduce_scatter   (n-1) alpha +  (n-1)/n * nbytes / beta   nbytes = unreduced (input) size
    all_to_all       (n-1) alpha +  (n-1)/n * nbytes / beta   nbytes = per-device buffer
    send_recv              alpha +            nbytes / beta

`nbytes` is always the per-device buffer size named above. The link of a mesh axis is the
intra-node link when every group along the axis stays inside one node, else the inter-node one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshweave.ir.mesh import AxisRef, DeviceMesh
from meshweave.ir.sharding import Partial, Placement, Replicate, Shard
from .hardware import HardwareSpec, LinkSpec

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
INF = math.inf


def collective_time(kind: str, nbytes: float, group_size: int, link: LinkSpec) -> float:
    """Seconds for one collective of `kind` over `group_size` devices (see module doc)."""
    if nbytes < 0:
        raise ValueError(f"collective_time: negative size {nbytes}")
    if group_size < 1:
        raise ValueError(f"collective_time: group size must be >= 1, got {group_size}")
    n = group_size
    a, b = link.latency_s, link.bandwidth_for(kind)
    if kind == "send_recv":
        return a + nbytes / b
    if kind not in COLLECTIVES:
        raise ValueError(f"collective_time: unknown collective {kind!r}; known: {COLLECTIVES}")
    if n == 1:
        return 0.0
    frac = (n - 1) / n
    if kind == "all_reduce":
        return 2 * (n - 1) * a + 2 * frac * nbytes / b
    return (n - 1) * a + frac * nbytes / b


def node_of(rank: int, devices_per_node: int) -> int:
    return rank // devices_per_node


def link_for_axis(mesh: DeviceMesh, axis: AxisRef, spec: HardwareSpec) -> LinkSpec:
    """Intra-node link if every rank group along `axis` lives in a single node."""
    dpn = spec.devices_per_node
    for group in mesh.groups(axis):
        if len({node_of(r, dpn) for r in group}) > 1:
            return spec.inter_node
    return spec.intra_node


def resharding_cost(
    src: Placement, dst: Placement, tensor_bytes: float, group_size: int, link: LinkSpec
) -> float:
    """Seconds to change a value's placement over ONE mesh axis of `group_size` devices.

    `tensor_bytes` is the value's per-device size if it were replicated over this axis (its
    full size divided by the sharding on the other axes). Transitions:
    same -> free; R->S(d) free (local slice); S->R all_gather; P->R all_reduce;
    P->S reduce_scatter; S(i)->S(j) all_to_all; anything else -> P is disallowed (inf).
    """
    if src == dst or group_size == 1:
        return 0.0
    if isinstance(dst, Partial):
        return INF
    if isinstance(src, Replicate):
        return 0.0  # dst is a Shard: keep the local slice
    if isinstance(src, Partial):
        kind = "all_reduce" if isinstance(dst, Replicate) else "reduce_scatter"
        return collective_time(kind, tensor_bytes, group_size, link)
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return collective_time("all_gather", tensor_bytes, group_size, link)
        # S(i) -> S(j): each device exchanges its 1/n slice.
        return collective_time("all_to_all", tensor_bytes / group_size, group_size, link)
    raise TypeError(f"resharding_cost: unknown placements {src!r} -> {dst!r}")


def _transition_rank(src: Placement, dst: Placement) -> int:
    """Order of per-axis steps: shrink first (slice, reduce-scatter), grow last (gathers)."""
    if src == dst:
        return 0
    if isinstance(dst, Shard):
        return 0 if not isinstance(src, Shard) else 1
    if isinstance(src, Partial):
        return 2
    return 3


def resharding_cost_multi(
    src_placements: Sequence[Placement],
    dst_placements: Sequence[Placement],
    nbytes: float,
    mesh: DeviceMesh,
    spec: HardwareSpec,
) -> float:
    """Seconds to reshard a value of global size `nbytes` between two mesh placements.

    Axes are converted one at a time, shrinking transitions first so that later collectives
    move the smallest possible buffers; the size an axis sees is the current local size
    times that axis' size when the value is currently sharded over it.
    """
    if len(src_placements) != mesh.ndim or len(dst_placements) != mesh.ndim:
        raise ValueError(
            f"resharding_cost_multi: need {mesh.ndim} placements per side for mesh "
            f"{mesh.shape}, got {len(src_placements)} and {len(dst_placements)}"
        )
    cur = list(src_placements)
    order = sorted(range(mesh.ndim), key=lambda a: _transition_rank(cur[a], dst_placements[a]))
    total = 0.0
    for a in order:
        n = mesh.shape[a]
        shard = math.prod(mesh.shape[b] for b in range(mesh.ndim) if isinstance(cur[b], Shard))
        axis_bytes = nbytes / shard * (n if isinstance(cur[a], Shard) else 1)
        link = link_for_axis(mesh, a, spec)
        total += resharding_cost(cur[a], dst_placements[a], axis_bytes, n, link)
        cur[a] = dst_placements[a]
    return total
