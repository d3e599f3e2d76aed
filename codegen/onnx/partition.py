"""Partitioned ONNX export: per-rank programs cut into segments at their collectives.

A rank's program (passes/parallel/lower/ `lower_for_rank`) is straight-line IR with `dist.*`
nodes. Those are the cut points: the nodes between two collectives form a segment, exported as
one .onnx file whose inputs are the values it reads from earlier segments, collectives or the
model's inputs, and whose outputs are the values later segments, collectives or the model's
outputs read. Value names are the rank program's IR names, so the manifest can wire files and
collectives by name.

All segments of all ranks go through torch.onnx in one export (one GraphModule holding every
segment side by side, each value prefixed by its rank and segment), then each segment's file is
cut out of that model with onnx.utils.Extractor. One export instead of one per segment: the
dynamo exporter's fixed cost (registry, decompositions, optimizer) is paid once.

The manifest's `steps` are a global order in which to run files and collectives so that every
value exists before it is read: ranks run until they block on a collective; a collective fires
when every rank of its group (or, for send/recv, both peers) has reached it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from meshweave.ir.graph import Graph, Node, Value, map_values
from meshweave.ir.types import TensorType
from .single import (
    MANIFEST,
    MANIFEST_FORMAT,
    OnnxExport,
    OnnxExportError,
    OnnxFile,
    example_inputs,
    export_graph,
    export_graph_program,
    io_entry,
    run_onnx,
)

DIST_PREFIX = "dist."
# Above this much weight in all segments together, segments are exported one by one.
UNION_LIMIT_BYTES = 2**30
P2P = ("dist.send", "dist.recv")
# The dist.* ops that move data between ranks (ir/ops/collectives.py). dist.local_shard is a
# local slice, so it stays inside a segment.
COLLECTIVES = (
    "dist.all_reduce",
    "dist.all_gather",
    "dist.reduce_scatter",
    "dist.all_to_all",
    *P2P,
)


@dataclasses.dataclass
class Segment:
    rank: int
    index: int
    graph: Graph  # inputs: the values it reads (kind "user") then its weights


def _is_dist(n: Node) -> bool:
    return n.op in COLLECTIVES


def split_program(program: Graph, rank: int) -> list[Segment | Node]:
    """The rank's program as segments and dist.* nodes, in program order."""
    later_reads: dict[Value, int] = {}  # value -> index of the last item that reads it
    items: list[list[Node] | Node] = []
    for n in program.nodes:
        if _is_dist(n):
            items.append(n)
        elif items and isinstance(items[-1], list):
            items[-1].append(n)
        else:
            items.append([n])
    for i, item in enumerate(items):
        for n in item if isinstance(item, list) else [item]:
            for v in n.inputs:
                later_reads[v] = i
    for v in program.outputs:
        later_reads[v] = len(items)
    out: list[Segment | Node] = []
    seg_index = 0
    for i, item in enumerate(items):
        if isinstance(item, Node):
            out.append(item)
            continue
        out.append(
            Segment(
                rank,
                seg_index,
                _segment_graph(program, item, i, later_reads, f"rank{rank}_seg{seg_index}"),
            )
        )
        seg_index += 1
    return out


def _segment_graph(
    program: Graph, nodes: list[Node], item: int, later_reads: dict, name: str
) -> Graph:
    defined = {o for n in nodes for o in n.outputs}
    vmap: dict[Value, Value] = {}
    inputs: list[Value] = []
    state: list[Value] = []

    def use(v: Value) -> Value:
        if v in vmap:
            return vmap[v]
        if v.kind in ("param", "buffer", "constant"):
            nv = Value(v.name, v.type, None, v.kind, v.target, v.placements)
            state.append(nv)
        else:
            if not isinstance(v.type, TensorType):
                raise OnnxExportError(
                    f"{name}: %{v.name} ({v.type}) crosses a collective but "
                    "is not a tensor; ONNX files exchange tensors only"
                )
            nv = Value(v.name, v.type, None, "user", v.name)
            inputs.append(nv)
        vmap[v] = nv
        return nv

    new_nodes = []
    for n in nodes:
        nn = Node(n.op, (), {}, (), n.source, dict(n.attrs), n.multi_output)
        nn.args = map_values(n.args, lambda v: vmap[v] if v in defined else use(v))
        nn.kwargs = map_values(n.kwargs, lambda v: vmap[v] if v in defined else use(v))
        nn.outputs = tuple(
            Value(o.name, o.type, nn, "activation", None, o.placements) for o in n.outputs
        )
        vmap.update(zip(n.outputs, nn.outputs))
        new_nodes.append(nn)
    outputs = [vmap[o] for n in nodes for o in n.outputs if later_reads.get(o, -1) > item]
    tensors = {v.name: program.tensors[v.name] for v in state}
    return Graph(inputs + state, new_nodes, outputs, tensors, dict(program.symbols), [], name)


# --------------------------------------------------------------------------------- ordering
def _group(n: Node, rank: int) -> tuple[int, ...]:
    g = n.kwargs.get("group") or n.kwargs.get("ranks")
    if g is None:
        peer = _peer(n)
        return tuple(sorted((rank, peer))) if peer is not None else (rank,)
    return tuple(int(r) for r in g)


def _peer(n: Node) -> int | None:
    for key in ("peer", "dst", "src", "to", "from"):
        if n.kwargs.get(key) is not None:
            return int(n.kwargs[key])
    return None


def schedule_steps(programs: dict[int, list[Segment | Node]]) -> list[tuple]:
    """A global order: ("run", Segment) and ("coll", [(rank, Node), ...]) steps."""
    pos = {r: 0 for r in programs}
    steps: list[tuple] = []
    while True:
        for r, items in programs.items():
            while pos[r] < len(items) and isinstance(items[pos[r]], Segment):
                steps.append(("run", items[pos[r]]))
                pos[r] += 1
        blocked = {r: programs[r][pos[r]] for r in programs if pos[r] < len(programs[r])}
        if not blocked:
            return steps
        fired = _fire_one(blocked)
        if fired is None:
            waiting = ", ".join(
                f"rank {r}: {n.op} group {list(_group(n, r))}" for r, n in blocked.items()
            )
            raise OnnxExportError(
                f"the per-rank programs' collectives do not match up (deadlock): {waiting}"
            )
        steps.append(("coll", fired))
        for r, _ in fired:
            pos[r] += 1


def _fire_one(blocked: dict[int, Node]) -> list[tuple[int, Node]] | None:
    for r, n in sorted(blocked.items()):
        if n.op in P2P:
            peer = _peer(n)
            other = blocked.get(peer) if peer is not None else None
            want = "dist.recv" if n.op == "dist.send" else "dist.send"
            if (
                other is not None
                and other.op == want
                and _peer(other) == r
                and other.kwargs.get("tag", 0) == n.kwargs.get("tag", 0)
            ):
                pair = [(r, n), (peer, other)]
                return sorted(pair, key=lambda x: x[1].op != "dist.send")  # sender first
            continue
        group = _group(n, r)
        members = [(g, blocked.get(g)) for g in group]
        if all(m is not None and m.op == n.op and _group(m, g) == group for g, m in members):
            return members
    return None


def _collective_step(members: list[tuple[int, Node]]) -> dict:
    rank0, n0 = members[0]
    if n0.op in P2P:
        (src, send), (dst, recv) = members
        return {
            "op": "collective",
            "kind": "send_recv",
            "group": [src, dst],
            "tag": send.kwargs.get("tag", 0),
            "inputs": [{"rank": src, "name": _tensor_arg(send).name}],
            "outputs": [{"rank": dst, "name": recv.outputs[0].name}],
        }
    attrs = {
        k: v
        for k, v in n0.kwargs.items()
        if k not in ("group", "ranks") and isinstance(v, (int, float, str, bool, list))
    }
    return {
        "op": "collective",
        "kind": n0.op[len(DIST_PREFIX) :],
        "group": list(_group(n0, rank0)),
        **attrs,
        "inputs": [{"rank": r, "name": _tensor_arg(n).name} for r, n in members],
        "outputs": [{"rank": r, "name": n.outputs[0].name} for r, n in members],
    }


def _tensor_arg(n: Node) -> Value:
    vals = [v for v in n.inputs if isinstance(v.type, TensorType)]
    if not vals:
        raise OnnxExportError(f"collective {n.op} has no tensor input")
    if vals[0].kind in ("param", "buffer", "constant"):
        raise OnnxExportError(
            f"collective {n.op} reads weight %{vals[0].name} directly; the "
            "ONNX manifest only moves activations between files"
        )
    return vals[0]


# --------------------------------------------------------------------------------- collectives
def apply_collective(step: dict, env: list[dict[str, np.ndarray]]) -> None:
    """Apply one manifest collective step to the ranks' value environments (numpy)."""
    kind = step["kind"]
    xs = [env[i["rank"]][i["name"]] for i in step["inputs"]]
    outs = step["outputs"]
    n = len(outs)
    if kind == "send_recv":
        results = [xs[0]]
    elif kind == "all_reduce":
        op = step.get("reduce", step.get("op", "sum"))
        red = {"sum": np.sum, "avg": np.mean, "mean": np.mean, "max": np.max, "min": np.min}
        results = [red[op](np.stack(xs), axis=0).astype(xs[0].dtype)] * n
    elif kind == "all_gather":
        results = [np.concatenate(xs, axis=step.get("dim", 0))] * n
    elif kind == "reduce_scatter":
        total = np.sum(np.stack(xs), axis=0).astype(xs[0].dtype)
        results = np.split(total, n, axis=step.get("dim", 0))
    elif kind == "all_to_all":
        split = step.get("split_dim", step.get("dim", 0))
        concat = step.get("concat_dim", step.get("gather_dim", split))
        chunks = [np.split(x, n, axis=split) for x in xs]
        results = [np.concatenate([chunks[i][j] for i in range(n)], axis=concat) for j in range(n)]
    else:
        raise OnnxExportError(f"manifest collective kind {kind!r} is not known")
    for o, r in zip(outs, results):
        env[o["rank"]][o["name"]] = np.ascontiguousarray(r)


# --------------------------------------------------------------------------------- export
def export_partitioned(
    graph: Graph,
    plan: Any,
    directory: str,
    inputs: Sequence[torch.Tensor],
    *,
    opset: int,
    external_data_threshold: int,
    name: str,
) -> OnnxExport:
    """One file per (rank, segment) of `plan`, and the manifest that connects them."""
    from meshweave.passes.parallel.lower.rank import lower_for_rank
    from meshweave.progress import bar, step

    programs: dict[int, list[Segment | Node]] = {}
    lowered: dict[int, Graph] = {}
    for r in range(plan.world_size):
        with step(f"lowering rank {r} of {plan.world_size}"):
            lowered[r] = lower_for_rank(graph, plan, r)
        programs[r] = split_program(lowered[r], r)
    segments = [s for items in programs.values() for s in items if isinstance(s, Segment)]
    segments = [s for s in segments if s.graph.outputs]  # nothing later reads: skip
    with step(f"exporting {len(segments)} ONNX segment(s) for {plan.world_size} ranks"):
        files = export_segments(
            segments,
            directory,
            opset=opset,
            external_data_threshold=external_data_threshold,
            progress=lambda i: bar(i, len(segments), "ONNX segments"),
        )
    manifest = _manifest(graph, plan, lowered, files, manifest_steps(programs, files), name,
                         opset)
    return OnnxExport(directory, files, manifest)


def manifest_steps(programs: dict[int, list[Segment | Node]], files: list[OnnxFile]) -> list:
    """The manifest's `steps`: schedule_steps' order, each segment as the file exported for
    it (segments with no file, e.g. no outputs, are skipped), each collective as its step."""
    by_seg = {(f.rank, f.segment): f for f in files}
    steps = []
    for kind, what in schedule_steps(programs):
        if kind == "run":
            f = by_seg.get((what.rank, what.index))
            if f is not None:
                steps.append({"op": "run", "file": f.path, "rank": f.rank})
        else:
            steps.append(_collective_step(what))
    return steps


def export_segments(
    segments: list[Segment],
    directory: str,
    *,
    opset: int,
    external_data_threshold: int,
    progress=None,
    optimize: bool = True,
) -> list[OnnxFile]:
    """One file per segment: cut out of one union export, or (big weights) one export each.

    onnx.utils.Extractor serializes the whole model for shape inference, which protobuf
    cannot do past 2 GB, so a union whose weights exceed UNION_LIMIT_BYTES is exported segment
    by segment instead (slower, same files).
    """
    import onnx
    import onnx.utils

    if not segments:
        return []
    nbytes = [sum(t.numel() * t.element_size() for t in s.graph.tensors.values()) for s in segments]
    extractor = names = None
    if sum(nbytes) <= UNION_LIMIT_BYTES:
        union, names = _union_graph(segments)
        program = export_graph_program(union, example_inputs(union), opset=opset,
                                       optimize=optimize)
        extractor = onnx.utils.Extractor(program.model_proto)
    files = []
    for i, seg in enumerate(segments):
        path = f"{seg.graph.name}.onnx"
        full = os.path.join(directory, path)
        external = nbytes[i] > external_data_threshold
        if extractor is None:
            f = export_graph(
                seg.graph, full, external_data_threshold=external_data_threshold, opset=opset,
                optimize=optimize,
            )
            external = f.external_data is not None
        else:
            prefix = names[i]
            part = extractor.extract_model(
                [prefix + v.name for v in seg.graph.user_inputs],
                [prefix + v.name for v in seg.graph.outputs],
            )
            _strip_prefix(part, prefix)
            part.graph.name = seg.graph.name
            onnx.save_model(
                part,
                full,
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                location=path + ".data",
                size_threshold=1024,  # shape constants stay inline: onnx.checker reads them
            )
        ins, outs = [v.name for v in seg.graph.user_inputs], [v.name for v in seg.graph.outputs]
        data = path + ".data" if external else None
        files.append(OnnxFile(path, ins, outs, seg.rank, seg.index, data))
        if progress is not None:
            progress(i + 1)
    return files


def _union_graph(segments: list[Segment]) -> tuple[Graph, list[str]]:
    """Every segment side by side in one Graph; names prefixed 'r{rank}s{seg}__'."""
    inputs, state, nodes, outputs, tensors, prefixes = [], [], [], [], {}, []
    for seg in segments:
        prefix = f"r{seg.rank}s{seg.index}__"
        prefixes.append(prefix)
        g = seg.graph.copy()
        for v in g.all_values():
            if v.kind in ("param", "buffer", "constant"):
                tensors[prefix + v.name] = g.tensors[v.name]
                v.target = f"rank{seg.rank}.{v.target}" if v.target else None
            v.name = prefix + v.name
        inputs += g.user_inputs
        state += g.state_inputs
        nodes += g.nodes
        outputs += g.outputs
    return Graph(
        inputs + state, nodes, outputs, tensors, dict(segments[0].graph.symbols), [], "partitioned"
    ), prefixes


def _strip_prefix(model, prefix: str) -> None:
    """Rename the segment's values and weights back to the rank program's names.

    The exporter names intermediate values after its own nodes ("mul_12"), which may equal an
    IR name once the prefix is gone; such intermediates get a fresh name first.
    """
    g = model.graph
    weight = re.compile(r"^(p_|b_|c_)?rank\d+[._]")
    names = {x for n in g.node for x in (*n.input, *n.output)}
    names |= {vi.name for vi in (*g.input, *g.output)} | {t.name for t in g.initializer}
    wanted: dict[str, str] = {}
    for name in sorted(names):
        new = (
            name[len(prefix) :]
            if name.startswith(prefix)
            else weight.sub(lambda m: m.group(1) or "", name)
        )
        if new != name:
            wanted[name] = new
    taken = set(wanted.values())
    mapping = dict(wanted)
    for name in names - set(wanted):
        if name in taken and name:  # an intermediate whose name an IR value now needs
            k = 0
            while f"{name}__{k}" in names or f"{name}__{k}" in taken:
                k += 1
            mapping[name] = f"{name}__{k}"

    def rename(name: str) -> str:
        return mapping.get(name, name)

    for n in g.node:
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
    for coll in (g.input, g.output, g.value_info):
        for vi in coll:
            vi.name = rename(vi.name)
    for t in g.initializer:
        t.name = rename(t.name)


# --------------------------------------------------------------------------------- manifest
def _manifest(
    graph: Graph,
    plan: Any,
    lowered: dict[int, Graph],
    files: list[OnnxFile],
    steps: list[dict],
    name: str,
    opset: int,
) -> dict:
    """The manifest (format in run_manifest's docstring)."""
    mesh = plan.mesh
    meta0 = lowered[0].meta
    mb_dims = meta0.get("micro_batch_dim") or {}
    ranks = []
    for r, g in sorted(lowered.items()):
        specs = g.meta.get("shard_specs") or {}
        ranks.append(
            {
                "rank": r,
                "stage": plan.stage_of_rank(r),
                "coords": list(g.meta.get("coords")
                               or plan.stage_mesh(plan.stage_of_rank(r)).rank_coords(r)),
                "inputs": {
                    v.name: {"from": v.name, "shard": [list(e) for e in specs.get(v.name, [])]}
                    for v in g.user_inputs
                },
                "outputs": [v.name for v in g.outputs],
            }
        )
    last = [r for r in sorted(lowered) if plan.stage_of_rank(r) == plan.num_stages - 1]
    outputs = []
    for i, v in enumerate(graph.outputs):
        outs = [lowered[r].outputs[i] for r in last]
        place = outs[0].placements or ()
        outputs.append(
            {
                "name": v.name,
                "ranks": last,
                "local": [o.name for o in outs],
                "placements": [str(p) for p in place] or ["R"] * mesh.ndim,
                "mesh_shape": list(plan.stage_mesh(plan.num_stages - 1).shape),
                "micro_batch_dim": 0,
            }
        )
    return {
        "format": MANIFEST_FORMAT,
        "model": name,
        "opset": opset,
        "mesh": {"shape": list(mesh.shape), "axis_names": list(mesh.names)},
        "num_stages": plan.num_stages,
        "world_size": plan.world_size,
        "micro_batches": int(meta0.get("micro_batches") or plan.micro_batches or 1),
        "inputs": [io_entry(v, int(mb_dims.get(v.name, 0))) for v in graph.user_inputs],
        "outputs": outputs,
        "ranks": ranks,
        "files": [f.to_dict() for f in files],
        "steps": steps,
    }


# --------------------------------------------------------------------------------- running
def run_manifest(directory: str, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Run an export directory the way its manifest.json says; the model's outputs, in order.

    The reference reading of the format (a deployment runs each rank's files on its device and
    the collectives over its interconnect). For each of `micro_batches` micro-batches (the
    inputs cut along each input's `micro_batch_dim`):
      1. rank r's input `local` is `ranks[r].inputs[local]`: the model input `from`, cut by
         `shard` (entries `[dim, index, count]`, `[dim, index, count, blocks]` or
         `["rebatch", dim, size]`, applied in order, as passes/parallel/lower.shard_tensor);
      2. `steps` run in order: `run` feeds a file its `inputs` from the rank's values and
         stores its `outputs`; `collective` applies `kind` (all_reduce, all_gather,
         reduce_scatter, all_to_all, send_recv) to the named values of its `inputs`;
      3. output k is put together from `ranks`/`local` by its `placements` over `mesh_shape`
         (the last stage's mesh; older manifests: the plan's mesh).
    Micro-batch results are concatenated along each output's `micro_batch_dim`.
    """
    with open(os.path.join(directory, MANIFEST)) as fh:
        manifest = json.load(fh)
    b = int(manifest.get("micro_batches", 1))
    arrays = [
        np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x) for x in inputs
    ]
    chunks = [
        np.split(x, b, axis=spec["micro_batch_dim"]) if b > 1 else [x]
        for spec, x in zip(manifest["inputs"], arrays)
    ]
    per_mb = [_run_once(directory, manifest, [c[m] for c in chunks]) for m in range(b)]
    if b == 1:
        return per_mb[0]
    return [
        np.concatenate([r[k] for r in per_mb], axis=out["micro_batch_dim"])
        for k, out in enumerate(manifest["outputs"])
    ]


def _run_once(directory: str, manifest: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
    files = {f["path"]: f for f in manifest["files"]}
    by_name = {spec["name"]: x for spec, x in zip(manifest["inputs"], inputs)}
    env: list[dict[str, np.ndarray]] = [{} for _ in range(manifest["world_size"])]
    for info in manifest["ranks"]:
        for local, how in info["inputs"].items():
            env[info["rank"]][local] = shard_array(by_name[how["from"]], how["shard"])
    for st in manifest["steps"]:
        if st["op"] == "run":
            f, e = files[st["file"]], env[st["rank"]]
            outs = run_onnx(os.path.join(directory, f["path"]), [e[n] for n in f["inputs"]])
            e.update(zip(f["outputs"], outs))
        else:
            apply_collective(st, env)
    shape = manifest["mesh"]["shape"]
    coords = {info["rank"]: tuple(info["coords"]) for info in manifest["ranks"]}
    results = []
    for out in manifest["outputs"]:
        shards = {coords[r]: env[r][n] for r, n in zip(out["ranks"], out["local"])}
        results.append(assemble(shards, out["placements"], out.get("mesh_shape", shape)))
    return results


def shard_array(x: np.ndarray, spec: Sequence[Sequence]) -> np.ndarray:
    """A rank's piece of `x` by a shard spec (passes/parallel/lower.shard_tensor, in numpy)."""
    for entry in spec:
        if entry[0] == "rebatch":
            _, dim, size = entry
            if x.shape[dim] >= size:
                x = np.take(x, range(size), axis=dim)
            else:
                x = np.repeat(np.take(x, [0], axis=dim), size, axis=dim)
            continue
        dim, index, count = entry[:3]
        blocks = entry[3] if len(entry) > 3 and entry[3] else None
        pieces = np.split(x, np.cumsum(blocks)[:-1], axis=dim) if blocks else [x]
        x = np.concatenate([np.split(p, count, axis=dim)[index] for p in pieces], axis=dim)
    return np.ascontiguousarray(x)


def assemble(
    shards: dict[tuple[int, ...], np.ndarray], placements: Sequence[str], mesh_shape: Sequence[int]
) -> np.ndarray:
    """The full value from every mesh coordinate's piece, by placements (R, S(d), P)."""

    def rec(axis: int, prefix: tuple[int, ...]) -> np.ndarray:
        if axis == len(mesh_shape):
            return shards[prefix]
        p = placements[axis] if axis < len(placements) else "R"
        if not p.startswith(("S(", "P")):
            return rec(axis + 1, (*prefix, 0))
        parts = [rec(axis + 1, (*prefix, c)) for c in range(mesh_shape[axis])]
        if p.startswith("S("):
            return np.concatenate(parts, axis=int(p[2:-1]) % parts[0].ndim)
        return np.sum(np.stack(parts), axis=0).astype(parts[0].dtype)

    return rec(0, ())
