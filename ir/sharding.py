"""Sharding placements: how a value is laid out over each axis of a device mesh.

A value's `placements` is a tuple with one entry per mesh axis, in the style of DTensor and
Alpa: Replicate, Shard(dim) or Partial(sum). The planner (passes/parallel) fills them in and
the lowering turns mismatches between producer and consumer into collectives.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclasses.dataclass(frozen=True, slots=True)
class Partial:
    reduce: str = "sum"

    def __str__(self) -> str:
        return "P" if self.reduce == "sum" else f"P({self.reduce})"


Placement = Replicate | Shard | Partial
Placements = tuple[Placement, ...]


def placements_str(p: Placements | None) -> str:
    if p is None:
        return ""
    return "{" + ", ".join(str(x) for x in p) + "}"


def parse_placement(text: str) -> Placement:
    """Parse 'R', 'P' or 'S(d)' as written by the printer."""
    text = text.strip()
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    if text.startswith("S(") and text.endswith(")"):
        return Shard(int(text[2:-1]))
    raise ValueError(f"unknown placement {text!r}: expected R, P or S(dim)")
