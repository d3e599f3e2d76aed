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
the rest.

The command is a thin layer over the Python API, the same script a user runs under torchrun:
`meshweave.compile(model, inputs, options=CompileOptions(mesh=..., training=...))` (or
`plan=` the --plan-file), then on every rank a torch optimizer on `cm.parameters()` (with
`--zero`, `cm.zero_optimizer`), a cross-entropy on the full outputs against the next tokens,
`loss.backward()` and `cm.state_dict()`. Locally the parent compiles once and forks the ranks,
which inherit the compiled model (each rank compiles its own where fork is unsafe: CUDA, or a
torch whose autograd breaks under fork); under torchrun every process compiles, and rank 0's
plan is the one all run (runtime/distributed/module.py).
`--check` reruns the model on one device and compares every output (with `--train`: the
losses and every parameter after the steps); it exits with status 1 on a mismatch.
`--quantize w4c [--method gptq] [--quant-skip NAMES]` (cli_quant.py's flags, inference only)
runs the quantized graph (`meshweave.compile(..., CompileOptions(quantize=...))`), its packed
weights sharded by the planner (strategies/quant_rules.py); `--check` then compares with the
model holding the dequantized weights on one device, which is what the graph computes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Any

from meshweave.cli import CLIError, command

OUTPUT_TOL = 1e-4  # fp32: absolute, on outputs of magnitude ~1
# Adam divides by the gradient's own scale, so a gradient that is zero in exact arithmetic (an
# attention key bias: softmax ignores a per-row shift; ~5e-11 in fp32) steps by lr x rounding
# noise: two steps at lr 1e-3 differ by ~1e-5 between any two summation orders
PARAM_TOL = 3e-5


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
    p.add_argument("--zero", action="store_true",
                   help="ZeRO-1 over the dp axis (cm.zero_optimizer: torch's "
                        "ZeroRedundancyOptimizer)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: gloo ranks (default); cuda: NCCL, one GPU per rank",
    )
    p.add_argument("--memory-budget", default=None, metavar="B",
                   help="with --train: each rank's rematerialization budget, a fraction of its "
                        "saved activation bytes (0.5) or a size (64MiB); default: the plan "
                        "stage's (StagePlan.memory_budget), else save everything")
    p.add_argument("--optim", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="learning rate (sgd 0.1, adam 1e-3)")
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every rank compiles and runs (picklable: spawned ranks get it)."""

    model: str
    kind: str  # the plan kind (dp, tp, ..., fixed for a named mesh, auto, file)
    mesh: Any  # CompileOptions.mesh: a named DeviceMesh, a device count (auto), or None
    plan: Any  # CompileOptions.plan: the --plan-file's Plan, or None
    training: bool
    steps: int
    batch: int
    seq: int
    layers: int | None
    micro_batches: int
    hardware: str | None
    optim: Any  # runtime.distributed.optim.OptimConfig
    zero: bool
    device: str
    timeout_s: float
    quantize: Any = None
    calibration: tuple | None = None
    memory_budget: Any = None  # CompileOptions.memory_budget: each rank's remat budget
    check: bool = False  # --check: each rank also measures its step's memory

    @property
    def world_size(self) -> int:
        return self.plan.world_size if self.plan is not None else (
            self.mesh if isinstance(self.mesh, int) else self.mesh.size)


@command("run", "run a zoo model on local ranks under a parallel plan; --check vs one device")(
    _setup
)
def _run(args) -> int:
    from meshweave.runtime.distributed.launch import under_torchrun
    from meshweave.runtime.distributed.optim import OptimConfig
    from meshweave.cli_flags import parse_mesh, resolve_planning

    kind = grid = ep = None
    if args.plan_file is not None:
        for flag, given in (("--pp", args.pp is not None), ("--plan", args.plan is not None)):
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
    if args.zero and not args.train:
        raise CLIError("--zero shards the optimizer state: it needs --train")
    if args.plan_file is not None:
        kind, mesh = "file", None
    elif kind == "auto":
        mesh = dp * pp
    else:
        mesh = megatron_mesh(dp, ep, tp, pp)
    lr = args.lr if args.lr is not None else (0.1 if args.optim == "sgd" else 1e-3)
    cfg = RunConfig(args.model, kind, mesh, args.plan_value, args.train, args.steps, args.batch,
                    args.seq, args.num_layers, args.micro_batches, args.spec,
                    OptimConfig(args.optim, lr=lr), args.zero, args.device, args.timeout,
                    **_quant_fields(args), memory_budget=_memory_budget(args),
                    check=args.check)
    return _run_torchrun(cfg, args.check) if under_torchrun() else _run_local(cfg, args.check)


def _memory_budget(args):
    """--memory-budget as CompileOptions takes it: a fraction, or a size string."""
    from meshweave.passes.remat.budget import MemoryBudget, RematError

    if args.memory_budget is None:
        return None
    if not args.train:
        raise CLIError("--memory-budget chooses what the backward recomputes: it needs --train")
    try:
        value = float(args.memory_budget)
    except ValueError:
        value = args.memory_budget
    try:
        MemoryBudget.parse(value)
    except RematError as e:
        raise CLIError(str(e).replace("memory_budget=", "--memory-budget ")) from None
    return value


def megatron_mesh(dp: int, ep: int | None, tp: int, pp: int):
    """The named DeviceMesh of a fixed layout (CompileOptions.mesh: api.plan_for's grid)."""
    from meshweave.ir.mesh import DeviceMesh

    axes = [(n, k) for n, k in (("dp", dp), ("ep", ep), ("tp", tp), ("pp", pp)) if k]
    axes = [(n, k) for n, k in axes if k > 1] or [("dp", 1)]
    return DeviceMesh(tuple(k for _, k in axes), tuple(n for n, _ in axes))


def _quant_fields(args) -> dict:
    """RunConfig's quantize/calibration from --quantize/--method/--quant-skip (cli_quant.py)."""
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


# ------------------------------------------------------------------------ compiling
def compile_for(cfg: RunConfig, device: str = "cpu"):
    """(model as built, inputs, compiled model): the zoo model at the run's batch, compiled
    with the run's mesh or plan. The model is a copy of the built one: the compiled model's
    training updates the tensors it was traced with."""
    import meshweave
    import torch
    from meshweave.models import build_model, get_model_spec_with_layers

    try:
        get_model_spec_with_layers(cfg.model, cfg.layers)
    except ValueError as e:
        raise CLIError(str(e)) from None
    overrides = {} if cfg.layers is None else {"num_layers": cfg.layers}
    model, inputs = build_model(cfg.model, device=device, batch=cfg.batch, seq=cfg.seq,
                                **overrides)
    original = copy.deepcopy(model)
    options = meshweave.CompileOptions(
        mesh=cfg.mesh, plan=cfg.plan, training=cfg.training, micro_batches=cfg.micro_batches,
        hardware=cfg.hardware, quantize=cfg.quantize, memory_budget=cfg.memory_budget,
        calibration=list(cfg.calibration) if cfg.calibration else None)
    with torch.set_grad_enabled(cfg.training):
        cm = meshweave.compile(model, tuple(inputs), options=options)
    return original, tuple(inputs), cm


def _compile_here(cfg: RunConfig):
    from meshweave.models import UnknownModelError
    from meshweave.progress import step

    from meshweave.cli_quant import quantization_hint
    from meshweave.passes.quant import QuantizationError

    try:
        with step(f"tracing and planning {cfg.model}"):
            return compile_for(cfg)
    except UnknownModelError as e:
        raise CLIError(str(e)) from None
    except QuantizationError as e:
        raise CLIError(quantization_hint(e, cfg.quantize.tag)) from None


# ------------------------------------------------------------------------ each rank
def rank_main(rank: int, world_size: int, cfg: RunConfig, compiled=None) -> dict:
    """One rank: the user's training (or inference) loop over the compiled model. `compiled`
    is the parent's (inputs, cm) when the rank was forked from it; otherwise it compiles."""
    import torch
    from meshweave.runtime.distributed.runner import (
        next_token_labels, rank_device, step_loss, tensor_leaves)

    if compiled is None:
        device = rank_device(cfg.device, rank)
        if device != "cpu":
            torch.cuda.set_device(device)
        _, inputs, cm = compile_for(cfg, device)
    else:
        inputs, cm = compiled
    out: dict[str, Any] = {"rank": rank, "seconds": []}
    if not cfg.training:
        with torch.no_grad():
            t0 = time.perf_counter()
            outputs = tensor_leaves(cm(*inputs))
            out["seconds"].append(time.perf_counter() - t0)
        out["outputs"] = [o.cpu() for o in outputs] if rank == 0 else None
        return out
    labels = next_token_labels(inputs[0])  # the last position predicts token 0
    cls, kwargs = cfg.optim.torch_args()
    opt = cm.zero_optimizer(cls, **kwargs) if cfg.zero else cls(cm.parameters(), **kwargs)
    losses = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        loss = step_loss(tensor_leaves(cm(*inputs))[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        out["seconds"].append(time.perf_counter() - t0)
    state = cm.state_dict()  # a collective: every rank calls it
    local = opt.optim if cfg.zero else opt  # ZeroRedundancyOptimizer's own partition
    out["optim_state_numel"] = sum(t.numel() for st in local.state.values()
                                   for t in st.values() if torch.is_tensor(t) and t.dim())
    out["param_numel"] = sum(p.numel() for p in cm.parameters())
    out["backward_kind"] = cm.backward_kind
    if cfg.check:  # every rank measures its own step (a collective)
        from meshweave.ir.errors import MeshweaveError

        try:
            out["memory"] = cm.memory_stats(*inputs)
        except MeshweaveError as e:
            out["memory"] = str(e)
    if rank == 0:
        out["losses"], out["params"] = losses, {k: v.cpu() for k, v in state.items()}
    return out


def _run_local(cfg: RunConfig, check: bool) -> int:
    from meshweave.runtime.distributed.launch import _default_start_method, launch
    from meshweave.runtime.distributed.runner import check_devices

    check_devices(cfg, cfg.world_size)  # before tracing: fail in a second, not a minute
    if cfg.device == "cpu":  # the local ranks share this machine's memory: all the weights
        from meshweave.cli import preflight_execution

        preflight_execution(cfg.model, cfg.batch, cfg.seq, cfg.layers,
                            training=cfg.training, command="run")
    model, inputs, cm = _compile_here(cfg)
    print(_plan_line(cfg, cm.plan))
    fork = cfg.device == "cpu" and _default_start_method() == "fork"
    t0 = time.perf_counter()
    results = launch(rank_main, cm.plan.world_size, (cfg, (inputs, cm) if fork else None),
                     cfg.timeout_s, backend=_backend(cfg),
                     start_method=None if fork else "spawn")
    print(f"ran on {cm.plan.world_size} local ranks in {time.perf_counter() - t0:.2f} s")
    return _report(cfg, model, inputs, cm, results, check)


def _run_torchrun(cfg: RunConfig, check: bool) -> int:
    """Every process compiles (rank 0's plan is the one all run) and runs its rank."""
    from meshweave.runtime.distributed.launch import launch

    model, inputs, cm = _compile_here(cfg)
    [mine] = launch(rank_main, cm.plan.world_size, (cfg, (inputs, cm)), cfg.timeout_s,
                    backend=_backend(cfg))
    if mine["rank"] != 0:
        return 0
    print(_plan_line(cfg, cm.plan))
    return _report(cfg, model, inputs, cm, [mine], check)


def _backend(cfg: RunConfig) -> str:
    return "nccl" if cfg.device == "cuda" else "gloo"


def memory_line(rank: int, m) -> str:
    """A rank's step memory, estimated beside measured (cm.memory_stats under a mesh)."""
    if isinstance(m, str):
        return f"rank {rank} memory: not measured ({m})"

    def kib(n):
        return "?" if n is None else f"{n / 1024:.1f} KiB"

    ratio = (f" ({m['peak_bytes_measured'] / m['peak_bytes_estimated']:.2f}x)"
             if m["peak_bytes_measured"] and m["peak_bytes_estimated"] else "")
    budget = f", budget {m['budget']}" if m.get("budget") else ""
    return (f"rank {rank} memory{budget}: saved {kib(m['saved_bytes_estimated'])} estimated, "
            f"{kib(m['saved_bytes_measured'])} measured; peak {kib(m['peak_bytes_estimated'])} "
            f"estimated, {kib(m['peak_bytes_measured'])} measured{ratio}")


def _plan_line(cfg: RunConfig, p) -> str:
    return (
        f"plan ({cfg.kind}): {p.num_stages} stage(s) x {p.meshes_text()} "
        f"({', '.join(p.mesh.names)}) = {p.world_size} ranks, {p.micro_batches} "
        f"micro-batch(es), ZeRO-1 {'on' if cfg.zero else 'off'}"
    )


def _report(cfg: RunConfig, model, inputs, cm, results: list[dict], check: bool) -> int:
    from meshweave.runtime.distributed import runner

    first = results[0]
    for i, loss in enumerate(first.get("losses", ())):
        print(f"step {i + 1}: loss {loss:.6f}")
    if first.get("outputs") is not None:
        print("outputs: " + ", ".join(f"{tuple(o.shape)}" for o in first["outputs"]))
    if cfg.training:
        print(f"rank 0: {first['param_numel']} parameter elements, optimizer state "
              f"{first['optim_state_numel']} elements"
              f"{' (ZeRO-1 over dp)' if cfg.zero else ''}")
        print(f"rank 0 backward: {first['backward_kind']}")
        for r in results:
            if "memory" in r:
                print(memory_line(r["rank"], r["memory"]))
    if not check:
        return 0
    if "quant" in cm.graph.meta:  # what the quantized graph computes: the dequantized weights
        from meshweave.passes.quant import dequantized_model

        model = dequantized_model(model, cm.graph)
    labels = runner.next_token_labels(inputs[0])
    ref = runner.single_device(model, inputs, labels, training=cfg.training, steps=cfg.steps,
                               optim=cfg.optim)
    got = runner.RunResult(first.get("outputs"), first.get("losses", []),
                           {k: v for k, v in first.get("params", {}).items() if k in ref.params})
    errs = runner.compare(ref, got)
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
