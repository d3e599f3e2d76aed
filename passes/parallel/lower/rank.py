"""Building one rank's program (the engine behind lower.lower_for_rank).

`RankLowering` walks the rank's stage in graph order. Every value is held in the placement
its producer left it in; when a node needs it in another placement, `materialize` emits the
steps of reshard.reshard_steps as dist.* nodes (cached, so a value gathered once is reused).
Ops rewrite themselves through the `LOWERING_RULES` table of lower_rules.py; the default
keeps the op and only swaps in local values and local output types.
"""

from __future__ import annotations

import math
from typing import Any

from meshweave.ir.graph import Graph, NameGen, Node, Value, map_values
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.ir.types import OpaqueType, TensorType
from meshweave.ir.verify import verify
from .cross_mesh import assemble_order, rank_box, relative, transfer_schedule
from .rules import LOWERING_RULES, default_rule
from .setup import (
    LoweringError,
    LoweringSetup,
    Placements,
    analyse,
    local_type,
    make_node,
    shard_tensor,
)
from ..plan import Plan
from ..strategies.axis import node_inputs
from ..strategies.reshard import Step, reshard_steps


class RankLowering:
    def __init__(self, su: LoweringSetup, rank: int, local_axis: int | None = None):
        plan = su.plan
        self.local_axis = local_axis
        if not 0 <= rank < plan.world_size:
            raise LoweringError(f"rank {rank} is outside the plan's {plan.world_size} devices")
        self.su, self.rank = su, rank
        self.stage = plan.stage_of_rank(rank)
        self.mesh = plan.stage_mesh(self.stage)  # global ranks as device ids
        self.coords = self.mesh.rank_coords(rank)
        self.groups = [self._group(a) for a in range(self.mesh.ndim)]
        self.names = NameGen()
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.tensors: dict[str, Any] = {}
        self.specs: dict[str, list[tuple]] = {}
        self.cur: dict[Value, tuple[Value, Placements | None]] = {}
        self.cache: dict[tuple[Value, Placements], Value] = {}

    def _group(self, axis: int) -> list[int]:
        out = []
        for k in range(self.mesh.shape[axis]):
            c = list(self.coords)
            c[axis] = k
            out.append(self.mesh.coords_rank(c))
        return out

    def ltype(self, v: Value, pl: Placements | None) -> Any:
        """v's local type on this rank's stage mesh."""
        return local_type(self.su, v, pl, self.mesh.shape)

    # ------------------------------------------------------------------ driver
    def run(self) -> Graph:
        su = self.su
        nodes = [n for n in su.graph.nodes if su.stage_of[n] == self.stage]
        self._inputs(nodes)
        tags = {(v, s, d): i for i, (v, s, d) in enumerate(su.transfers)}
        for (v, s, d), tag in tags.items():
            if d == self.stage:
                self._recv(v, s, tag)
        for n in nodes:
            self.emit(n)
        for (v, s, d), tag in tags.items():
            if s == self.stage:
                self._send(v, d, tag)
        outputs = []
        if self.stage == su.plan.num_stages - 1:
            rep = tuple(Replicate() for _ in self.mesh.shape)
            outputs = [self.materialize(v, self._output_placements(v, rep))
                       for v in su.graph.outputs]
        g = Graph(
            self.inputs,
            self.nodes,
            outputs,
            self.tensors,
            {},
            [],
            f"{su.graph.name}_rank{self.rank}",
        )
        g.meta.update(self._meta())
        return g

    def _output_placements(self, v: Value, rep: Placements) -> Placements:
        """Replicated, but for a batch-split output's slices along `local_axis` (each rank
        keeps its own rows: CompileOptions(local_batch=True))."""
        a = self.local_axis
        pl = self.su.placements.get(v) if a is not None else None
        if pl is not None and isinstance(pl[a], Shard) and pl[a].dim == 0:
            return (*rep[:a], Shard(0), *rep[a + 1:])
        return rep

    def _meta(self) -> dict[str, Any]:
        su = self.su
        mb_dims = {
            v.name: su.batch.dims.get(v)
            for v in su.graph.user_inputs
            if any(x.name == v.name for x in self.inputs)
        }
        return {
            "rank": self.rank,
            "stage": self.stage,
            "coords": self.coords,
            "mesh": self.mesh,
            "world_size": su.plan.world_size,
            "shard_specs": self.specs,
            "micro_batch_dim": {k: d for k, d in mb_dims.items() if d is not None},
            "micro_batches": su.plan.micro_batches,
            "micro_batch_size": self._micro_batch_size(),
            "groups": {self.mesh.names[a]: g for a, g in enumerate(self.groups)},
            "outputs_replicated": self.stage == su.plan.num_stages - 1,
        }

    def _micro_batch_size(self) -> int:
        total = self.su.plan.search.get("batch") or self.su.batch.traced_batch
        return total // self.su.plan.micro_batches

    # ------------------------------------------------------------------ inputs
    def _inputs(self, nodes: list[Node]) -> None:
        su = self.su
        used = {v for n in nodes for v in node_inputs(n) if v.producer is None}
        if self.stage == su.plan.num_stages - 1:
            used |= {v for v in su.graph.outputs if v.producer is None}
        for v in su.graph.inputs:
            if v not in used:
                continue
            pl = su.placements.get(v)
            t = self.ltype(v, pl)
            spec = self._spec(v, pl)
            lv = Value(v.name, t, None, v.kind, v.target, pl)
            self.names.taken.add(v.name)
            self.inputs.append(lv)
            self.specs[v.name] = spec
            if v.kind != "user":
                if v.name not in su.graph.tensors:
                    raise LoweringError(f"{v.kind} input %{v.name} has no tensor")
                self.tensors[v.name] = shard_tensor(su.graph.tensors[v.name], spec)
            self.cur[v] = (lv, pl)

    def _spec(self, v: Value, pl: Placements | None) -> list[tuple]:
        su = self.su
        spec: list[tuple] = []
        t = su.types.get(v)
        if not isinstance(t, TensorType):
            return spec
        d = su.batch.dims.get(v)
        full = su.graph.tensors.get(v.name)
        if v.kind != "user" and d is not None and full is not None and full.shape[d] != t.shape[d]:
            spec.append(("rebatch", d, t.shape[d]))
        blocks = dict(su.blocks.get(v, {}))
        for a, p in enumerate(pl or ()):
            if isinstance(p, Shard):
                n = self.mesh.shape[a]
                b = blocks.get(p.dim)
                spec.append((p.dim, self.coords[a], n, b) if b else (p.dim, self.coords[a], n))
                if b:
                    blocks[p.dim] = tuple(x // n for x in b)
        return spec

    # ------------------------------------------------------------------ stage transfers
    def _same_layout(self, other: int) -> bool:
        return self.su.plan.stage_mesh(other).shape == self.mesh.shape

    def _recv(self, v: Value, src: int, tag: int) -> None:
        pl = self.su.placements.get(v)
        if self._same_layout(src):  # the piece of the rank at the same mesh coordinates
            peer = self.su.plan.stage_mesh(src).devices[self.mesh.devices.index(self.rank)]
            x = self._recv_piece(v, peer, tag, self.ltype(v, pl), pl)
            self.cur[v] = (x, pl)
            return
        pl = _reduced(pl)
        mine = [p for p in self._schedule(v, src, self.stage) if p.dst == self.rank]
        t = self.su.types[v]
        home = rank_box(t.shape, pl, self.mesh, self.rank, f"%{v.name}")
        parts = [
            self._recv_piece(v, p.src, tag, _box_type(t, relative(p.box, home)), pl)
            for p in mine
        ]
        x = self._assemble(v, parts, assemble_order([p.box for p in mine]), pl)
        self.cur[v] = (x, pl)

    def _recv_piece(self, v: Value, src: int, tag: int, t: TensorType, pl) -> Value:
        kw = {"src": src, "tag": tag, "shape": list(t.shape), "dtype": t.dtype}
        return self.add("dist.recv", (), kw, [t], v.name, placements=[pl])

    def _assemble(self, v: Value, parts: list[Value], order, pl) -> Value:
        if isinstance(order, int):
            return parts[order]
        dim, sub = order
        xs = [self._assemble(v, parts, o, pl) for o in sub]
        shape = list(xs[0].type.shape)
        shape[dim] = sum(x.type.shape[dim] for x in xs)
        t = TensorType(tuple(shape), xs[0].type.dtype, xs[0].type.device)
        return self.add("aten.cat.default", (xs, dim), {}, [t], f"{v.name}_cat", placements=[pl])

    def _send(self, v: Value, dst: int, tag: int) -> None:
        if self._same_layout(dst):
            x, _ = self.cur[v]
            peer = self.su.plan.stage_mesh(dst).devices[self.mesh.devices.index(self.rank)]
            self._send_piece(v, x, peer, tag)
            return
        pl = _reduced(self.su.placements.get(v))
        x = self.materialize(v, pl)
        t = self.su.types[v]
        home = rank_box(t.shape, pl, self.mesh, self.rank, f"%{v.name}")
        for p in self._schedule(v, self.stage, dst):
            if p.src != self.rank:
                continue
            piece = x
            for d, ((lo, hi), full) in enumerate(zip(relative(p.box, home), piece.type.shape)):
                if (lo, hi) != (0, full):
                    shape = list(piece.type.shape)
                    shape[d] = hi - lo
                    pt = TensorType(tuple(shape), piece.type.dtype, piece.type.device)
                    piece = self.add("aten.slice.Tensor", (piece, d, lo, hi), {}, [pt],
                                     f"{v.name}_piece", placements=[pl])
            self._send_piece(v, piece, p.dst, tag)

    def _send_piece(self, v: Value, x: Value, dst: int, tag: int) -> None:
        self.add("dist.send", (x,), {"dst": dst, "tag": tag}, [OpaqueType("token")],
                 f"send_{v.name}")

    def _schedule(self, v: Value, src: int, dst: int):
        if self.su.blocks.get(v):
            raise LoweringError(
                f"%{v.name} crosses from stage {src} to stage {dst}, whose meshes differ, in a "
                "layout cut piece by piece (for a later split); such transfers are not supported"
            )
        pl = _reduced(self.su.placements.get(v))
        plan = self.su.plan
        return transfer_schedule(self.su.types[v].shape, pl, plan.stage_mesh(src), pl,
                                 plan.stage_mesh(dst), f"%{v.name} (stage {src} -> {dst})")

    # ------------------------------------------------------------------ nodes
    def add(
        self,
        op: str,
        args: tuple,
        kwargs: dict,
        out_types: list,
        hint: str,
        source: str = "",
        placements: list | None = None,
    ) -> Value:
        n = make_node(op, args, kwargs, out_types, self.names, hint, source, placements)
        self.nodes.append(n)
        return n.outputs[0]

    def emit(self, n: Node) -> None:
        su = self.su
        req = su.in_pl[n]
        local = []
        for v, pl in zip(node_inputs(n), req):
            if pl is None:
                local.append(self.cur[v][0] if v in self.cur else v)
            else:
                local.append(self.materialize(v, pl))
        it = iter(local)
        args, kwargs = map_values((n.args, n.kwargs), lambda v: next(it))
        out_pls = [su.placements.get(o) for o in n.outputs]
        out_types = [self.ltype(o, pl) for o, pl in zip(n.outputs, out_pls)]
        rule = LOWERING_RULES.get(n.op, default_rule)
        outs = rule(self, n, args, kwargs, out_types, out_pls)
        for o, lv, pl in zip(n.outputs, outs, out_pls):
            self.cur[o] = (lv, pl)

    def emit_like(
        self, n: Node, op: str, args: tuple, kwargs: dict, out_types: list, out_pls: list
    ) -> list[Value]:
        """Emit `n` (or `op` in its place) on local values; returns its outputs."""
        node = make_node(
            op,
            args,
            kwargs,
            out_types,
            self.names,
            n.outputs[0].name,
            n.source,
            out_pls,
            n.multi_output,
        )
        node.attrs = dict(n.attrs)
        self.nodes.append(node)
        return list(node.outputs)

    # ------------------------------------------------------------------ resharding
    def materialize(self, v: Value, want: Placements) -> Value:
        """v as this rank holds it under placements `want` (emitting collectives as needed)."""
        if v not in self.cur:
            raise LoweringError(
                f"%{v.name} is needed on stage {self.stage} but neither computed nor received there"
            )
        x, have = self.cur[v]
        if have is None or have == want:
            return x
        hit = self.cache.get((v, want))
        if hit is not None:
            return hit
        pl = list(have)
        for a, (h, w) in enumerate(zip(have, want)):
            if isinstance(w, Partial) and isinstance(h, Replicate):
                x = self._replicate_to_partial(v, x, pl, a)
        for step in self._steps(v, tuple(pl), want):
            x = self._emit_step(v, x, pl, step)
        self.cache[(v, want)] = x
        return x

    def _replicate_to_partial(self, v: Value, x: Value, pl: list, axis: int) -> Value:
        """A replicated value as a partial sum over `axis`: coordinate 0 keeps it, the other
        ranks hold zeros (a stage of another mesh shape sent it reduced, but the reading node
        sums partials)."""
        pl[axis] = Partial()
        if self.coords[axis] == 0:
            return x
        return self.add("aten.zeros_like.default", (x,), {}, [x.type], f"{v.name}_partial",
                        placements=[tuple(pl)])

    def _steps(self, v: Value, have: Placements, want: Placements) -> list[Step]:
        steps = reshard_steps(have, want)
        blocked = self.su.blocks.get(v, {})
        if not blocked:
            return steps
        out: list[Step] = []
        for s in steps:  # collectives that would mix the pieces of a blocked dim
            if s.kind == "reduce_scatter" and s.dim in blocked:
                out += [Step("all_reduce", s.axis), Step("slice", s.axis, s.dim)]
            elif s.kind == "all_to_all" and s.dim in blocked:
                out += [Step("all_gather", s.axis, s.dim2), Step("slice", s.axis, s.dim)]
            elif (
                s.kind in ("all_gather", "all_to_all")
                and (s.dim2 if s.kind == "all_to_all" else s.dim) in blocked
            ):
                raise LoweringError(
                    f"%{v.name}: gathering a dim laid out piece by piece "
                    f"(for a later split) is not supported"
                )
            else:
                out.append(s)
        return out

    def _emit_step(self, v: Value, x: Value, pl: list, step: Step) -> Value:
        su, a = self.su, step.axis
        kw: dict[str, Any] = {"axis": self.mesh.names[a], "group": list(self.groups[a])}
        if step.kind == "all_reduce":
            op, kw["reduce"] = "dist.all_reduce", "sum"
            pl[a] = Replicate()
        elif step.kind == "reduce_scatter":
            op, kw["dim"], kw["reduce"] = "dist.reduce_scatter", step.dim, "sum"
            pl[a] = Shard(step.dim)
        elif step.kind == "all_gather":
            op, kw["dim"] = "dist.all_gather", step.dim
            pl[a] = Replicate()
        elif step.kind == "all_to_all":
            op, kw["dim"], kw["concat_dim"] = "dist.all_to_all", step.dim, step.dim2
            pl[a] = Shard(step.dim)
        else:
            op = "dist.local_shard"
            kw.update(dim=step.dim, index=self.coords[a], count=self.mesh.shape[a])
            blocks = su.blocks.get(v, {}).get(step.dim)
            if blocks:
                done = math.prod(
                    self.mesh.shape[b]
                    for b, p in enumerate(pl)
                    if isinstance(p, Shard) and p.dim == step.dim
                )
                kw["blocks"] = [s // done for s in blocks]
            pl[a] = Shard(step.dim)
        new_pl = tuple(pl)
        if isinstance(pl[a], Partial):
            raise LoweringError(f"%{v.name}: reshard step {step} left a partial value")
        return self.add(
            op, (x,), kw, [self.ltype(v, new_pl)], f"{v.name}_{step.kind}", placements=[new_pl]
        )


def _reduced(pl: Placements | None) -> Placements | None:
    """Partial sums reduced: what a rank sends to a stage of another mesh shape."""
    if pl is None:
        return None
    return tuple(Replicate() if isinstance(p, Partial) else p for p in pl)


def _box_type(t: TensorType, box) -> TensorType:
    return TensorType(tuple(hi - lo for lo, hi in box), t.dtype, t.device)


def lower_for_rank(
    graph: Graph, plan: Plan, rank: int, *, setup: LoweringSetup | None = None,
    local_axis: int | None = None,
) -> Graph:
    """The program rank `rank` runs per micro-batch (see the package docstring). Its outputs
    are replicated over the stage mesh; with `local_axis`, batch-split outputs keep their
    slices along that mesh axis (per-rank batches, as DDP)."""
    su = setup or analyse(graph, plan)
    out = RankLowering(su, rank, local_axis).run()
    verify(out, after_pass=f"lower_for_rank({rank})")
    return out
