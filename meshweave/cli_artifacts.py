"""CLI commands for artifacts users take elsewhere: ONNX export, MLIR dumps, the plan report.

    meshweave export --model gpt-tiny [--mesh tp=2] --out DIR
    meshweave dump --model gpt-tiny --what mlir [--dialect linalg] [--mesh tp=2 --rank 1]
    meshweave report --model gpt-tiny --mesh dp=2,tp=2,pp=2 -o plan.html

meshweave/cli.py imports this module, which registers the commands and the `mlir` dumper.
A mesh whose axes are all named dp/tp/pp gets the Megatron-style plan of those sizes
(passes/parallel/search/megatron_grid.py); any other mesh goes to the planner (plan_parallel).
"""

from __future__ import annotations

import os

from meshweave.cli import CLIError, _add_model_args, command, compile_zoo_model, dumper



def plan_for_mesh(
    graph,
    mesh_text: str,
    *,
    micro_batches: int = 1,
    training: bool = False,
    batch: int = 2,
    hardware: str = "h100",
):
    """A Plan for `graph` on the mesh `mesh_text` ('tp=2', 'dp=2,tp=2,pp=2', '2x4', ...)."""
    from meshweave.ir.mesh import DeviceMesh

    try:
        mesh = DeviceMesh.parse(mesh_text)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        from meshweave.api import plan_for

        return plan_for(graph, mesh, micro_batches=micro_batches, training=training,
                        batch=batch, hardware=hardware)
    except ImportError as e:
        raise CLIError(f"parallel planning is not available in this build ({e})") from None


def _lower_rank(graph, plan, rank: int):
    from meshweave.passes.parallel.lower.rank import lower_for_rank

    if not 0 <= rank < plan.world_size:
        raise CLIError(f"--rank {rank} is outside the plan's {plan.world_size} devices")
    return lower_for_rank(graph, plan, rank)


# --------------------------------------------------------------------------------- export
def _setup_export(p) -> None:
    from meshweave.cli_quant import add_quant_args

    _add_model_args(p)
    add_quant_args(p)
    p.add_argument(
        "--mesh",
        default=None,
        help="partition for this mesh first ('tp=2', 'pp=2', 'dp=2,tp=2'); one file "
        "per rank and segment plus manifest.json",
    )
    p.add_argument("--micro-batches", type=int, default=1, help="pipeline micro-batches")
    p.add_argument(
        "--plan-file",
        default=None,
        metavar="FILE",
        help="partition by this Plan JSON (`meshweave plan --out`) instead of --mesh",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: pinned 18)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the onnxruntime check against the reference executor",
    )


@command("export", "export a zoo model to ONNX (one file per rank when partitioned)")(_setup_export)
def _export(args) -> int:
    import torch

    from meshweave.codegen.onnx.export import OPSET, export_onnx, run_manifest

    model, inputs, cm = compile_zoo_model(args)
    plan = None
    if args.plan_file:
        from meshweave.cli_parallel import load_plan_file

        plan = load_plan_file(args.plan_file)
    elif args.mesh:
        plan = plan_for_mesh(
            cm.graph, args.mesh, micro_batches=args.micro_batches, batch=args.batch
        )
    result = export_onnx(
        cm, args.out, list(inputs), plan=plan, opset=args.opset or OPSET, verify=not args.no_verify
    )
    if "quantization" in cm.artifacts:  # the explain line: layers and weight bytes saved
        print(f"quantization: {cm.artifacts['quantization'].summary()}")
    print(result.summary())
    for path in result.paths:
        print(f"  {path}")
    print(f"  {result.manifest_path}")
    if not args.no_verify:
        from meshweave.cli_quant import eager_references, reference_note
        from meshweave.runtime.compare import max_errors, tensor_leaves

        got = run_manifest(args.out, [x for x in inputs if isinstance(x, torch.Tensor)])
        for label, expected in eager_references(model, cm, inputs):
            errs = max_errors(tensor_leaves(expected), got,
                              where=f"{result.manifest_path} against {label}")
            print(f"max |onnxruntime - {label}| = {max(errs.values()):.3e}{reference_note(label)}")
    return 0


# --------------------------------------------------------------------------------- mlir
@dumper("mlir")
def _dump_mlir(args) -> str:
    from meshweave.codegen.mlir.dump import INSTALL_HINT, dump_mlir, torch_mlir_available

    if not torch_mlir_available():
        return INSTALL_HINT  # one line, exit status 0: the optional extra is not installed
    _, inputs, cm = compile_zoo_model(args)
    graph = cm.graph
    rank = getattr(args, "rank", None)
    mesh = getattr(args, "mesh", None)
    if rank is not None:
        if not mesh:
            raise CLIError("--rank needs --mesh (the plan whose rank to dump)")
        graph = _lower_rank(graph, plan_for_mesh(graph, mesh, batch=args.batch), rank)
        inputs = None  # per-rank inputs may be slices; synthesized from the rank's types
    return dump_mlir(graph, inputs, dialect=getattr(args, "dialect", None) or "torch")


# --------------------------------------------------------------------------------- report
def _setup_report(p) -> None:
    _add_model_args(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mesh", help="device mesh, e.g. 'dp=2,tp=2,pp=2' or '2x4'")
    where.add_argument("--plan-file", metavar="FILE",
                       help="report this Plan JSON (`meshweave plan --out`) instead")
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="pipeline micro-batches (default: one per example, --batch)",
    )
    p.add_argument("--training", action="store_true", help="plan a training step")
    p.add_argument("--hardware", default="h100", help="hardware preset or spec file (h100)")
    p.add_argument(
        "--capacity-gib",
        type=float,
        default=None,
        help="device memory for the memory bars (default: the plan's hardware)",
    )
    p.add_argument("-o", "--out", default="plan.html", help="output file (default plan.html)")


@command("report", "write a self-contained HTML report of a zoo model's parallel plan")(
    _setup_report
)
def _report(args) -> int:
    from meshweave.report import write_report

    _, _, cm = compile_zoo_model(args)
    if args.plan_file:
        from meshweave.cli_parallel import load_plan_file

        plan = load_plan_file(args.plan_file)
    else:
        plan = plan_for_mesh(
            cm.graph,
            args.mesh,
            micro_batches=args.micro_batches or args.batch,
            training=args.training,
            batch=args.batch,
            hardware=args.hardware,
        )
    cap = args.capacity_gib * 2**30 if args.capacity_gib else None
    title = f"meshweave plan: {args.model} on {args.mesh or args.plan_file}"
    path = write_report(args.out, plan, cm.graph, capacity_bytes=cap, title=title)
    print(f"wrote {os.path.abspath(path)}")
    return 0
