"""`meshweave run`: run a zoo model under a parallel plan on local ranks (or under torchrun).

    meshweave run --model gpt-tiny --mesh 2x2 --plan dpxtp --train --steps 2 --check
    meshweave run --model llama-tiny --mesh 2 --pp 2 --plan ppxtp --micro-batches 2
    torchrun --nproc-per-node 4 -m meshweave run --model gpt-tiny --mesh dp=2,tp=2

`--mesh` is the mesh of one pipeline stage; the run uses mesh size x `--pp` ranks. Plan kinds:
  dp, tp        every device on that axis          pp       `--pp` stages (default: mesh size)
  dpxtp         a 2-d mesh "DPxTP"                  ppxtp    `--pp` stages of a TP mesh
  dpxpp         `--pp` stages of a DP mesh          auto     the searched plan (plan_parallel)
`--plan-file FILE` runs a saved Plan JSON instead (`meshweave plan ... --out FILE`), including
plans whose pipeline stages have meshes of different shapes.
Named meshes ("dp=2,tp=2") imply the grid; an "ep" axis ("ep=4", "dp=2,ep=2", "ep=2,tp=2") is
expert parallelism for the moe.experts nodes (strategies/moe_rules.py) and data parallelism for
the rest. Ranks run the planner's `lower_for_rank` programs
(`--lowering split`: the runtime's own data/pipeline split, no tensor parallelism).
`--check` reruns the model on one device and compares every output (with `--train`: the
losses and every parameter after the steps); it exits with status 1 on a mismatch.
`--quantize w4c [--method gptq] [--quant-skip NAMES]` (cli_quant.py's flags, inference only)
runs the quantized graph (`meshweave.compile(..., CompileOptions(quantize=...))`), its packed
weights sharded by the planner (strategies/quant_rules.py); `--check` then compares with the
model holding the dequantized weights on one device, which is what the graph computes.
"""

from __future__ import annotations

import math
import sys
import time

from meshweave.cli import CLIError, command

OUTPUT_TOL = 1e-4  # fp32: absolute, on outputs of magnitude ~1
PARAM_TOL = 1e-5


def _setup(p) -> None:
    from meshweave.cli_flags import add_planning_args

    p.add_argument("--model", default="gpt-tiny", help="zoo model name (default gpt-tiny)")
    add_planning_args(p)  # --mesh (a stage's mesh) or --plan-file; --train, --batch, --seq, ...
    p.add_argument("--pp", type=int, default=None, help="pipeline stages")
    p.add_argument(
        "--plan",
        default=None,
        choices=["auto", "dp", "tp", "pp", "dpxtp", "ppxtp", "dpxpp"],
        help="plan kind (default: from a named mesh, else auto)",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="the model's depth, when not the zoo config's (as `meshweave plan --num-layers`)",
    )
    p.add_argument("--steps", type=int, default=2, help="training steps (default 2)")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare with a single-device run; exit 1 on a mismatch",
    )
    p.add_argument(
        "--schedule",
        choices=["gpipe", "1f1b"],
        default=None,
        help="pipeline schedule (default: 1f1b in training, gpipe otherwise)",
    )
    p.add_argument("--zero", action="store_true", help="ZeRO-1 over the dp axis")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: gloo ranks (default); cuda: NCCL, one GPU per rank",
    )
    p.add_argument("--optim", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="learning rate (sgd 0.1, adam 1e-3)")
    p.add_argument(
        "--lowering",
        choices=["auto", "planner", "split"],
        default="auto",
        help="planner's lower_for_rank, or the runtime's own dp/pp split",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    from meshweave.cli_quant import add_quant_args

    add_quant_args(p)


def grid_from_args(mesh_text: str, pp: int | None, kind: str | None) -> tuple[str, int, int, int]:
    """(plan kind, dp, tp, pp) from --mesh/--pp/--plan."""
    from meshweave.ir.mesh import DeviceMesh

    try:
        mesh = DeviceMesh.parse(mesh_text)
    except ValueError as e:
        raise CLIError(str(e)) from None
    size = mesh.size
    if mesh.axis_names is not None:
        sizes = dict(zip(mesh.axis_names, mesh.shape))
        unknown = set(sizes) - {"dp", "ep", "tp", "pp"}
        if unknown:
            raise CLIError(f"--mesh: unknown axis names {sorted(unknown)}; use dp, ep, tp and pp")
        pp = pp or sizes.get("pp", 1)
        return kind or "fixed", sizes.get("dp", 1), sizes.get("tp", 1), pp
    kind = kind or "auto"
    two_d = mesh.shape if mesh.ndim == 2 else None
    if kind == "auto":
        return kind, size, 1, pp or 1
    if kind == "dp":
        return kind, size, 1, pp or 1
    if kind == "tp":
        return kind, 1, size, pp or 1
    if kind == "pp":
        if pp is not None and size not in (1, pp):
            raise CLIError(f"--plan pp: --mesh {mesh_text} and --pp {pp} disagree; give one")
        return kind, 1, 1, pp or size
    if kind == "dpxpp":
        if pp is not None:  # --mesh is the dp axis of each stage
            return kind, size, 1, pp
        if two_d is None:
            raise CLIError(f"--plan dpxpp needs --pp or a 2-d mesh DPxPP, got {mesh_text!r}")
        return kind, two_d[0], 1, two_d[1]
    if kind == "dpxtp":
        if two_d is None:
            raise CLIError(f"--plan dpxtp needs a 2-d mesh like 2x2, got {mesh_text!r}")
        return kind, two_d[0], two_d[1], pp or 1
    # ppxtp: "AxB" = A stages of B-way TP, or --pp stages of a mesh-size TP
    if pp is None and two_d is not None:
        return kind, 1, two_d[1], two_d[0]
    return kind, 1, size, pp or 2


def ep_from_mesh(mesh_text: str, kind: str) -> int | None:
    """The size of a named mesh's "ep" axis (expert parallelism), or None without one."""
    from meshweave.ir.mesh import DeviceMesh

    mesh = DeviceMesh.parse(mesh_text)
    if mesh.axis_names is None or "ep" not in mesh.axis_names:
        return None
    if kind != "fixed":
        raise CLIError(f"--mesh {mesh_text}: an ep axis takes the fixed layout of its named "
                       f"mesh; drop --plan {kind}")
    return mesh.axis_size("ep")


@command("run", "run a zoo model on local ranks under a parallel plan; --check vs one device")(
    _setup
)
def _run(args) -> int:
    from meshweave.runtime.distributed.launch import under_torchrun
    from meshweave.runtime.distributed.optim import OptimConfig
    from meshweave.cli_flags import parse_mesh, resolve_planning
    from meshweave.runtime.distributed.runner import RunSpec

    kind = grid = ep = None
    if args.plan_file is not None:
        for flag, given in (("--pp", args.pp is not None), ("--plan", args.plan is not None),
                            ("--zero", args.zero)):
            if given:
                raise CLIError(f"{flag}: `meshweave run --plan-file` takes it from the plan")
    elif args.mesh is not None:
        parse_mesh(args.mesh)  # a bad --mesh is one line naming it
        kind, dp, tp, pp = grid_from_args(args.mesh, args.pp, args.plan)
        ep = ep_from_mesh(args.mesh, kind)
        grid = None if kind == "auto" else (dp * (ep or 1), pp)
    cannot = {"--memory-gib": "it does not search under a budget: `meshweave plan --memory-gib "
                              "G --out FILE`, then `meshweave run --plan-file FILE`"}
    if kind not in (None, "auto"):
        cannot["--spec"] = f"--plan {kind} is a fixed layout; only --plan auto is costed"
    resolve_planning(args, "run", needs="mesh|plan-file", unsupported=cannot,
                     search=kind == "auto", grid=grid)
    if args.plan_file is not None:
        kind, dp, tp, pp = "file", 1, 1, args.plan_value.world_size
    lr = args.lr if args.lr is not None else (0.1 if args.optim == "sgd" else 1e-3)
    spec = RunSpec(
        args.model,
        plan=kind,
        dp=dp,
        tp=tp,
        pp=pp,
        devices=dp * (ep or 1) * tp * pp,
        ep=ep,
        micro_batches=args.micro_batches,
        schedule=args.schedule or ("1f1b" if args.train else "gpipe"),
        zero=args.zero,
        training=args.train,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        optim=OptimConfig(args.optim, lr=lr),
        lowering=args.lowering,
        timeout_s=args.timeout,
        device=args.device,
        plan_file=args.plan_file,
        layers=args.num_layers,
        hardware=args.spec,
        **_quant_fields(args),
    )
    if under_torchrun():
        return _run_torchrun(spec, args.check)
    return _run_local(spec, args.check)


def _quant_fields(args) -> dict:
    """RunSpec's quantize/calibration from --quantize/--method/--quant-skip (cli_quant.py)."""
    from meshweave.cli_quant import quant_compile_options

    if args.quantize is not None and args.train:
        raise CLIError("--quantize is weight-only quantization for inference; drop --train")
    inputs, vocab = (), None
    if args.quantize is not None and args.method == "gptq":  # calibration shaped like the inputs
        from meshweave.models import UnknownModelError, build_model, get_model_spec

        try:
            inputs = build_model(args.model, batch=args.batch, seq=args.seq)[1]
        except UnknownModelError as e:
            raise CLIError(str(e)) from None
        vocab = getattr(get_model_spec(args.model).config, "vocab_size", None)
    options, notes = quant_compile_options(args, tuple(inputs), vocab)
    for line in notes:
        print(line)
    if not options:
        return {}
    cal = options.get("calibration")
    return {"quantize": options["quantize"], "calibration": tuple(cal) if cal else None}


def _prepare(spec):
    from meshweave.models import UnknownModelError
    from meshweave.progress import step
    from meshweave.runtime.distributed.runner import prepare

    from meshweave.cli_quant import quantization_hint
    from meshweave.passes.quant import QuantizationError

    try:
        with step(f"tracing and planning {spec.model}"):
            return prepare(spec)
    except UnknownModelError as e:
        raise CLIError(str(e)) from None
    except QuantizationError as e:
        raise CLIError(quantization_hint(e, spec.quantize.tag)) from None


def _run_local(spec, check: bool) -> int:
    from meshweave.runtime.distributed.runner import check_devices, run_distributed

    check_devices(spec, spec.world_size)  # before tracing: fail in a second, not a minute
    if spec.device == "cpu":  # the local ranks share this machine's memory: all the weights
        from meshweave.cli import preflight_execution

        preflight_execution(spec.model, spec.batch, spec.seq, spec.layers,
                            training=spec.training, command="run")
    job = _prepare(spec)
    print(_plan_line(job))
    t0 = time.perf_counter()
    got = run_distributed(job)
    print(f"ran on {job.plan.world_size} local ranks in {time.perf_counter() - t0:.2f} s")
    return _report(job, got, check)


def _run_torchrun(spec, check: bool) -> int:
    """Rank 0 traces, plans and writes the weights; every rank loads only its shards."""
    from meshweave.runtime.distributed.launch import launch
    from meshweave.runtime.distributed.runner import collect, run_torchrun_rank

    [(job, results)] = launch(
        run_torchrun_rank,
        spec.world_size,
        (spec, _prepare),
        spec.timeout_s,
        backend=spec.backend,
    )
    if job is None:  # not rank 0
        return 0
    print(_plan_line(job))
    return _report(job, collect(job, results), check)


def _plan_line(job) -> str:
    p = job.plan
    return (
        f"plan ({job.spec.plan}, lowering {job.lowering}): {p.num_stages} stage(s) x "
        f"{p.meshes_text()} "
        f"({', '.join(p.mesh.names)}) = {p.world_size} "
        f"ranks, {p.micro_batches} micro-batch(es), {p.schedule}, "
        f"ZeRO-1 {'on' if p.zero else 'off'}"
    )


def _report(job, got, check: bool) -> int:
    from meshweave.runtime.distributed.runner import compare, run_single_device

    for i, loss in enumerate(got.losses):
        print(f"step {i + 1}: loss {loss:.6f}")
    if got.outputs is not None:
        print("outputs: " + ", ".join(f"{tuple(o.shape)}" for o in got.outputs))
    if not check:
        return 0
    errs = compare(run_single_device(job), got)
    bad = []
    for key, tol in (("outputs", OUTPUT_TOL), ("loss", OUTPUT_TOL), ("params", PARAM_TOL)):
        if key in errs:
            err = errs[key]
            worst = f" ({errs['worst_param']})" if key == "params" else ""
            print(f"max |distributed - single device| {key}: {err:.3e}{worst}")
            if not err <= tol or math.isnan(err):
                bad.append(key)
    if bad:
        print(f"check FAILED: {', '.join(bad)} beyond tolerance", file=sys.stderr)
        return 1
    print("check passed")
    return 0
