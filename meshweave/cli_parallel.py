"""CLI commands of the parallel planner: `plan` and `calibrate`, and the `plan` / `rank:N` dumps.

    meshweave plan --model pangu-alpha-200b --mesh 2048 --spec ascend910 --batch 1536 \\
        --seq 1024 --train [--json]
    meshweave plan --model llama-70b --mesh 8x8 --spec h100 --batch 512 --seq 2048 --train
    meshweave calibrate --out my_gpu.json [--comm]
    meshweave dump --model gpt-tiny --what plan [--mesh 4 | --mesh 2x2 | --mesh dp=2,tp=2]
    meshweave dump --model gpt-tiny --what rank:1 --mesh tp=2

`plan` builds the model on the meta device (no weight memory). Models deeper than
`--layers` (default 2 repeated layers) are traced with that many and the planner scales the
repeated layer's costs to the real depth (clustering: every layer of the block is identical),
which the output says. meshweave/cli.py imports this module, which registers the commands.
"""

from __future__ import annotations

import json
import os
import time

from meshweave.cli import CLIError, command, dumper


# ------------------------------------------------------------------------------------ plan
def _setup_plan(p) -> None:
    p.add_argument("--model", required=True, help="zoo model name (`meshweave models`)")
    p.add_argument(
        "--mesh",
        required=True,
        help="device count ('2048': the planner picks pp x dp x tp) or a fixed mesh ('8x8')",
    )
    p.add_argument(
        "--spec",
        default="h100",
        help="hardware preset (h100, h200, a100, ascend910, cpu) or a spec JSON path",
    )
    p.add_argument("--batch", type=int, default=8, help="global batch per step (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--train", action="store_true", help="plan a training step (default: inference)")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="parameter/compute dtype (default float16: mixed precision)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=2,
        help="repeated layers to trace; the real depth is planned from them "
        "(default 2; 0 traces the full model)",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="the model's depth, when not the zoo config's (as `meshweave run --num-layers`)",
    )
    p.add_argument("--max-stages", type=int, default=None, help="cap on pipeline stages")
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="VALUE=P0,P1",
        help="fix a value's placement per stage-mesh axis, e.g. "
        "p_lm_head_weight=S(0),R (repeatable)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=20.0,
        help="search seconds before the planner stops refining (default 20)",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="memory per device a plan may use, in GiB (default: the spec's usable memory); "
        "below the replicated footprint the planner must shard, pipeline or recompute",
    )
    p.add_argument("--json", action="store_true", help="print the Plan as JSON")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the Plan JSON here")


def _parse_mesh(text: str):
    from meshweave.ir.mesh import DeviceMesh

    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise CLIError(f"--mesh {text}: need at least one device")
        return int(text)
    try:
        return DeviceMesh.parse(text)
    except ValueError as e:
        raise CLIError(f"--mesh {text!r}: {e}") from None


def _parse_pins(items: list[str]) -> dict[str, tuple[str, ...]]:
    from meshweave.ir.sharding import parse_placement

    pins = {}
    for item in items:
        name, sep, rest = item.partition("=")
        parts = _split_placements(rest)
        if not sep or not name or not parts:
            raise CLIError(f"--pin {item!r}: expected VALUE=P0,P1 (e.g. p_w=S(0),R)")
        try:
            for x in parts:
                parse_placement(x)
        except ValueError as e:
            raise CLIError(f"--pin {item!r}: {e}") from None
        pins[name.lstrip("%")] = tuple(parts)
    return pins


def _split_placements(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def trace_for_planning(
    model: str, batch: int, seq: int, dtype: str, layers: int, num_layers: int | None = None
):
    """(graph, real repeated-layer count or None, note) of a meta-device build of `model`
    (with `num_layers` layers instead of its config's, when given)."""
    import dataclasses

    import torch

    import meshweave
    from meshweave.models import UnknownModelError, get_model_spec, get_model_spec_with_layers

    try:
        spec = get_model_spec_with_layers(model, num_layers)
    except (UnknownModelError, ValueError) as e:
        raise CLIError(str(e)) from None
    cfg = spec.config
    repeats, note = None, ""
    n = getattr(cfg, "num_layers", None)
    extra = 1 if getattr(cfg, "top_query_layer", False) else 0
    if layers and isinstance(n, int) and n - extra > layers:
        repeats = n - extra
        spec = get_model_spec(model, num_layers=layers + extra)
        note = (
            f"traced {layers} of {repeats} repeated layers; their costs are scaled to "
            f"{repeats} (clustering: identical layers share one solution)"
        )
    elif dataclasses.is_dataclass(cfg) and n is None and layers:
        note = "traced the full model"
    tdtype = getattr(torch, dtype)
    try:
        m = spec.build(device="meta", dtype=tdtype)
        inputs = spec.example_inputs(batch=min(batch, 2), seq=seq, device="meta")
    except (ValueError, ImportError) as e:
        raise CLIError(f"cannot build {model}: {e}") from None
    graph = meshweave.compile(m, inputs).graph
    if repeats:
        graph.meta["repeated_layers"] = repeats
    return graph, repeats, note


@command("plan", "find a parallel plan (pp x dp x tp, sharding, micro-batches) for a zoo model")(
    _setup_plan
)
def _plan(args) -> int:
    from meshweave.passes.parallel.cost.hardware import get_spec
    from meshweave.passes.parallel.search.search import plan_parallel

    try:
        spec = get_spec(args.spec)
    except ValueError as e:
        raise CLIError(str(e)) from None
    mesh = _parse_mesh(args.mesh)
    pins = _parse_pins(args.pin)
    if args.batch < 1 or args.seq < 1:
        raise CLIError("--batch and --seq must be positive")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise CLIError(f"--memory-gib {args.memory_gib}: must be positive")
    budget = args.memory_gib * 2**30 if args.memory_gib is not None else None
    t0 = time.perf_counter()
    graph, repeats, note = trace_for_planning(
        args.model, args.batch, args.seq, args.dtype, args.layers, args.num_layers
    )
    t_trace = time.perf_counter() - t0
    plan = plan_parallel(
        graph,
        mesh,
        spec,
        batch=args.batch,
        training=args.train,
        pins=pins,
        max_stages=args.max_stages,
        repeats=repeats,
        time_budget=args.time_budget,
        memory_budget=budget,
    )
    plan.search["trace_seconds"] = t_trace
    plan.search["model"] = args.model
    if note:
        plan.search["note"] = note
    text = plan.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.json else plan_report(plan))
    return 0


def plan_report(plan) -> str:
    s = plan.search
    lines = [plan.summary()]
    grid = s.get("grid_best")
    total = plan.estimate.get("total")
    ratio = f", {total / grid:.3f}x of it" if grid and total else ""
    lines.append(
        f"  search {s.get('seconds', 0):.2f} s (trace {s.get('trace_seconds', 0):.2f} "
        f"s), winner: {s.get('solver')}; best Megatron grid "
        f"{s.get('grid_best_config')}: {grid if grid is None else f'{grid:.4f} s'}"
        f"{ratio}"
    )
    lines.append(f"  stages (layers): {s.get('pipeline_layers')}")
    if s.get("submesh_round"):
        lines.append(f"  stage sub-mesh round: {s['submesh_round']} "
                     f"({s.get('submesh_seconds', 0):.2f} s)")
    if not plan.uniform:
        lines += [
            f"  stage {st.index}: mesh {'x'.join(map(str, plan.stage_mesh(st.index).shape))}, "
            f"ranks {_ranges(st.ranks)}, layers {st.layers}"
            for st in plan.stages
        ]
    if s.get("note"):
        lines.append(f"  note: {s['note']}")
    return "\n".join(lines)


def _ranges(ranks) -> str:
    """[0, 1, 2, 3, 8, 9] -> "0-3, 8-9"."""
    out: list[list[int]] = []
    for r in ranks:
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in out)


# ------------------------------------------------------------------------------- calibrate
def _setup_calibrate(p) -> None:
    p.add_argument("--out", required=True, metavar="FILE", help="spec JSON to write")
    p.add_argument(
        "--base",
        default=None,
        help="preset for what is not measured (links between nodes, devices per "
        "node); default h100 on CUDA, cpu otherwise",
    )
    p.add_argument("--size", type=int, default=1024, help="matmul size (default 1024)")
    p.add_argument(
        "--comm",
        action="store_true",
        help="also time a 2-process gloo all-reduce on this host (slower)",
    )


@command(
    "calibrate",
    "measure this device (matmul FLOP/s, memory) and write a hardware spec JSON for --spec",
)(_setup_calibrate)
def _calibrate(args) -> int:
    from meshweave.passes.parallel.cost.calibrate import calibrate

    if args.size < 16:
        raise CLIError("--size must be at least 16")
    try:
        spec, report = calibrate(args.base, args.size, args.comm)
    except ValueError as e:
        raise CLIError(str(e)) from None
    from meshweave.passes.parallel.cost.hardware import save_spec

    d = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(d):
        raise CLIError(f"--out {args.out}: directory {d} does not exist")
    save_spec(spec, args.out)
    print(report)
    print(f"wrote {args.out} (use: meshweave plan --spec {args.out} ...)")
    return 0


# ----------------------------------------------------------------------------------- dumps
def load_plan_file(path: str):
    """A Plan from its JSON file, or a one-line CLIError saying what is wrong with it."""
    from meshweave.passes.parallel.plan import Plan

    try:
        with open(path) as f:
            return Plan.from_json(f.read())
    except OSError as e:
        raise CLIError(f"--plan-file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--plan-file {path}: not a meshweave Plan JSON ({e})") from None


def _dump_plan_for(args):
    from meshweave.cli import compile_zoo_model

    _, _, cm = compile_zoo_model(args, device="auto")  # plans need shapes, not weights
    if getattr(args, "plan_file", None):
        return cm.graph, load_plan_file(args.plan_file)
    text = getattr(args, "mesh", None) or "4"
    from meshweave.ir.mesh import DeviceMesh

    try:
        if text.strip().isdigit():
            mesh = int(text)
        else:
            mesh = DeviceMesh.parse(text)
    except ValueError as e:
        raise CLIError(f"--mesh {text!r}: {e}") from None
    names = getattr(mesh, "axis_names", None)
    if names is not None and set(names) <= {"dp", "tp", "pp"}:
        from meshweave.passes.parallel.search.megatron_grid import megatron_plan

        size = {n: mesh.axis_size(n) for n in names}
        return cm.graph, megatron_plan(
            cm.graph, size.get("dp", 1), size.get("tp", 1), size.get("pp", 1), batch=args.batch
        )
    from meshweave.passes.parallel.search.search import plan_parallel

    return cm.graph, plan_parallel(cm.graph, mesh, "h100", batch=args.batch)


@dumper("plan")
def _dump_plan(args) -> str:
    graph, plan = _dump_plan_for(args)
    lines = [
        plan_report(plan),
        "",
        "placements (value: per mesh axis " + ",".join(plan.mesh.names) + "; stage):",
    ]
    stage_of = {name: st.index for st in plan.stages for name in st.nodes}
    for v in graph.all_values():
        pl = plan.placements.get(v.name)
        if pl is None:
            continue
        where = stage_of.get(v.producer.outputs[0].name, "-") if v.producer else "in"
        op = v.producer.op if v.producer else v.kind
        lines.append(f"  %{v.name:28s} {'{' + ', '.join(pl) + '}':16s} stage {where}  {op}")
    return "\n".join(lines)


@dumper("rank")
def _dump_rank(args) -> str:
    from meshweave.passes.parallel.lower.rank import lower_for_rank

    _, _, num = args.what.partition(":")
    if not num.isdigit():
        raise CLIError(f"--what {args.what!r}: expected rank:N")
    graph, plan = _dump_plan_for(args)
    rank = int(num)
    if rank >= plan.world_size:
        raise CLIError(f"--what rank:{rank}: the plan has {plan.world_size} ranks")
    lowered = lower_for_rank(graph, plan, rank)
    specs = json.dumps({k: v for k, v in lowered.meta["shard_specs"].items() if v})
    return str(lowered) + f"# shard_specs {specs}\n"
