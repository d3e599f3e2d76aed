"""Shard-wise ONNX export: each rank's files from that rank's shards only, one rank at a time.

    export_sharded(cm, plan, "out/", SeededInit(0))            # or SafetensorsCheckpoint(path)

The same files and manifest as export_onnx's partitioned path (partition.py), built so that the
full model is never in memory: the traced graph's parameters and buffers are made meta (shape
and dtype only; a model traced on the meta device already is), each rank is lowered on them
(passes/parallel/lower/ `lower_for_rank`: meta shards and `meta["shard_specs"]`), then its
shards are read from the weight source (weights.py: a checkpoint slice, or a seeded init
generated piece by piece), its segments exported (weights over `external_data_threshold` go to
external data, `<file>.data`), and its tensors released before the next rank. Peak memory is
about one rank's shards (plus torch.onnx's copy of them while it writes).

Constants folded on the meta device (llama's rotary tables) have no values; they are computed
again on the CPU from the frontend graph (`cm.frontend_graph`), which records the ops that made
them. There is no check against the reference executor here (it would need the whole model):
the test suite and `meshweave export` on small models compare run_manifest with eager.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, Value, map_values
from meshweave.runtime.reference import node_callable
from .partition import (
    UNION_LIMIT_BYTES,
    Segment,
    _manifest,
    export_segments,
    manifest_steps,
    split_program,
)
from .scalars import fold_scalar_inputs, full_inputs, tensor_leaves
from .single import (
    EXTERNAL_DATA_THRESHOLD,
    OPSET,
    OnnxExport,
    example_inputs,
    export_graph,
    single_manifest,
)
from .weights import Param, WeightSource, WeightSourceError, read_shard

__all__ = ["ShardExportError", "export_sharded", "params_of", "state_dict_of"]

STATE_KINDS = ("param", "buffer")


class ShardExportError(MeshweaveError):
    """The shard-wise export cannot get a tensor's values (names the tensor)."""


def params_of(graph: Graph) -> dict[str, Param]:
    """The graph's parameters and buffers (IR name -> Param: full shape and dtype)."""
    out = {}
    for v in graph.state_inputs:
        t = graph.tensors.get(v.name)
        if v.kind in STATE_KINDS and isinstance(t, torch.Tensor):
            out[v.name] = Param(v.name, v.target, tuple(t.shape), t.dtype, v.kind)
    return out


def state_dict_of(graph: Graph, weights: WeightSource) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole, keyed by state_dict name (small models and tests:
    the full tensors the shards of an export come from)."""
    return {p.key: weights.full(p) for p in params_of(graph).values()}


def _metaize(graph: Graph) -> Graph:
    """A copy whose parameters and buffers are meta tensors (constants keep their values)."""
    g = graph.copy()
    g.tensors = dict(graph.tensors)
    for v in g.state_inputs:
        t = g.tensors.get(v.name)
        if v.kind in STATE_KINDS and isinstance(t, torch.Tensor) and t.device.type != "meta":
            g.tensors[v.name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return g


# --------------------------------------------------------------------------------- constants
def materialize_constants(graph: Graph, frontend: Graph | None) -> None:
    """Give `graph`'s meta constants their values, computed on the CPU from `frontend`."""
    need = [
        v
        for v in graph.state_inputs
        if v.kind == "constant"
        and isinstance(t := graph.tensors.get(v.name), torch.Tensor)
        and t.device.type == "meta"
    ]
    if not need:
        return
    if frontend is None:
        raise ShardExportError(
            f"constants {[v.name for v in need][:4]} of {graph.name} were traced on the meta "
            "device and have no values; pass the frontend graph (cm.frontend_graph)"
        )
    values = {v.name: v for v in frontend.inputs}
    values.update({o.name: o for n in frontend.nodes for o in n.outputs})
    env: dict[Value, Any] = {}
    for v in need:
        src = v.target[len("folded.") :] if (v.target or "").startswith("folded.") else v.name
        fv = values.get(src)
        if fv is None:
            raise ShardExportError(f"constant %{v.name} ({v.target}) is not in the frontend graph")
        t = _evaluate(fv, frontend, env, v.name)
        want = graph.tensors[v.name]
        if tuple(t.shape) != tuple(want.shape):
            raise ShardExportError(
                f"constant %{v.name} computed again has shape {tuple(t.shape)}, "
                f"traced {tuple(want.shape)}"
            )
        graph.tensors[v.name] = t.to(want.dtype).contiguous()


def _on_cpu(x: Any) -> Any:
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    if x == "meta" and isinstance(x, str):
        return "cpu"
    if isinstance(x, (list, tuple)):
        return type(x)(_on_cpu(y) for y in x)
    if isinstance(x, dict):
        return {k: _on_cpu(y) for k, y in x.items()}
    return x


def _evaluate(v: Value, frontend: Graph, env: dict, what: str) -> torch.Tensor:
    if v in env:
        return env[v]
    n = v.producer
    if n is None:
        t = frontend.tensors.get(v.name)
        if v.kind != "constant" or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            raise ShardExportError(
                f"constant %{what} of a meta-traced model depends on {v.kind} %{v.name}, "
                "which has no values; trace the model on the CPU instead"
            )
        env[v] = t
        return t
    for x in n.inputs:
        _evaluate(x, frontend, env, what)
    args = _on_cpu(map_values(n.args, env.__getitem__))
    kwargs = _on_cpu(map_values(n.kwargs, env.__getitem__))
    result = node_callable(n)(*args, **kwargs)
    for o, r in zip(n.outputs, result if n.multi_output else [result]):
        env[o] = r
    return env[v]


# --------------------------------------------------------------------------------- export
def _load_tensors(
    g: Graph, specs: dict, params: dict[str, Param], weights: WeightSource,
    cache: dict | None = None,
) -> int:
    """Replace the meta parameters and buffers that g's nodes read by their shards (cut by
    the rank program's `specs`); the bytes read. `cache` shares shards between segments (a
    tied weight that two segments of a rank read is read, and held, once)."""
    used = {v for n in g.nodes for v in n.inputs} | set(g.outputs)
    total = 0
    for v in g.state_inputs:
        p = params.get(v.name)
        if p is None or v not in used:  # e.g. a row-parallel bias off coordinate 0
            continue
        if cache is not None and v.name in cache:
            g.tensors[v.name] = cache[v.name]
            continue
        want = g.tensors[v.name]
        t = read_shard(weights, p, specs.get(v.name) or ())
        if tuple(t.shape) != tuple(want.shape):
            raise WeightSourceError(
                f"{weights.describe()}: the shard of {p.key!r} is {tuple(t.shape)}; "
                f"{g.name} expects {tuple(want.shape)}"
            )
        g.tensors[v.name] = t
        if cache is not None:
            cache[v.name] = t
        total += t.numel() * t.element_size()
    return total


def _export_rank(
    segs: list[Segment], specs: dict, params: dict, weights: WeightSource, directory: str,
    **kw: Any,
) -> tuple[list, int, int]:
    """A rank's files: one union export when its weights are at most UNION_LIMIT_BYTES, else
    segment by segment, each segment's shards read just before and released just after.
    Returns (files, the rank's weight bytes, the most weight bytes in memory at once)."""
    def nbytes(s: Segment) -> int:
        return sum(t.numel() * t.element_size() for t in s.graph.tensors.values())

    if sum(nbytes(s) for s in segs) <= UNION_LIMIT_BYTES:
        cache: dict = {}
        total = sum(_load_tensors(s.graph, specs, params, weights, cache) for s in segs)
        del cache
        return export_segments(segs, directory, **kw), total, total
    files, total, most = [], 0, 0
    for s in segs:
        n = _load_tensors(s.graph, specs, params, weights)
        f = export_graph(s.graph, os.path.join(directory, f"{s.graph.name}.onnx"), **kw)
        f.rank, f.segment = s.rank, s.index
        files.append(f)
        s.graph.tensors = {}
        gc.collect()
        total, most = total + n, max(most, n)
    return files, total, most


def export_sharded(
    cm: Any,
    plan: Any,
    directory: str,
    weights: WeightSource,
    inputs: Sequence[Any] | None = None,
    *,
    opset: int = OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    check: bool = True,
    frontend_graph: Graph | None = None,
    optimize: bool = False,
) -> OnnxExport:
    """Export a CompiledModel (or Graph) under `plan` (None: one file), rank by rank, with the
    weights of `weights` (module docstring). `inputs` are example user inputs (default, or when
    they are meta: synthesized from the traced types). With `check`, onnx.checker runs on every
    file. The result's `rank_bytes` maps each rank to the bytes of its weights.

    `optimize=False` (default) leaves torch.onnx's optimizer out: each file's initializers are
    exactly the rank's shards under their state_dict names (the optimizer would fold a linear's
    transpose, or a gather of rows, into new unnamed ones, and hold both in memory);
    onnxruntime folds such transposes when it loads a file."""
    from meshweave.progress import step

    traced: Graph = cm if isinstance(cm, Graph) else cm.graph
    frontend = frontend_graph if frontend_graph is not None else getattr(cm, "frontend_graph", None)
    name = getattr(cm, "model_name", traced.name)
    if inputs is None or any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        inputs = example_inputs(traced)
    full = full_inputs(traced, inputs)
    graph = _metaize(fold_scalar_inputs(traced, full))
    inputs = tensor_leaves(traced, full)
    materialize_constants(graph, frontend)
    params = params_of(graph)
    os.makedirs(directory, exist_ok=True)
    rank_bytes: dict[int, int] = {}
    resident: dict[int, int] = {}
    if plan is None or plan.world_size == 1:
        with step(f"exporting {name} to ONNX (opset {opset}) from {weights.describe()}"):
            rank_bytes[0] = resident[0] = _load_tensors(graph, {}, params, weights)
            f = export_graph(graph, os.path.join(directory, "model.onnx"), inputs, opset=opset,
                             external_data_threshold=external_data_threshold, optimize=optimize)
        files, manifest = [f], single_manifest(graph, f, name, opset)
    else:
        kw = dict(opset=opset, optimize=optimize, external_data_threshold=external_data_threshold)
        programs, lowered, files = _export_ranks(graph, plan, params, weights, directory,
                                                 rank_bytes, resident, **kw)
        manifest = _manifest(graph, plan, lowered, files, manifest_steps(programs, files), name,
                             opset)
    result = OnnxExport(directory, files, manifest)
    with open(result.manifest_path, "w") as fh:
        json.dump(manifest, fh, indent=1)
    if check:
        import onnx

        with step("checking the ONNX files (onnx.checker)"):
            for path in result.paths:
                onnx.checker.check_model(path, full_check=True)
    read = {v.name for n in graph.nodes for v in n.inputs}  # not a tied weight's 2nd name
    total = sum(_nbytes(p) for p in params.values() if p.name in read)
    result.notes.append(
        f"weights from {weights.describe()}, rank by rank: the largest rank holds "
        f"{max(rank_bytes.values()) / 2**20:.1f} MiB of the model's {total / 2**20:.1f} MiB, "
        f"at most {max(resident.values()) / 2**20:.1f} MiB of weights in memory at once"
    )
    result.rank_bytes = rank_bytes  # each rank's weights
    result.resident_bytes = resident  # the most of them in memory at once
    result.total_bytes = total
    return result


def _export_ranks(graph, plan, params, weights, directory, rank_bytes, resident, **kw):
    """Every rank in turn: lowered on the meta graph, its segments exported with their shards
    read just in time, and released before the next rank. Fills rank_bytes/resident; returns
    the split programs, the lowered programs and the files."""
    from meshweave.passes.parallel.lower.rank import lower_for_rank
    from meshweave.passes.parallel.lower.setup import analyse
    from meshweave.progress import step

    su = analyse(graph, plan)
    programs, lowered, files = {}, {}, []
    for r in range(plan.world_size):
        with step(f"rank {r} of {plan.world_size}: shards from {weights.describe()}"):
            program = lower_for_rank(graph, plan, r, setup=su)  # meta shards
            items = split_program(program, r)
            segs = [s for s in items if isinstance(s, Segment) and s.graph.outputs]
            specs = program.meta.get("shard_specs") or {}
            got, rank_bytes[r], resident[r] = _export_rank(
                segs, specs, params, weights, directory, **kw
            )
            files += got
        for s in items:  # release the rank's shards before the next rank
            if isinstance(s, Segment):
                s.graph.tensors = {}
        programs[r], lowered[r] = items, program
        del segs, items, program
        gc.collect()
    return programs, lowered, files


def _nbytes(p: Param) -> int:
    return math.prod(p.shape) * torch.empty((), dtype=p.dtype).element_size()
