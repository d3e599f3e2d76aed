"""The expert placement planner: which rank owns each expert, for a mesh of `world` ranks.

    owner = plan_placement(num_experts, world)                  # balanced contiguous blocks
    owner = plan_placement(num_experts, new_world, previous=owner)   # re-plan, fewest moves
    moves = expert_moves(owner_old, owner_new)                  # [(expert, src, dst)]

Ranks are numbered the same way across a re-scaling: ranks that stay keep their number (the
first min(N, M) ranks), joining ranks take the next numbers and leaving ranks are the highest.
So an expert's old and new owners are comparable rank numbers, and a move is peer-to-peer from
its old owner to its new one.

Every rank owns ceil(E / world) or floor(E / world) experts (the first E % world ranks own one
more); a mesh of more ranks than experts is refused (a rank without an expert would only relay
tokens, and expert slicing is not part of this runtime). A re-plan keeps each expert on its old
owner while that owner stays and is under its new quota, and gives the rest to ranks with room:
only experts whose owner changes move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class PlacementError(ValueError):
    """The mesh does not fit the model's experts (what was asked, what fits)."""


class Move(NamedTuple):
    expert: int
    src: int
    dst: int


def quotas(num_experts: int, world: int) -> list[int]:
    """Experts per rank: balanced, the first E % world ranks one more."""
    check_fits(num_experts, world)
    base, extra = divmod(num_experts, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def check_fits(num_experts: int, world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise PlacementError(f"expert placement: world size {world!r}; expected an int >= 1")
    if num_experts < 1:
        raise PlacementError(f"expert placement: {num_experts} experts; expected >= 1")
    if world > num_experts:
        raise PlacementError(
            f"expert placement: cannot place {num_experts} experts on {world} ranks: every rank "
            f"must own at least one expert, so the mesh may have at most {num_experts} ranks"
        )


def plan_placement(num_experts: int, world: int,
                   previous: Sequence[int] | None = None) -> tuple[int, ...]:
    """owner[e] for every expert e; with `previous`, the placement that moves fewest experts."""
    quota = quotas(num_experts, world)
    if previous is None:
        return tuple(r for r in range(world) for _ in range(quota[r]))
    if len(previous) != num_experts:
        raise PlacementError(
            f"expert placement: previous placement has {len(previous)} entries; expected "
            f"{num_experts} (one owner per expert)"
        )
    owner: list[int | None] = [None] * num_experts
    used = [0] * world
    for e, r in enumerate(previous):
        if 0 <= r < world and used[r] < quota[r]:
            owner[e] = r
            used[r] += 1
    free = (r for r in range(world) for _ in range(quota[r] - used[r]))
    return tuple(o if o is not None else next(free) for o in owner)


def expert_moves(old: Sequence[int], new: Sequence[int]) -> list[Move]:
    """The experts whose owner changes, with their old (src) and new (dst) owner."""
    if len(old) != len(new):
        raise PlacementError(f"expert placement: {len(old)} vs {len(new)} experts")
    return [Move(e, a, b) for e, (a, b) in enumerate(zip(old, new)) if a != b]


def local_experts(owner: Sequence[int], rank: int) -> list[int]:
    return [e for e, r in enumerate(owner) if r == rank]
