"""Inputs of the pipeline planner: stage cost tables, sub-mesh shapes and device placement.

A `StageCostTable` holds, for every layer range [k, e) and candidate sub-mesh shape, the
per-micro-batch forward+backward time of that stage, its per-device memory that does not
depend on the number of in-flight micro-batches (weights, gradients, optimizer state) and
its per-device activation memory per in-flight micro-batch. `inf` time marks an impossible
stage. Tables are usually built once per micro-batch count from the caller's cost function
(typically: run the intra-op ILP for that layer range on that sub-mesh).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from meshweave.ir.mesh import DeviceMesh


@dataclasses.dataclass(frozen=True)
class StageCostTable:
    """Arrays indexed [start, end, submesh] (shape [L, L + 1, len(submesh_shapes)])."""

    submesh_shapes: tuple[tuple[int, int], ...]
    time: np.ndarray
    weight_memory: np.ndarray
    activation_memory: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.time.shape[0]

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Sequence[float]],
        num_layers: int,
        submesh_shapes: Sequence[tuple[int, int]],
        num_microbatches: int | None = None,
    ) -> StageCostTable:
        """Tabulate `fn(start, end, shape[, num_microbatches])` for all ranges and shapes.

        `fn` returns `(time, memory)` (memory taken as independent of in-flight micro-batches)
        or `(time, weight_memory, activation_memory_per_microbatch)`.
        """
        shapes = tuple((int(n), int(m)) for n, m in submesh_shapes)
        shape = (num_layers, num_layers + 1, len(shapes))
        t, w, a = np.full(shape, np.inf), np.zeros(shape), np.zeros(shape)
        takes_b = _accepts_four_args(fn)
        for k in range(num_layers):
            for e in range(k + 1, num_layers + 1):
                for j, sh in enumerate(shapes):
                    out = fn(k, e, sh, num_microbatches) if takes_b else fn(k, e, sh)
                    if len(out) not in (2, 3):
                        raise ValueError(f"stage cost for ({k}, {e}, {sh}) must have 2 or 3 items")
                    t[k, e, j], w[k, e, j] = out[0], out[1]
                    a[k, e, j] = out[2] if len(out) == 3 else 0.0
        return cls(shapes, t, w, a)

    def validate(self, num_layers: int, shapes: Sequence[tuple[int, int]]) -> None:
        want = (num_layers, num_layers + 1, len(shapes))
        for f in ("time", "weight_memory", "activation_memory"):
            if getattr(self, f).shape != want:
                raise ValueError(f"StageCostTable.{f} has shape {getattr(self, f).shape}, want {want}")
        if tuple(map(tuple, shapes)) != tuple(map(tuple, self.submesh_shapes)):
            raise ValueError("StageCostTable: sub-mesh shapes differ from the planner's")


CostSource = Callable[..., Sequence[float]] | StageCostTable | Mapping[int, StageCostTable]


def _accepts_four_args(fn: Callable[..., object]) -> bool:
    try:
        inspect.signature(fn).bind(0, 1, (1, 1), 1)
        return True
    except TypeError:
        return False
    except ValueError:  # builtins without signatures
        return False


def tables_for(
    costs: CostSource, num_layers: int, shapes: Sequence[tuple[int, int]],
    num_microbatches: Sequence[int],
) -> dict[int, StageCostTable]:
    """One validated table per micro-batch count."""
    if not num_microbatches or any(int(b) < 1 for b in num_microbatches):
        raise ValueError(f"micro-batch counts must be >= 1, got {list(num_microbatches)}")
    out: dict[int, StageCostTable] = {}
    for b in num_microbatches:
        if isinstance(costs, StageCostTable):
            tab = costs
        elif isinstance(costs, Mapping):
            if b not in costs:
                raise ValueError(f"no stage cost table for {b} micro-batches")
            tab = costs[b]
        else:
            tab = StageCostTable.from_function(costs, num_layers, shapes, b)
        tab.validate(num_layers, shapes)
        out[b] = tab
    return out


def cluster_shape(mesh: DeviceMesh | tuple[int, int]) -> tuple[int, int, DeviceMesh]:
    """(nodes, devices per node, 2-d mesh); a 1-d mesh counts as a single node."""
    if not isinstance(mesh, DeviceMesh):
        mesh = DeviceMesh(tuple(mesh))
    if mesh.ndim == 1:
        mesh = DeviceMesh((1, mesh.size), None, mesh.devices)
    if mesh.ndim != 2:
        raise ValueError(f"pipeline planning needs a (nodes, devices_per_node) mesh, got {mesh}")
    return mesh.shape[0], mesh.shape[1], mesh


def alpa_submesh_shapes(n_nodes: int, per_node: int) -> list[tuple[int, int]]:
    """(1, 2^k) for powers of two dividing `per_node`, then (n, per_node) for n = 1..nodes."""
    shapes, m = [], 1
    while m < per_node:
        if per_node % m == 0:
            shapes.append((1, m))
        m *= 2
    return shapes + [(n, per_node) for n in range(1, n_nodes + 1)]


def assign_devices(
    shapes: Sequence[tuple[int, int]], mesh: DeviceMesh
) -> list[DeviceMesh]:
    """Place stage sub-meshes on the cluster: whole-node stages first, then first-fit
    decreasing of the in-node (1, m) shapes into aligned slots. Always succeeds for the Alpa
    shapes (sizes divide one another) when their sizes sum to the device count.
    """
    n_nodes, per_node = mesh.shape
    free = [0] * n_nodes  # slots used in each node
    out: list[DeviceMesh | None] = [None] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
    for i in order:
        n, m = shapes[i]
        if m == per_node:
            nodes = [j for j in range(n_nodes) if free[j] == 0][:n]
            if len(nodes) < n:
                raise ValueError(f"assign_devices: cannot place sub-meshes {list(shapes)}")
            for j in nodes:
                free[j] = per_node
            ids = [mesh.coords_rank((j, c)) for j in nodes for c in range(per_node)]
        else:
            if n != 1 or per_node % m:
                raise ValueError(f"assign_devices: unsupported sub-mesh shape {(n, m)}")
            j = next((j for j in range(n_nodes) if per_node - free[j] >= m), None)
            if j is None:
                raise ValueError(f"assign_devices: cannot place sub-meshes {list(shapes)}")
            ids = [mesh.coords_rank((j, free[j] + c)) for c in range(m)]
            free[j] += m
        out[i] = DeviceMesh((n, m), mesh.axis_names, tuple(ids))
    return [o for o in out if o is not None]
