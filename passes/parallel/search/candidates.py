"""The configuration space shared by the search and the Megatron grid, and its caches.

A configuration is a pipeline depth `pp`, a stage mesh (each of the `pp` stages owns one copy
of it; for a device count the mesh is (dp, tp) with tp a power of two inside one node, for a
fixed `DeviceMesh` its first axis is cut into `pp` pieces), and a micro-batch count `B` (the
global batch splits into B micro-batches; the micro-batch must split evenly over the data
axes, dp and ep).

Expert parallelism (graphs with `moe.experts` nodes, E experts): DeepSpeed-MoE's EP over the
data-parallel devices. For a device count, every (dp, tp) stage mesh is joined by the meshes
(dp / ep, ep, tp), named ("dp", "ep", "tp"), for every ep > 1 dividing both E and dp: the
data-parallel devices of a stage form dp / ep groups of ep consecutive data ranks (stride
tp), each group holding all E experts, E / ep per device. An axis named "ep" pins
moe.experts to the ep strategy on it and every other op to data parallelism on it
(strategies/moe_rules.py), so dense ops are data-parallel over both outer axes (dp x ep
ways) and experts are replicated only over the outer dp axis (their gradients are reduced
over it alone). The tp axis stays inside a node, so an exchange over ep crosses nodes once
tp x ep exceeds a node. The (dp, tp) meshes stay candidates: there the search may still
give moe.experts the ep strategy over the whole dp axis (ep = dp, when dp divides E), or
over the tp axis (experts split over a node's devices while the dense ops around them stay
tensor-parallel, when tp divides E), or plain data parallelism (experts replicated, no
all-to-all); the plan says which (plan.search["ep"]: degree and axes). ZeRO-1 shards
optimizer states over the outer axis (mesh axis 0) only. With pins (one placement per
(dp, tp) axis) the (dp, ep, tp) meshes are left out (megatron_grid). A fixed mesh is
searched as given (an axis named "ep" keeps its degree: the pipeline cuts a first axis
that is not "ep").

`PlannerState` keeps the per-graph analysis and, per (stage mesh, micro-batch size), the
`MeshModel` (costs) and `RawProblem` (ILP matrices), plus one `CommTable` per mesh shape, so
that the grid and the search never rebuild the same costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from meshweave.ir.graph import Graph
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.ops.moe import MOE_EXPERTS
from ..cost.cost_model import CommTable, MeshModel, compute_dtype
from ..cost.hardware import HardwareSpec
from .context import GraphContext, Key, RawProblem, placements_of
from ..strategies.moe_rules import EP_AXIS, num_experts
from ..strategies.node_strategies import PlanningError


@dataclasses.dataclass(frozen=True)
class Config:
    pp: int
    mesh: DeviceMesh  # the stage mesh
    micro_batches: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: the devices a micro-batch's samples split over (dp x ep)."""
        return data_degree(self.mesh)

    @property
    def ep(self) -> int:
        """Size of the mesh's "ep" axis (1 without one)."""
        return ep_degree(self.mesh)

    @property
    def tp(self) -> int:
        return self.mesh.shape[-1] if self.mesh.ndim > 1 else 1

    def label(self) -> str:
        return f"pp={self.pp} mesh={'x'.join(map(str, self.mesh.shape))} B={self.micro_batches}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ep_degree(mesh: DeviceMesh) -> int:
    names = mesh.names
    return mesh.shape[names.index(EP_AXIS)] if EP_AXIS in names else 1


def data_degree(mesh: DeviceMesh) -> int:
    """Devices the samples of a micro-batch split over: axis 0 and an "ep" axis after it."""
    ep = ep_degree(mesh) if mesh.names[0] != EP_AXIS else 1
    return mesh.shape[0] * ep


def expert_count(graph: Graph, types: Mapping[Any, Any] | None = None) -> int | None:
    """gcd of the expert counts of the graph's moe.experts nodes; None without any."""
    counts = [num_experts(n, dict(types or {})) for n in graph.nodes if n.op == MOE_EXPERTS]
    counts = [c for c in counts if isinstance(c, int)]
    return math.gcd(*counts) if counts else None


def _ep_meshes(data: int, tp: int, experts: int | None) -> list[DeviceMesh]:
    if not experts:
        return []
    return [DeviceMesh((data // ep, ep, tp), ("dp", EP_AXIS, "tp"))
            for ep in _divisors(data) if ep > 1 and experts % ep == 0]


def stage_meshes(
    mesh_or_count: DeviceMesh | int, spec: HardwareSpec, n_units: int, max_stages: int | None,
    experts: int | None = None,
) -> list[tuple[int, DeviceMesh]]:
    """(pp, stage mesh) pairs; tensor parallelism stays inside a node (last mesh axis).
    `experts`: the expert count of an MoE graph (expert_count), which adds the (dp, ep, tp)
    meshes of the module doc."""
    cap = min(n_units, max_stages or n_units)
    out = []
    if isinstance(mesh_or_count, DeviceMesh):
        m = mesh_or_count
        names = m.axis_names
        if names is not None and names[0] == EP_AXIS:  # keep the given ep degree
            return [(1, m)]
        for pp in _divisors(m.shape[0]):
            if pp <= cap:
                out.append((pp, DeviceMesh((m.shape[0] // pp, *m.shape[1:]), names)))
        return out
    n = int(mesh_or_count)
    if n < 1:
        raise PlanningError(f"device count must be >= 1, got {n}")
    for pp in _divisors(n):
        if pp > cap:
            continue
        rest = n // pp
        tp = 1
        while tp <= min(rest, spec.devices_per_node):
            if rest % tp == 0:
                out.append((pp, DeviceMesh((rest // tp, tp), ("dp", "tp"))))
                out += [(pp, m) for m in _ep_meshes(rest // tp, tp, experts)]
            tp *= 2
    return out


def microbatch_options(batch: int, pp: int, dp: int, training: bool, limit: int = 8,
                       rebatchable: bool = True) -> list[int]:
    """Micro-batch counts B: B divides batch / dp (every device gets whole samples); with a
    pipeline B >= pp. At most `limit`, spread geometrically, always keeping the largest.
    A graph that cannot be re-batched (its batch dim is lost, as at a loss's mean) runs
    whole: B = 1."""
    if batch % dp:
        return []
    if not rebatchable:
        return [1]
    per = batch // dp
    opts = [b for b in _divisors(per) if b >= min(pp, per)]
    if not training and pp == 1:
        opts = [1] if 1 in opts else opts[:1]
    if len(opts) > limit:
        keep = {opts[0], opts[-1]}
        step = (len(opts) - 1) / (limit - 1)
        keep |= {opts[round(i * step)] for i in range(limit)}
        opts = sorted(keep)
    return opts


class PlannerState:
    """Graph analysis plus cost caches for one planning request."""

    def __init__(
        self,
        graph: Graph,
        spec: HardwareSpec,
        *,
        batch: int,
        training: bool,
        repeats: int | None = None,
        dtype: str | None = None,
        pins: Mapping[str, tuple[str, ...]] | None = None,
        memory_budget: float | None = None,
        zero: bool = True,
        remat_curve: tuple | None = None,
    ):
        self.graph, self.spec, self.batch, self.training = graph, spec, batch, training
        # the remat pass's memory-versus-recompute points (passes/remat/curve.py), or None
        self.remat_curve = remat_curve
        self.zero = zero  # ZeRO-1 over dp when training (memory and gradient-sync costs)
        if memory_budget is not None and not memory_budget > 0:
            raise PlanningError(f"memory budget must be positive, got {memory_budget}")
        self.memory_budget = memory_budget
        self.ctx = GraphContext.build(graph, repeats)
        self.dtype = dtype or compute_dtype(graph, spec)
        self.pins = dict(pins or {})
        self._comm: dict[tuple, CommTable] = {}
        self._models: dict[tuple, MeshModel] = {}
        self._raw: dict[tuple, RawProblem] = {}
        self.experts = expert_count(graph, self.ctx.types)  # None: a dense graph

    @property
    def n_units(self) -> int:
        return max(1, self.ctx.layers.num_layers)

    def _key(self, mesh: DeviceMesh, micro_batch: int) -> tuple:
        return (mesh.shape, mesh.axis_names, micro_batch)

    def model(self, mesh: DeviceMesh, micro_batch: int) -> MeshModel:
        key = self._key(mesh, micro_batch)
        m = self._models.get(key)
        if m is None:
            ck = (mesh.shape, mesh.axis_names)
            comm = self._comm.get(ck)
            if comm is None:
                comm = self._comm[ck] = CommTable(mesh, self.spec, self.training)
            m = MeshModel(
                self.graph,
                self.ctx.types,
                self.ctx.batch,
                mesh,
                micro_batch,
                self.spec,
                training=self.training,
                dtype=self.dtype,
                zero=self.zero,
                comm=comm,
            )
            self._models[key] = m
        return m

    def raw(self, mesh: DeviceMesh, micro_batch: int) -> RawProblem:
        key = self._key(mesh, micro_batch)
        r = self._raw.get(key)
        if r is None:
            r = self._raw[key] = RawProblem(self.ctx, self.model(mesh, micro_batch), self.pins)
        return r

    def budget(self) -> float:
        """Bytes per device a plan may use: the override, else the usable device memory."""
        from .staging import USABLE_MEMORY

        if self.memory_budget is not None:
            return float(self.memory_budget)
        return self.spec.memory_bytes * USABLE_MEMORY


def respects_pins(state: PlannerState, assign: Mapping[Key, Any]) -> bool:
    """Whether an assignment gives every pinned value (CompileOptions pins) its pinned layout."""
    pls = {v.name: tuple(str(p) for p in pl) for v, pl in placements_of(assign).items()}
    return all(
        pls.get(state.ctx.rep_value(_value(state, n)).name) == tuple(t)
        for n, t in state.pins.items()
    )


def _value(state: PlannerState, name: str):
    for v in state.graph.all_values():
        if v.name == name:
            return v
    raise PlanningError(f"pin on unknown value %{name}")
