"""The collectives that turn one placement of a value into another (the lowering's recipe).

A tensor dim sharded over several mesh axes is cut axis-major: with axes (a0, a1) the chunk
of the device at coordinates (c0, c1) is c0 * n1 + c1. `reshard_steps` returns the steps, in
order, that move a value from `src` to `dst` placements:

  1. Partial axes are reduced: all_reduce, or reduce_scatter when the target shards a dim
     no other axis shards;
  2. a single axis moving its shard from dim i to dim j (neither sharded by another axis)
     is one all_to_all;
  3. dims whose sharding axes differ are gathered (innermost axis first, only the axes the
     target does not keep as a prefix) and then sliced locally (outermost axis first).

The cost model prices the same transitions per axis (collectives.resharding_cost_multi);
the lowering emits exactly these steps as dist.* ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meshweave.ir.sharding import Partial, Placement, Replicate, Shard

Placements = tuple[Placement, ...]


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all | slice
    axis: int
    dim: int | None = None  # the dim gathered/sliced/scattered (all_to_all: the split dim)
    dim2: int | None = None  # all_to_all: the concat dim


def _axes_of(pl: Sequence[Placement], d: int) -> list[int]:
    return [a for a, p in enumerate(pl) if isinstance(p, Shard) and p.dim == d]


def reshard_steps(src: Placements, dst: Placements) -> list[Step]:
    """Ordered collectives from `src` to `dst` placements (see module docstring)."""
    if len(src) != len(dst):
        raise ValueError(f"reshard: {len(src)} vs {len(dst)} placements")
    cur = list(src)
    steps: list[Step] = []
    for a, (s, d) in enumerate(zip(src, dst)):
        if isinstance(d, Partial) and not isinstance(s, Partial):
            raise ValueError(f"reshard: cannot produce Partial from {s} on axis {a}")  # noqa: TRY004
        if isinstance(s, Partial) and not isinstance(d, Partial):
            if isinstance(d, Shard) and not _axes_of(cur, d.dim) and _axes_of(dst, d.dim) == [a]:
                steps.append(Step("reduce_scatter", a, d.dim))
                cur[a] = d
            else:
                steps.append(Step("all_reduce", a))
                cur[a] = Replicate()
    for a, (s, d) in enumerate(zip(cur, dst)):
        if (
            isinstance(s, Shard)
            and isinstance(d, Shard)
            and s.dim != d.dim
            and _axes_of(cur, s.dim) == [a]
            and not _axes_of(cur, d.dim)
            and _axes_of(dst, d.dim) == [a]
        ):
            steps.append(Step("all_to_all", a, d.dim, s.dim))
            cur[a] = d
    dims = sorted({p.dim for p in list(cur) + list(dst) if isinstance(p, Shard)})
    todo = []
    for dim in dims:  # gathers first: an axis may move to another dim
        have, want = _axes_of(cur, dim), _axes_of(dst, dim)
        if have == want:
            continue
        keep = 0
        while keep < min(len(have), len(want)) and have[keep] == want[keep]:
            keep += 1
        for a in reversed(have[keep:]):
            steps.append(Step("all_gather", a, dim))
            cur[a] = Replicate()
        todo.append((dim, want[keep:]))
    for dim, axes in todo:
        for a in axes:
            if not isinstance(cur[a], Replicate):
                raise ValueError(  # noqa: TRY004  (a bad pair of placements, not a bad type)
                    f"reshard: axis {a} still holds {cur[a]} when slicing dim {dim} "
                    f"({tuple(map(str, src))} -> {tuple(map(str, dst))})"
                )
            steps.append(Step("slice", a, dim))
            cur[a] = Shard(dim)
    if tuple(cur) != tuple(dst):
        raise ValueError(
            f"reshard: could not reach {tuple(map(str, dst))} from "
            f"{tuple(map(str, src))} (stuck at {tuple(map(str, cur))})"
        )
    return steps
