"""Layer clustering: solve one representative of a run of identical layers.

Transformers repeat the same block dozens of times. Given one hashable fingerprint per layer
(e.g. the op types, shapes and dtypes of its nodes), `cluster_layers` groups consecutive
repeats of a block of `period` layers (period 1 = identical layers; period 2 catches
alternating dense/MoE blocks). The caller builds the ILP with one representative block whose
nodes get weight `repeats` (the edge from the block's output back to its input gets weight
`repeats - 1`), solves it, and `expand_clusters` copies the representative's decision to
every layer of the run. The problem size, and so the solve time, no longer grows with depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LayerCluster:
    """Layers [start, start + period * repeats) = `repeats` copies of a `period`-layer block."""

    start: int
    period: int
    repeats: int
    fingerprint: tuple[Hashable, ...]

    @property
    def end(self) -> int:
        return self.start + self.period * self.repeats

    @property
    def num_layers(self) -> int:
        return self.period * self.repeats

    def layers(self) -> range:
        return range(self.start, self.end)


def _repeats(fps: Sequence[Hashable], i: int, p: int) -> int:
    block = fps[i : i + p]
    if len(block) < p:
        return 0
    r = 1
    while list(fps[i + r * p : i + (r + 1) * p]) == list(block):
        r += 1
    return r


def cluster_layers(
    fingerprints: Sequence[Hashable], max_period: int = 1, min_repeats: int = 2
) -> list[LayerCluster]:
    """Greedy left-to-right grouping of consecutive repeated blocks (at most `max_period`).

    At each position the block length covering the most layers wins (the shorter block on
    ties); layers that start no run of `min_repeats` copies become singleton clusters.
    """
    if max_period < 1 or min_repeats < 1:
        raise ValueError("cluster_layers: max_period and min_repeats must be >= 1")
    fps = list(fingerprints)
    out: list[LayerCluster] = []
    i = 0
    while i < len(fps):
        best_p, best_r = 1, 1
        for p in range(1, max_period + 1):
            r = _repeats(fps, i, p)
            if r >= min_repeats and p * r > best_p * best_r:
                best_p, best_r = p, r
        out.append(LayerCluster(i, best_p, best_r, tuple(fps[i : i + best_p])))
        i += best_p * best_r
    return out


def expand_clusters(clusters: Sequence[LayerCluster], values: Sequence[Sequence[T]]) -> list[T]:
    """Per-layer list from one value per layer of each cluster's representative block."""
    if len(values) != len(clusters):
        raise ValueError(f"expand_clusters: {len(values)} values for {len(clusters)} clusters")
    out: list[T] = []
    for c, v in zip(clusters, values):
        if len(v) != c.period:
            raise ValueError(f"expand_clusters: cluster at {c.start} needs {c.period} values")
        out.extend(list(v) * c.repeats)
    return out
