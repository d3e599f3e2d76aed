"""Run every rank's lowered program in one process: `simulate_plan(graph, plan, inputs)`.

A test oracle for the lowering without processes or torch.distributed. Each rank's program
(lower_for_rank) runs as a generator over its nodes with the reference executor; at a
`dist.*` node it pauses. A collective fires once every rank of its group has reached its
next collective on that group (they must agree on the op, or the programs are mismatched and
a deadlock is reported); the result is computed from the ranks' tensors in-process: sum for
all_reduce, concatenation in group order for all_gather, sum then chunk for reduce_scatter,
chunk exchange for all_to_all, and moe.experts_ep (a collective on all its arguments) runs
each rank's tokens through the experts of its whole group. `dist.send` posts to a mailbox
keyed by (src, dst, tag) and `dist.recv` waits for it. The global batch is cut into
plan.micro_batches micro-batches along each user input's batch dim; every micro-batch runs all
programs to completion, and the last stage's (replicated) outputs are concatenated back along
their batch dims.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.ops.collectives import shard_slice
from meshweave.ir.ops.moe import moe_experts
from meshweave.ir.ops.moe_ep import MOE_EXPERTS_EP
from meshweave.runtime.reference import run_node
from .rank import lower_for_rank
from .setup import LoweringError, analyse, shard_tensor
from ..plan import Plan


def simulate_plan(
    graph: Graph, plan: Plan, inputs: Sequence[Any], programs: list[Graph] | None = None
) -> list[Any]:
    """Outputs of `graph` on `inputs` (the global batch) as the plan's ranks compute them."""
    su = analyse(graph, plan)
    if programs is None:
        programs = [lower_for_rank(graph, plan, r, setup=su) for r in range(plan.world_size)]
    m = plan.micro_batches
    users = graph.user_inputs
    if len(inputs) != len(users):
        raise ValueError(f"graph {graph.name} takes {len(users)} user inputs, got {len(inputs)}")
    per_mb: list[list[Any]] = []
    for j in range(m):
        feeds = {}
        for v, x in zip(users, inputs):
            d = su.batch.dims.get(v)
            feeds[v.name] = x.chunk(m, d)[j] if (d is not None and m > 1) else x
        per_mb.append(_run_micro_batch(programs, feeds))
    last = next(r for r in range(plan.world_size) if plan.stage_of_rank(r) == plan.num_stages - 1)
    outs = [mb[last] for mb in per_mb]
    result = []
    for i, v in enumerate(graph.outputs):
        parts = [o[i] for o in outs]
        d = su.batch.dims.get(v)
        if m == 1 or not isinstance(parts[0], torch.Tensor):
            result.append(parts[0])
        elif d is None:
            raise LoweringError(f"output %{v.name} has no batch dim to join micro-batches on")
        else:
            result.append(torch.cat(parts, d))
    return result


def _run_micro_batch(programs: list[Graph], feeds: dict[str, Any]) -> dict[int, list[Any]]:
    gens = {r: _rank_program(g, feeds) for r, g in enumerate(programs)}
    waiting: dict[int, tuple] = {}
    results: dict[int, list[Any]] = {}
    mailbox: dict[tuple[int, int, int], Any] = {}
    for r, gen in gens.items():
        _advance(r, gen, None, waiting, results)
    while waiting:
        progressed = False
        for r in list(waiting):
            req = waiting.get(r)
            if req is None or req[0] != "p2p":
                continue
            n, x = req[1], req[2]
            if n.op == "dist.send":
                mailbox[(r, n.kwargs["dst"], n.kwargs["tag"])] = x
                _advance(r, gens[r], None, waiting, results)
                progressed = True
            else:
                key = (n.kwargs["src"], r, n.kwargs["tag"])
                if key in mailbox:
                    got = mailbox.pop(key)
                    if list(got.shape) != list(n.kwargs["shape"]):
                        raise LoweringError(
                            f"rank {r}: {n.outputs[0].name} = dist.recv(src={key[0]}, "
                            f"tag={key[2]}) expects shape {list(n.kwargs['shape'])}, the "
                            f"sender sent {list(got.shape)}"
                        )
                    _advance(r, gens[r], got, waiting, results)
                    progressed = True
        progressed |= _fire_collectives(gens, waiting, results)
        if not progressed:
            stuck = ", ".join(
                f"rank {r}: {w[1].op} {w[1].kwargs.get('group', '')}"
                for r, w in sorted(waiting.items())
            )
            raise LoweringError(f"simulated ranks deadlock: {stuck}")
    return results


def _advance(r: int, gen: Iterator, value: Any, waiting: dict, results: dict) -> None:
    try:
        req = gen.send(value)
        waiting[r] = req
    except StopIteration as stop:
        waiting.pop(r, None)
        results[r] = stop.value


def _rank_program(g: Graph, feeds: dict[str, Any]):
    """Generator: yields ("p2p"|"coll", node, tensor) at dist.* nodes, returns the outputs."""
    env: dict[Value, Any] = {}
    for v in g.inputs:
        if v.kind == "user":
            env[v] = shard_tensor(feeds[v.name], g.meta["shard_specs"].get(v.name, []))
        else:
            env[v] = g.tensors[v.name]
    for n in g.nodes:
        if n.op in ("dist.send", "dist.recv"):
            x = env[n.args[0]] if n.args else None
            env[n.outputs[0]] = yield ("p2p", n, x)
        elif n.op.startswith("dist.") and n.op != "dist.local_shard":
            env[n.outputs[0]] = yield ("coll", n, env[n.args[0]])
        elif n.op == MOE_EXPERTS_EP:  # a collective over its group, on all its arguments
            outs = yield ("coll", n, [env[a] if isinstance(a, Value) else a for a in n.args])
            env.update(zip(n.outputs, outs))
        else:
            run_node(n, env)
    return [env[v] for v in g.outputs]


def _fire_collectives(gens: dict, waiting: dict, results: dict) -> bool:
    fired = False
    for r in sorted(waiting):
        req = waiting.get(r)
        if req is None or req[0] != "coll":
            continue
        group = tuple(req[1].kwargs["group"])
        members = [waiting.get(g) for g in group]
        if any(
            m is None or m[0] != "coll" or tuple(m[1].kwargs["group"]) != group for m in members
        ):
            continue
        ops = {m[1].op for m in members}
        if len(ops) != 1:
            raise LoweringError(f"ranks {list(group)} reach different collectives {sorted(ops)}")
        outs = _collective(members[0][1], [m[2] for m in members])
        for g, y in zip(group, outs):
            _advance(g, gens[g], y, waiting, results)
        fired = True
    return fired


def _collective(n: Node, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    k = len(xs)
    if n.op == "dist.all_reduce":
        stacked = torch.stack(xs)
        total = stacked.amax(0) if n.kwargs.get("reduce") == "max" else stacked.sum(0)
        return [total.clone() for _ in xs]
    if n.op == "dist.all_gather":
        full = torch.cat(xs, n.kwargs["dim"])
        return [full.clone() for _ in xs]
    if n.op == "dist.reduce_scatter":
        total = torch.stack(xs).sum(0)
        return [shard_slice(total, n.kwargs["dim"] % total.dim(), i, k) for i in range(k)]
    if n.op == "dist.all_to_all":
        d, c = n.kwargs["dim"], n.kwargs["concat_dim"]
        chunks = [x.chunk(k, d) for x in xs]
        return [torch.cat([chunks[src][dst] for src in range(k)], c) for dst in range(k)]
    if n.op == MOE_EXPERTS_EP:  # each rank's tokens through the group's experts, gathered
        w_in, w_gate, w_out = (None if xs[0][i] is None else torch.cat([x[i] for x in xs])
                               for i in (3, 4, 5))
        kw = {k: n.kwargs[k] for k in ("act", "layout", "fused_gate_up", "capacity_factor")
              if k in n.kwargs}
        return [moe_experts(x[0], x[1], x[2], w_in, w_gate, w_out, **kw) for x in xs]
    raise LoweringError(f"simulate: unknown collective {n.op}")
