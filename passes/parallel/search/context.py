"""The intra-op problem of a reduced graph: pre + one representative layer + post.

`GraphContext` analyses a graph once (concrete types, batch dims, layers, consumers) and keeps
the reduced node set: everything outside the main cluster of identical layers, plus the
cluster's first layer standing for all of them (layers.py). `RawProblem` holds, for one
`MeshModel` (stage mesh + micro-batch size), the strategies of every reduced node and graph
input, their forward times and memory, and every edge's resharding matrices. From it,

  * `intra_op(...)` assembles the weighted `IntraOpProblem` for ilp.py: representative nodes
    weigh `layers_per_stage`, the edges from one layer into the next weigh one less, and the
    memory row counts weights plus saved activations times the micro-batches in flight;
  * `evaluate(choice)` splits a choice's cost into segments (pre, one layer, post, and any
    unclustered layers): compute, communication per micro-batch, gradient sync per step,
    weight memory, saved activations, and the bytes a layer hands to the next.

Both the ILP search and the Megatron grid evaluate their choices here, so they are compared
under one cost model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.sharding import parse_placement
from meshweave.ir.types import TensorType
from ..cost.cost_model import MeshModel, nbytes
from ..intra_op.problem import IntraOpProblem, Strategy
from .layers import LayerStructure, find_layers
from ..strategies.axis import node_inputs
from ..strategies.node_strategies import BatchInfo, PlanningError, concrete_types, infer_batch_dims
from ..strategies.quant_rules import check_pins as check_quant_pins

Key = Hashable  # a Node, or a graph-input Value


@dataclasses.dataclass
class GraphContext:
    graph: Graph
    types: dict[Value, Any]
    batch: BatchInfo
    layers: LayerStructure
    users: dict[Value, list[tuple[Node, int]]]
    nodes: list[Node]  # the reduced node set, in graph order
    segment: dict[Node, str]  # "pre" | "rep" | "post" | "x<j>" (an unclustered layer j)
    seg_outputs: dict[str, list[Value]]  # per layer segment: values read outside it

    @classmethod
    def build(cls, graph: Graph, repeats: int | None = None) -> GraphContext:
        types = concrete_types(graph)
        batch = infer_batch_dims(graph, types)
        layers = find_layers(graph, repeats)
        users: dict[Value, list[tuple[Node, int]]] = {}
        for n in graph.nodes:
            for i, v in enumerate(node_inputs(n)):
                users.setdefault(v, []).append((n, i))
        segment: dict[Node, str] = {n: "pre" for n in layers.pre}
        segment.update({n: "post" for n in layers.post})
        c = layers.cluster
        for j, layer in enumerate(layers.layers):
            if c is None or j not in c.layers():
                segment.update({n: f"x{j}" for n in layer})
            elif j == c.start:
                segment.update({n: "rep" for n in layer})
        nodes = [n for n in graph.nodes if n in segment]
        seg_outputs: dict[str, list[Value]] = {}
        for j, layer in enumerate(layers.layers):
            name = segment.get(layer[0])
            if c is not None and j in c.layers():
                if j != c.end - 1:
                    continue
                name = "rep"
            inside = set(layer)
            outs = [
                o
                for n in layer
                for o in n.outputs
                if o in graph.outputs or any(u not in inside for u, _ in users.get(o, []))
            ]
            seg_outputs[name] = [layers.rep_of.get(o, o) for o in outs]
        return cls(graph, types, batch, layers, users, nodes, segment, seg_outputs)

    def source(self, v: Value) -> Key:
        """The reduced-problem key producing `v` (mapping clustered layers onto the rep)."""
        if v.producer is None:
            return v
        n = v.producer
        return n if n in self.segment else self.layers.rep_of.get(n, n)

    def rep_value(self, v: Value) -> Value:
        return self.layers.rep_of.get(v, v) if v.producer is not None else v

    def edges(self) -> list[tuple[Key, Value, Node, int, str]]:
        """(source key, value as the representative sees it, consumer, input index, kind) of
        every edge of the reduced graph; kind is "normal", "loop" or "pre_rep"."""
        cached = self.__dict__.get("_edges")
        if cached is not None:
            return cached
        out = self.__dict__["_edges"] = []
        for n in self.nodes:
            for i, v in enumerate(node_inputs(n)):
                if not isinstance(self.types.get(v), TensorType):
                    continue
                src = self.source(v)
                if src is not v and src not in self.segment:
                    continue
                kind = "normal"
                if (
                    self.segment[n] == "rep"
                    and isinstance(src, Node)
                    and self.segment.get(src) == "pre"
                ):
                    kind = "pre_rep"
                out.append((src, self.rep_value(v), n, i, kind))
        for v, n, i in self.layers.loop_edges:
            out.append((v.producer, v, n, i, "loop"))
        return out

    def input_segments(self) -> dict[Value, set[str]]:
        """Graph inputs the reduced graph reads, and the segments reading them."""
        cached = self.__dict__.get("_input_segs")
        if cached is not None:
            return cached
        segs: dict[Value, set[str]] = self.__dict__.setdefault("_input_segs", {})
        for n in self.nodes:
            for v in node_inputs(n):
                if v.producer is None and isinstance(self.types.get(v), TensorType):
                    segs.setdefault(v, set()).add(self.segment[n])
        return segs


@dataclasses.dataclass
class RawEdge:
    src: Key
    dst: Node
    per_mb: np.ndarray
    per_step: np.ndarray
    kind: str  # "normal" | "loop" (layer -> next layer) | "pre_rep" (pre -> first layer)


@dataclasses.dataclass
class SegmentCost:
    compute: float = 0.0  # seconds per micro-batch (forward + backward)
    comm: float = 0.0  # seconds per micro-batch
    sync: float = 0.0  # seconds per step (gradient reduction): the per-byte part
    # The fixed (latency) part of the segment's gradient reductions, the largest one: the
    # runtime buckets a stage's gradients into one collective per set of axes, so a stage
    # pays it once, not once per parameter (staging.eval_stage takes the max).
    sync_fixed: float = 0.0
    weight_memory: float = 0.0  # bytes per device
    activation_memory: float = 0.0  # bytes per device per micro-batch in flight
    boundary_bytes: float = 0.0  # bytes per device handed to the next layer (rep only)

    @property
    def time(self) -> float:
        return self.compute + self.comm


class RawProblem:
    """Strategies and raw costs of the reduced graph on one MeshModel."""

    def __init__(
        self, ctx: GraphContext, model: MeshModel, pins: Mapping[str, tuple[str, ...]] | None = None
    ):
        self.ctx, self.model = ctx, model
        self.strats: dict[Key, list] = {}
        self.seg: dict[Key, str] = {}
        pins = self._pins(pins or {})
        for n in ctx.nodes:
            ss = model.strategies(n)
            for k, o in enumerate(n.outputs):
                if o in pins:
                    ss = [s for s in ss if s.outs[k] == pins[o]]
            if not ss:
                raise PlanningError(
                    f"no strategy of %{n.outputs[0].name} ({n.op}) meets the "
                    f"pins on mesh {model.mesh.shape}"
                )
            self.strats[n], self.seg[n] = ss, ctx.segment[n]
        self._inputs(pins)
        self.fwd_time = {}
        self.act = {}
        for n in ctx.nodes:
            self.fwd_time[n], self.act[n] = model.node_costs(n, self.strats[n])
        self.wmem = {v: model.input_memory(v, self.strats[v]) for v in self.inputs}
        self._ids: dict[tuple[Key, int, str], np.ndarray] = {}
        self._splits = {n: [s.split_axes() for s in self.strats[n]] for n in ctx.nodes}
        self.edges = self._edges()
        self.keys: list[Key] = list(self.inputs) + list(ctx.nodes)

    def _pins(self, pins: Mapping[str, tuple[str, ...]]) -> dict[Value, tuple]:
        by_name = {v.name: v for v in self.ctx.graph.all_values()}
        out = {}
        for name, texts in pins.items():
            if name not in by_name:
                raise PlanningError(f"pin on unknown value %{name}")
            if len(texts) != self.model.mesh.ndim:
                raise PlanningError(
                    f"pin %{name}={texts}: need one placement per mesh axis "
                    f"({self.model.mesh.ndim})"
                )
            out[self.ctx.rep_value(by_name[name])] = tuple(parse_placement(t) for t in texts)
        check_quant_pins(self.ctx.graph, out, self.model.mesh.shape, self.ctx.types)
        return out

    def _inputs(self, pins: dict[Value, tuple]) -> None:
        uses: dict[Value, list[tuple[list, int]]] = {}
        segs: dict[Value, set[str]] = {}
        for n in self.ctx.nodes:
            for i, v in enumerate(node_inputs(n)):
                if v.producer is None and isinstance(self.ctx.types.get(v), TensorType):
                    uses.setdefault(v, []).append((self.strats[n], i))
                    segs.setdefault(v, set()).add(self.seg[n])
        self.inputs = list(uses)
        for v in self.inputs:
            opts = self.model.input_options(v, uses[v])
            if v in pins:
                if pins[v] not in opts:
                    opts.append(pins[v])
                opts = [pins[v]]
            self.strats[v] = opts
            s = segs[v]
            self.seg[v] = "rep" if s == {"rep"} else (min(s) if len(s) == 1 else "shared")

    def _edges(self) -> list[RawEdge]:
        out = []
        for src, v, n, i, kind in self.ctx.edges():
            if isinstance(src, Node):
                src_ids = self._placement_ids(src, src.outputs.index(v), "out")
            else:
                src_ids = self._placement_ids(src, 0, "input")
            dst_ids = self._placement_ids(n, i, "in")
            per_mb, per_step = self.model.edge_matrix(v, src_ids, dst_ids, self._splits[n])
            out.append(RawEdge(src, n, per_mb, per_step, kind))
        return out

    def _placement_ids(self, key: Key, k: int, side: str) -> np.ndarray:
        ids = self._ids.get((key, k, side))
        if ids is None:
            if side == "input":
                pls = self.strats[key]
            elif side == "out":
                pls = [s.outs[k] for s in self.strats[key]]
            else:
                pls = [s.ins[k] for s in self.strats[key]]
            ids = self._ids[(key, k, side)] = self.model.intern(pls)
        return ids

    # ------------------------------------------------------------------ assembly
    def multiplier(self, key: Key, recompute: bool) -> float:
        return multiplier(self.ctx, key, self.model.training, recompute)

    def _is_layer(self, key: Key) -> bool:
        s = self.seg.get(key, "")
        return s == "rep" or s.startswith("x")

    def weight(self, key: Key, layers_per_stage: int) -> float:
        return float(layers_per_stage) if self.seg.get(key) == "rep" else 1.0

    def intra_op(
        self,
        layers_per_stage: int,
        inflight: int,
        micro_batches: int,
        recompute: bool,
        budget: float | None,
    ) -> IntraOpProblem:
        w_rep = max(1, layers_per_stage)
        prob = IntraOpProblem(memory_budget=budget)
        index = {k: i for i, k in enumerate(self.keys)}
        for k in self.keys:
            mult = self.multiplier(k, recompute)
            if isinstance(k, Node):
                times = self.fwd_time[k] * mult
                keep_act = not (recompute and self._is_layer(k))
                mem = self.act[k] * inflight if keep_act else np.zeros(len(times))
            else:
                times, mem = np.zeros(len(self.strats[k])), self.wmem[k]
            strategies = [
                Strategy(str(j), float(t), 0.0, float(m))
                for j, (t, m) in enumerate(zip(times, mem))
            ]
            prob.add_node(index[k], strategies, self.weight(k, w_rep))
        merged: dict[tuple[int, int, float], np.ndarray] = {}
        for e in self.edges:
            w = self._edge_weight(e, w_rep)
            if w <= 0:
                continue
            key = (index[e.src], index[e.dst], w)
            cost = e.per_mb + e.per_step / micro_batches
            merged[key] = merged[key] + cost if key in merged else cost
        for (a, b, w), cost in merged.items():
            prob.add_edge(a, b, cost, w)
        return prob

    def _edge_weight(self, e: RawEdge, w_rep: int) -> float:
        if e.kind == "loop":
            return float(w_rep - 1)
        if e.kind == "pre_rep":
            return 1.0
        return float(w_rep) if self.seg.get(e.dst) == "rep" else 1.0

    def decode(self, choice_by_index: Mapping[Hashable, int]) -> dict[Key, int]:
        return {k: int(choice_by_index[i]) for i, k in enumerate(self.keys)}

    # ------------------------------------------------------------------ evaluation
    def assignment(self, choice: Mapping[Key, int]) -> dict[Key, Any]:
        """Strategy objects (NodeStrategy, or a placement for graph inputs) of a choice."""
        return {k: self.strats[k][choice[k]] for k in self.keys}

    def evaluate(self, choice: Mapping[Key, int], recompute: bool) -> dict[str, SegmentCost]:
        return assignment_segments(self.ctx, self.model, self.assignment(choice), recompute)


def multiplier(ctx: GraphContext, key: Key, training: bool, recompute: bool) -> float:
    """Forward time -> time per micro-batch: x3 with backward, x4 when also recomputed."""
    if not training:
        return 1.0
    seg = ctx.segment.get(key, "") if isinstance(key, Node) else ""
    return 4.0 if recompute and (seg == "rep" or seg.startswith("x")) else 3.0


def assignment_segments(
    ctx: GraphContext, model: MeshModel, assign: Mapping[Key, Any], recompute: bool = False
) -> dict[str, SegmentCost]:
    """Per-segment costs of a strategy per reduced node and a placement per graph input;
    "rep" is ONE layer of the cluster. The single evaluation both the search and the grid use.
    """
    segs: dict[str, SegmentCost] = {}

    def seg(name: str) -> SegmentCost:
        return segs.setdefault(name, SegmentCost())

    for n in ctx.nodes:
        s = assign[n]
        t, act = model.node_costs(n, [s])
        sc = seg(ctx.segment[n])
        sc.compute += float(t[0]) * multiplier(ctx, n, model.training, recompute)
        sc.activation_memory += float(act[0])
    for v, names in ctx.input_segments().items():
        mem = float(model.input_memory(v, [assign[v]])[0])
        for name in names:
            seg(name).weight_memory += mem
    for src, v, n, i, kind in ctx.edges():
        if isinstance(src, Node):
            src_pl = assign[src].outs[src.outputs.index(v)]
        else:
            src_pl = assign[src]
        dst = assign[n]
        size = nbytes(model.types.get(v))
        per_mb, step_fixed, step_bytes = model.comm.transition_terms(
            src_pl, dst.ins[i], dst.split_axes(), size, model.edge_kind(v)
        )
        sc = seg("pre" if kind == "pre_rep" else ctx.segment[n])
        sc.comm += per_mb
        sc.sync += step_bytes * (model.zero_sync_factor if v.kind == "param" else 1.0)
        sc.sync_fixed = max(sc.sync_fixed, step_fixed)
    for name, outs in ctx.seg_outputs.items():
        sc = seg(name)
        for v in outs:
            n = v.producer
            sc.boundary_bytes += model.value_bytes(v, assign[n].outs[n.outputs.index(v)])
    return segs


def placements_of(assign: Mapping[Key, Any]) -> dict[Value, tuple]:
    """Placement of every value of the reduced graph under an assignment."""
    out: dict[Value, tuple] = {}
    for k, s in assign.items():
        if isinstance(k, Node):
            for o, pl in zip(k.outputs, s.outs):
                if pl is not None:
                    out[o] = pl
        else:
            out[k] = s
    return out
