"""The Plan: what the parallel planner decides, in a versioned, JSON-serializable form.

Layout model: the devices form `num_stages` pipeline stages. Every stage mesh has the axes
of `mesh` (e.g. ("dp", "tp")). By default (Megatron/MindSpore style, uniform sub-meshes) each
stage is laid out as `mesh` and owns the contiguous ranks [s * mesh.size, (s + 1) * mesh.size).
A stage may instead have its own shape over the same axes (`StagePlan.mesh_shape`, Alpa-style
sub-meshes: e.g. (2, 2) for the first stage and (1, 2) for the second); its ranks are then
`StagePlan.ranks`, in row-major order of that shape. `stage_mesh(s)` gives either as a
DeviceMesh with global device ids.

  placements    value name -> one placement string per mesh axis ("R", "S(d)", "P"), over
                the mesh of the stage that produces the value (a value another stage reads
                arrives there in the same placement strings, over that stage's mesh: the
                lowering inserts the cross-mesh transfer); values not listed are replicated
  input_placements  node (first output name) -> per `node.inputs` entry, the placements the
                node consumes it in (None for non-tensor inputs); where it differs from the
                value's placement the lowering inserts the collective. Optional: when a node
                is missing, the lowering derives it from the sharding rules
  stages        which graph nodes (by output value name of the node's first output) each
                stage runs, in graph order, and the ranks it owns
  micro_batches / schedule ("gpipe" | "1f1b")
  zero          optimizer-state sharding over the "dp" axis (ZeRO-1 / MindSpore optimizer
                parallel) in training
  recompute     per stage: activations recomputed in backward
  collectives   the collectives the lowering inserts (kind, value, axis, bytes)
  estimate      seconds: compute, communication, bubble, total (the all-to-all of expert
                parallelism is inside compute: cost/moe_cost.py adds it to the MoE node's time)
  memory        bytes per device (max over the devices of each stage)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ...ir.mesh import DeviceMesh
from ...ir.sharding import Placement, parse_placement

PLAN_VERSION = 2  # 2: StagePlan.mesh_shape (version-1 plans are read as uniform)


@dataclasses.dataclass
class StagePlan:
    index: int
    nodes: list[str]  # first-output value names of the nodes this stage runs
    ranks: list[int]
    recompute: bool = False
    layers: tuple[int, int] | None = None  # [start, end) of repeated layers, when known
    mesh_shape: tuple[int, ...] | None = None  # this stage's mesh over plan.mesh's axes
    # training with recompute: the fraction of its activation bytes the stage keeps, which its
    # ranks' rematerialization pass gets as memory_budget (None: save everything)
    memory_budget: float | None = None


@dataclasses.dataclass
class CollectiveRecord:
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send_recv
    value: str
    axis: str  # mesh axis name, or "pp" for stage-to-stage transfers
    nbytes: int
    count: int = 1  # times per step (micro-batches, repeated layers)


@dataclasses.dataclass
class Plan:
    mesh: DeviceMesh
    num_stages: int = 1
    placements: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    stages: list[StagePlan] = dataclasses.field(default_factory=list)
    micro_batches: int = 1
    schedule: str = "gpipe"
    zero: bool = False
    training: bool = False
    collectives: list[CollectiveRecord] = dataclasses.field(default_factory=list)
    estimate: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    search: dict[str, Any] = dataclasses.field(default_factory=dict)  # solver stats, model name
    input_placements: dict[str, list[tuple[str, ...] | None]] = dataclasses.field(
        default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def uniform(self) -> bool:
        """Every stage is laid out as `mesh` on its contiguous block of ranks."""
        return all(s.mesh_shape is None or tuple(s.mesh_shape) == self.mesh.shape
                   for s in self.stages)

    @property
    def world_size(self) -> int:
        if self.uniform:
            return self.num_stages * self.mesh.size
        return sum(math.prod(self.stage_mesh(s).shape) for s in range(self.num_stages))

    def stage_mesh(self, stage: int) -> DeviceMesh:
        """Stage `stage`'s mesh, with the global ranks it owns as device ids."""
        if not 0 <= stage < max(self.num_stages, 1):
            raise ValueError(f"stage {stage} is outside the plan's {self.num_stages} stages")
        if self.uniform:
            base = stage * self.mesh.size
            return DeviceMesh(self.mesh.shape, self.mesh.names,
                              tuple(range(base, base + self.mesh.size)))
        st = self.stages[stage]
        return DeviceMesh(tuple(st.mesh_shape or self.mesh.shape), self.mesh.names,
                          tuple(st.ranks))

    def placement_of(self, value: str) -> tuple[Placement, ...]:
        texts = self.placements.get(value)
        if texts is None:
            return tuple(parse_placement("R") for _ in range(self.mesh.ndim))
        return tuple(parse_placement(t) for t in texts)

    def stage_mesh_runs(self) -> list[tuple[str, int]]:
        """Consecutive stages of one mesh shape: [("16x4", 1), ("16x8", 15), ("16x4", 1)]."""
        runs: list[list] = []
        for s in range(max(self.num_stages, 1)):
            shape = "x".join(map(str, self.stage_mesh(s).shape))
            if runs and runs[-1][0] == shape:
                runs[-1][1] += 1
            else:
                runs.append([shape, 1])
        return [(shape, n) for shape, n in runs]

    def meshes_text(self) -> str:
        """"mesh 2x2" when uniform, else "meshes 1x4 | 2 x 1x2" (stage by stage)."""
        if self.uniform:
            return f"mesh {'x'.join(map(str, self.mesh.shape))}"
        return "meshes " + " | ".join(
            f"{n} x {sh}" if n > 1 else sh for sh, n in self.stage_mesh_runs())

    def stage_of_rank(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the plan's {self.world_size} devices")
        if self.uniform:
            return rank // self.mesh.size
        return next(s for s in range(self.num_stages) if rank in self.stage_mesh(s).devices)

    def validate(self) -> None:
        """Stage meshes: one shape entry per axis of `mesh`, ranks that match the shape,
        and every rank of 0..world_size-1 in exactly one stage."""
        if self.uniform:
            return
        seen: list[int] = []
        for st in self.stages:
            shape = tuple(st.mesh_shape or self.mesh.shape)
            if len(shape) != self.mesh.ndim or any(int(x) < 1 for x in shape):
                raise ValueError(f"stage {st.index}: mesh shape {shape} does not give one "
                                 f"positive size per axis of {self.mesh.names}")
            if len(st.ranks) != math.prod(shape):
                raise ValueError(f"stage {st.index}: {len(st.ranks)} ranks for a mesh of "
                                 f"shape {shape}")
            seen += st.ranks
        if sorted(seen) != list(range(len(seen))):
            raise ValueError(f"stage ranks {[st.ranks for st in self.stages]} do not cover "
                             f"0..{len(seen) - 1} exactly once")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["mesh"] = {"shape": list(self.mesh.shape), "axis_names": list(self.mesh.names)}
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        if d.get("version") not in (1, PLAN_VERSION):
            raise ValueError(f"plan version {d.get('version')} is not supported "
                             f"(this meshweave reads versions 1 and {PLAN_VERSION})")
        d["version"] = PLAN_VERSION
        d["mesh"] = DeviceMesh(tuple(d["mesh"]["shape"]), tuple(d["mesh"]["axis_names"]))
        d["stages"] = [StagePlan(**{**s, "layers": tuple(s["layers"]) if s.get("layers")
                                    else None,
                                    "mesh_shape": tuple(s["mesh_shape"]) if s.get("mesh_shape")
                                    else None}) for s in d["stages"]]
        d["collectives"] = [CollectiveRecord(**c) for c in d["collectives"]]
        d["placements"] = {k: tuple(v) for k, v in d["placements"].items()}
        d["input_placements"] = {k: [tuple(p) if p is not None else None for p in v]
                                 for k, v in d.get("input_placements", {}).items()}
        plan = cls(**d)
        plan.validate()
        return plan

    def summary(self) -> str:
        est = self.estimate
        lines = [
            (f"plan v{self.version}: {self.world_size} devices = {self.num_stages} stage(s) x "
             f"{self.meshes_text()} ({', '.join(self.mesh.names)})"),
            f"  micro-batches {self.micro_batches}, schedule {self.schedule}, "
            f"ZeRO-1 {'on' if self.zero else 'off'}, "
            "recompute " + (", ".join(f"stage {s.index} at budget {s.memory_budget:.3g}"
                                      if s.memory_budget is not None else f"stage {s.index}"
                                      for s in self.stages if s.recompute)
                            if any(s.recompute for s in self.stages) else "off"),
        ]
        if est:
            lines.append("  step time {total:.4f} s = compute {compute:.4f} + comm {comm:.4f} "
                         "+ bubble {bubble:.4f}".format(**{k: est.get(k, 0.0) for k in
                                                           ("total", "compute", "comm",
                                                            "bubble")}))
        if self.memory:
            peak = max(self.memory.values())
            size = f"{peak / 2**30:.2f} GiB" if peak >= 2**27 else f"{peak / 2**20:.2f} MiB"
            lines.append(f"  peak memory per device {size}")
        lines.append(f"  collectives: {len(self.collectives)} inserted, of kinds "
                     + ", ".join(sorted({c.kind for c in self.collectives})))
        ep = ep_line(self.search.get("ep") if isinstance(self.search, dict) else None)
        if ep:
            lines.append(ep)
        return "\n".join(lines)


def ep_line(info: dict[str, Any] | None) -> str | None:
    """The summary line of plan.search["ep"] (search/moe_plan.py's ep_info), for MoE plans."""
    if not info:
        return None
    if info["degree"] <= 1:
        return (f"  expert parallelism off: ep=1, all {info['experts']} experts on every "
                f"device of a stage ({info['moe_layers']} MoE layers), no all-to-all")
    size = info["exchange_bytes"]
    text = f"{size / 2**20:.2f} MiB" if size >= 2**17 else f"{size / 2**10:.1f} KiB"
    stages = info.get("stage_degrees")
    per_stage = (f" (first stage; per stage ep={_run_length(stages)})"
                 if stages and len(set(stages)) > 1 else "")
    return (f"  expert parallelism: ep={info['degree']} over mesh axis "
            f"{'x'.join(info['axes'])}{per_stage}, {info['experts_per_device']} of "
            f"{info['experts']} experts per device, {info['moe_layers']} MoE layers; all-to-all "
            f"{text} per device per exchange, {info['all_to_all_seconds'] * 1e3:.3f} ms per "
            f"layer and micro-batch ({info['routing']} routing assumed)")


def _run_length(values: list[int]) -> str:
    """[8, 1, 1, 1] -> "8,3*1"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ",".join(f"{n}*{v}" if n > 1 else str(v) for v, n in runs)
