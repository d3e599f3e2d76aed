"""The Plan: what the parallel planner decides, in a versioned, JSON-serializable form.

Layout model (Megatron/MindSpore style, uniform submeshes): the devices form
`num_stages` pipeline stages; each stage owns a contiguous block of `mesh.size` ranks laid out
as `mesh` (e.g. axes ("dp", "tp")). Stage s owns ranks [s * mesh.size, (s + 1) * mesh.size).

  placements    value name -> one placement string per mesh axis ("R", "S(d)", "P"), over
                the stage mesh; values not listed are replicated
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
  estimate      seconds: compute, communication, bubble, total
  memory        bytes per device (max over the devices of each stage)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ...ir.mesh import DeviceMesh
from ...ir.sharding import Placement, parse_placement

PLAN_VERSION = 1


@dataclasses.dataclass
class StagePlan:
    index: int
    nodes: list[str]  # first-output value names of the nodes this stage runs
    ranks: list[int]
    recompute: bool = False
    layers: tuple[int, int] | None = None  # [start, end) of repeated layers, when known


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
    def world_size(self) -> int:
        return self.num_stages * self.mesh.size

    def placement_of(self, value: str) -> tuple[Placement, ...]:
        texts = self.placements.get(value)
        if texts is None:
            return tuple(parse_placement("R") for _ in range(self.mesh.ndim))
        return tuple(parse_placement(t) for t in texts)

    def stage_of_rank(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the plan's {self.world_size} devices")
        return rank // self.mesh.size

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["mesh"] = {"shape": list(self.mesh.shape), "axis_names": list(self.mesh.names)}
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported "
                             f"(this meshweave reads version {PLAN_VERSION})")
        d["mesh"] = DeviceMesh(tuple(d["mesh"]["shape"]), tuple(d["mesh"]["axis_names"]))
        d["stages"] = [StagePlan(**{**s, "layers": tuple(s["layers"]) if s.get("layers")
                                    else None}) for s in d["stages"]]
        d["collectives"] = [CollectiveRecord(**c) for c in d["collectives"]]
        d["placements"] = {k: tuple(v) for k, v in d["placements"].items()}
        d["input_placements"] = {k: [tuple(p) if p is not None else None for p in v]
                                 for k, v in d.get("input_placements", {}).items()}
        return cls(**d)

    def summary(self) -> str:
        est = self.estimate
        lines = [
            f"plan v{self.version}: {self.world_size} devices = {self.num_stages} stage(s) x "
            f"mesh {'x'.join(map(str, self.mesh.shape))} ({', '.join(self.mesh.names)})",
            f"  micro-batches {self.micro_batches}, schedule {self.schedule}, "
            f"ZeRO-1 {'on' if self.zero else 'off'}, "
            "recompute " + (f"on for stages {[s.index for s in self.stages if s.recompute]}"
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
        return "\n".join(lines)
