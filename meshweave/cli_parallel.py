"""CLI commands of the parallel planner: `plan` and `calibrate`, and the `plan` / `rank:N` dumps.

    meshweave plan --model pangu-alpha-200b --mesh 2048 --spec ascend910 --batch 1536 \\
        --seq 1024 --train [--json]
    meshweave plan --model llama-70b --mesh 8x8 --spec h100 --batch 512 --seq 2048 --train
    meshweave calibrate --out my_gpu.json [--comm]
    meshweave dump --model gpt-tiny --what plan --mesh 4    # or 2x2, dp=2,tp=2, --plan-file F
    meshweave dump --model gpt-tiny --what rank:1 --mesh tp=2

The planning flags (--mesh, --spec, --train, --batch, --seq, --dtype, --memory-gib, ...) are
cli_flags.py's, the same on plan, report, run, export and dump; `plan` searches every mesh
it is given (a count or a shape, named or not) and chooses the micro-batches itself.

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
from meshweave.cli_flags import load_plan_file


# ------------------------------------------------------------------------------------ plan
def _setup_plan(p) -> None:
    from meshweave.cli_flags import add_planning_args

    p.add_argument("--model", required=True, help="zoo model name (`meshweave models`)")
    add_planning_args(p)  # --mesh (required here), --spec, --batch, --seq, --train, ...
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
    p.add_argument("--json", action="store_true", help="print the Plan as JSON")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the Plan JSON here")


def _parse_mesh(text: str):
    """--mesh: a device count or a DeviceMesh (cli_flags.parse_mesh; benchmarks import it)."""
    from meshweave.cli_flags import parse_mesh

    return parse_mesh(text)


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
    from meshweave.cli_flags import resolve_planning
    from meshweave.passes.parallel.cost.hardware import get_spec
    from meshweave.passes.parallel.search.search import plan_parallel

    resolve_planning(args, "plan", needs="mesh", search=True, unsupported={
        "--plan-file": "plan writes a plan (--out FILE); report, run, export and dump read it"})
    spec = get_spec(args.spec)
    mesh = args.mesh_value
    pins = _parse_pins(args.pin)
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
    plan.search["trace_layers"] = args.layers  # graph_for_plan traces the same way again
    plan.search["seq"] = args.seq
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
def plan_for_mesh(
    graph,
    mesh_text: str,
    *,
    micro_batches: int = 1,
    training: bool = False,
    batch: int = 2,
    hardware: str = "h100",
    memory_budget: float | None = None,
):
    """A Plan for `graph` on the mesh `mesh_text`: a device count ('64') or a mesh whose axes
    are not all dp/tp/pp goes to the planner's search (as `meshweave plan --mesh 64`), a mesh
    named by dp/tp/pp ('tp=2', 'dp=2,tp=2,pp=2') gets that Megatron layout (api.plan_for)."""
    from meshweave.cli_flags import parse_mesh

    mesh = parse_mesh(mesh_text)
    try:
        from meshweave.api import plan_for

        return plan_for(graph, mesh, micro_batches=micro_batches, training=training,
                        batch=batch, hardware=hardware, memory_budget=memory_budget)
    except ImportError as e:
        raise CLIError(f"parallel planning is not available in this build ({e})") from None


def plan_from_args(graph, args):
    """The Plan of the resolved planning flags (cli_flags.resolve_planning): --plan-file's,
    or one made for --mesh; None without either."""
    if getattr(args, "plan_value", None) is not None:
        return args.plan_value
    if getattr(args, "mesh", None) is None:
        return None
    gib = getattr(args, "memory_gib", None)
    return plan_for_mesh(graph, args.mesh, micro_batches=args.micro_batches,
                         training=args.train, batch=args.batch, hardware=args.spec,
                         memory_budget=gib * 2**30 if gib is not None else None)


def forward_args(args):
    """`args` with --train off: the commands that plan a training step trace its forward
    (the planner costs the backward itself)."""
    import argparse

    return argparse.Namespace(**{**vars(args), "train": False})


def graph_for_plan(args, plan):
    """The graph whose value names a Plan JSON's placements refer to, traced on the meta
    device. A plan of `meshweave plan` (its search has trace_seconds) was made on
    trace_for_planning's trace: a few repeated layers at the plan's dtype (float16 adds casts,
    hence other names), which is traced again. Any other plan goes with --model's own trace
    (device="auto"). A plan of another model, or placements that name no value of the
    graph, are a one-line error."""
    from meshweave.cli import compile_zoo_model

    s = plan.search if isinstance(plan.search, dict) else {}
    where = f"--plan-file {getattr(args, 'plan_file', None)}"
    if "trace_seconds" in s:
        if s.get("model") and s["model"] != args.model:
            raise CLIError(f"{where} is a plan of {s['model']}, not of --model {args.model}")
        layers = s.get("trace_layers", s.get("traced_layers", 0) if s.get("reduced_trace")
                       else 0)
        seq = s.get("seq") or args.seq  # constant folding differs with the length: names too
        graph, _, note = trace_for_planning(args.model, s.get("batch") or args.batch, seq,
                                            s.get("dtype", "float16"), layers,
                                            getattr(args, "num_layers", None))
        if note:
            graph.meta["trace_note"] = note
    else:
        graph = compile_zoo_model(args, device="auto")[2].graph
    names = {v.name for v in graph.all_values()}
    missing = [k for k in plan.placements if k not in names]
    if missing:
        raise CLIError(f"{where}: {len(missing)} of its placements ({', '.join(missing[:3])}"
                       f"{', ...' if len(missing) > 3 else ''}) name no value of "
                       f"{args.model}'s trace: make the plan again for this model, "
                       f"`meshweave plan --model {args.model} --mesh N --out FILE` (or give "
                       f"the --seq it was made at)")
    return graph


def planning_graph(args, layers: int = 2):
    """--model's graph for planning a fixed mesh without weights. A model over
    META_ABOVE_BYTES is traced as `meshweave plan` traces it: `layers` repeated layers on the
    meta device, which the planner costs at the real depth (graph.meta["repeated_layers"];
    llama-70b in a few seconds rather than a minute for all 80); a smaller one is
    compile_zoo_model(args, device="auto")'s full trace."""
    from meshweave.cli import META_ABOVE_BYTES, _weight_bytes, compile_zoo_model

    if _weight_bytes(args) <= META_ABOVE_BYTES:
        return compile_zoo_model(args, device="auto")[2].graph
    graph, _, note = trace_for_planning(args.model, args.batch, args.seq,
                                        getattr(args, "dtype", None) or "float32", layers,
                                        getattr(args, "num_layers", None))
    if note:
        graph.meta["trace_note"] = note
    return graph


def _dump_plan_for(args):
    from meshweave.cli import compile_zoo_model


    if getattr(args, "plan_file", None):
        plan = load_plan_file(args.plan_file)
        return graph_for_plan(forward_args(args), plan), plan
    # plans need shapes, not weights; a training plan costs the backward of the forward trace
    _, _, cm = compile_zoo_model(forward_args(args), device="auto")
    return cm.graph, plan_from_args(cm.graph, args)  # --mesh, as report and export plan it


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
    note = graph.meta.get("trace_note")
    head = (f"# as the plan file was made: {note.split(';')[0]}; the other repeated layers' "
            f"programs are alike\n" if note else "")
    return head + str(lowered) + f"# shard_specs {specs}\n"
