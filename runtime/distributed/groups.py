"""Process groups of a mesh, created up front and looked up by their ranks.

`torch.distributed.new_group` is itself a collective: every rank of the world must call it, in
the same order, for every group, even groups it is not in. So the runtime creates all groups a
plan can need once, at start-up (`init_groups(world_size, group_rank_lists)` or
`init_plan_groups(plan)`), and collectives (ir/ops/collectives.py, the executor) later fetch them
with `get_group(ranks)`, which never creates a group.

Groups are keyed by their sorted rank tuple, because torch orders a group's ranks by global rank
whatever order `new_group` was given.
"""

from __future__ import annotations

import itertools

import torch.distributed as dist

from .errors import DistributedError

_GROUPS: dict[tuple[int, ...], object] = {}
_WORLD_SIZE: list[int] = [0]


def _key(ranks) -> tuple[int, ...]:
    return tuple(sorted(int(r) for r in ranks))


def init_groups(world_size: int, all_group_rank_lists) -> None:
    """Create one process group per distinct rank list (every rank calls this identically).

    Lists covering the whole world map to the default group; duplicates are created once.
    """
    if not dist.is_initialized():
        raise DistributedError("init_groups: torch.distributed is not initialized")
    if dist.get_world_size() != world_size:
        raise DistributedError(
            f"init_groups: world size {dist.get_world_size()} != expected {world_size}"
        )
    _GROUPS.clear()
    _WORLD_SIZE[0] = world_size
    _GROUPS[tuple(range(world_size))] = dist.group.WORLD
    for ranks in all_group_rank_lists:
        key = _key(ranks)
        if key in _GROUPS:
            continue
        if not key or key[0] < 0 or key[-1] >= world_size or len(set(key)) != len(key):
            raise DistributedError(
                f"init_groups: bad rank list {list(ranks)} for world size {world_size}"
            )
        _GROUPS[key] = dist.new_group(list(key))


def get_group(ranks):
    """The process group over `ranks` (created by init_groups). Never creates one."""
    key = _key(ranks)
    group = _GROUPS.get(key)
    if group is not None:
        return group
    if dist.is_initialized() and key == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    known = sorted(_GROUPS)
    raise DistributedError(
        f"no process group over ranks {list(key)}: groups must be created up front by "
        f"init_groups/init_plan_groups on every rank; known groups: {known}"
    )


def group_rank(ranks, global_rank: int) -> int:
    """Position of `global_rank` in the group over `ranks` (torch orders by global rank)."""
    return _key(ranks).index(global_rank)


def clear_groups() -> None:
    """Forget the groups (after destroy_process_group)."""
    _GROUPS.clear()
    _WORLD_SIZE[0] = 0


def plan_group_rank_lists(plan) -> list[list[int]]:
    """Every rank group a plan can use, in a deterministic order.

    Per stage: the groups along each mesh axis, along every pair of axes (collectives over a
    flattened sub-mesh), and the whole stage; between neighbouring stages: the pair of ranks at
    the same mesh coordinates when both meshes have one shape (point-to-point transfers).
    """
    out: list[list[int]] = []
    meshes = [plan.stage_mesh(s) for s in range(max(plan.num_stages, 1))]
    for mesh in meshes:
        for axis in range(mesh.ndim):
            out += [list(g) for g in mesh.groups(axis)]
        out += _multi_axis_groups(mesh)
        out.append(sorted(mesh.devices))
    for a, b in itertools.pairwise(meshes):
        if a.shape == b.shape:
            out += [[x, y] for x, y in zip(a.devices, b.devices)]
    return out


def _multi_axis_groups(mesh) -> list[list[int]]:
    """Groups along each pair of axes of a >2-d mesh (a 2-d mesh's pair is the whole stage)."""
    if mesh.ndim <= 2:
        return []
    import itertools

    out = []
    for a, b in itertools.combinations(range(mesh.ndim), 2):
        fixed = [i for i in range(mesh.ndim) if i not in (a, b)]
        for pt in itertools.product(*(range(mesh.shape[i]) for i in fixed)):
            sub = mesh.submesh({i: c for i, c in zip(fixed, pt)})
            out.append(list(sub.devices))
    return out


def init_plan_groups(plan, extra=()) -> None:
    """init_groups with every group of `plan` (see plan_group_rank_lists), then `extra`."""
    init_groups(plan.world_size, [*plan_group_rank_lists(plan), *extra])
