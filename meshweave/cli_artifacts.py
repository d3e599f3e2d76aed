"""CLI commands for artifacts users take elsewhere: ONNX export, MLIR dumps, the plan report.

    meshweave export --model gpt-tiny [--mesh tp=2] --out DIR
    meshweave dump --model gpt-tiny --what mlir [--dialect linalg] [--mesh tp=2 --rank 1]
    meshweave report --model gpt-tiny --mesh dp=2,tp=2,pp=2 -o plan.html

meshweave/cli.py imports this module, which registers the commands and the `mlir` dumper.
A mesh whose axes are all named dp/tp/pp gets the Megatron-style plan of those sizes
(passes/parallel/search/megatron_grid.py); any other mesh, or a device count (`report --mesh 64`),
goes to the planner (plan_parallel), as in `meshweave plan`. The planning flags (--mesh, --spec,
--train, --batch, ...) are cli_flags.py's, shared with plan, run and dump.
"""

from __future__ import annotations

import os

from meshweave.cli import (
    META_ABOVE_BYTES,
    CLIError,
    _add_model_args,
    command,
    compile_zoo_model,
    dumper,
)
from meshweave.cli_parallel import forward_args, plan_from_args



def _lower_rank(graph, plan, rank: int):
    from meshweave.passes.parallel.lower.rank import lower_for_rank

    if not 0 <= rank < plan.world_size:
        raise CLIError(f"--rank {rank} is outside the plan's {plan.world_size} devices")
    return lower_for_rank(graph, plan, rank)


# --------------------------------------------------------------------------------- export
def _setup_export(p) -> None:
    from meshweave.cli_quant import add_quant_args

    from meshweave.cli_flags import add_planning_args

    _add_model_args(p)
    add_quant_args(p)
    add_planning_args(p)  # with --mesh or --plan-file: one file per rank and segment
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: pinned 18)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the onnxruntime check against the reference executor",
    )
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="weights from this checkpoint (.safetensors file, directory or index "
                        ".json; a .pt is the runtime's weights.pt), read one rank's shards at a "
                        "time; needed (or --init-seed) for a model traced on the meta device")
    p.add_argument("--init-seed", type=int, default=None, metavar="N",
                   help="seeded random weights (normal(0, 0.02); norms ones, biases zeros), "
                        "generated one rank's shards at a time; the same N gives the same model")


@command("export", "export a zoo model to ONNX (one file per rank when partitioned)")(_setup_export)
def _export(args) -> int:
    import torch

    from meshweave.cli_flags import resolve_planning
    from meshweave.codegen.onnx.export import OPSET, export_onnx, run_manifest

    resolve_planning(args, "export", unsupported={
        "--train": "ONNX export writes the inference graph"})
    # a model over META_ABOVE_BYTES is traced on the meta device: its weights come shard by
    # shard from --checkpoint or --init-seed (codegen/onnx/shards.py), never whole
    model, inputs, cm = compile_zoo_model(args, device="auto", execute=True)
    plan = plan_from_args(cm.graph, args)
    if _shardwise(args, cm):
        return _export_sharded(args, model, inputs, cm, plan)
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


def _on_meta(cm) -> bool:
    return any(getattr(t, "is_meta", False) for t in cm.graph.tensors.values())


def _shardwise(args, cm) -> bool:
    """Whether `meshweave export` takes the shard-wise path: weights from --checkpoint or
    --init-seed, or a model traced on the meta device (which then needs one of them)."""
    checkpoint, seed = getattr(args, "checkpoint", None), getattr(args, "init_seed", None)
    if not _on_meta(cm) and not checkpoint and seed is None:
        return False
    if _on_meta(cm) and not checkpoint and seed is None:
        raise CLIError(
            f"{args.model} was traced on the meta device (its fp32 weights are over "
            f"{META_ABOVE_BYTES / 2**30:.0f} GiB), so it has no weights to export: give "
            "--checkpoint FILE (.safetensors, a directory of them, or the runtime's weights.pt) "
            "or --init-seed N (seeded random weights); each rank's shards are then read or "
            "generated on their own"
        )
    if checkpoint and seed is not None:
        raise CLIError("give --checkpoint or --init-seed, not both")
    if getattr(args, "quantize", None):
        raise CLIError("--quantize is not supported with --checkpoint/--init-seed (the "
                       "shard-wise export writes the weights as they are read)")
    return True


def _export_sharded(args, model, inputs, cm, plan) -> int:
    import torch

    from meshweave.codegen.onnx.export import OPSET, run_manifest
    from meshweave.codegen.onnx.shards import export_sharded, state_dict_of
    from meshweave.codegen.onnx.weights import WeightSourceError, weight_source
    from meshweave.runtime.compare import max_errors, tensor_leaves

    meta = _on_meta(cm)
    try:
        weights = weight_source(getattr(args, "checkpoint", None), getattr(args, "init_seed", None))
        result = export_sharded(cm, plan, args.out, weights, None if meta else list(inputs),
                                opset=args.opset or OPSET, check=not args.no_verify)
    except WeightSourceError as e:
        raise CLIError(str(e)) from None
    print(result.summary())
    for path in result.paths:
        print(f"  {path}")
    print(f"  {result.manifest_path}")
    if args.no_verify:
        return 0
    if meta:
        print("not compared with eager: the model was traced on the meta device, and its "
              "weights are never whole in memory (onnx.checker passed on every file)")
        return 0
    model.load_state_dict(state_dict_of(cm.graph, weights), strict=False)  # the same weights
    with torch.no_grad():
        expected = model(*inputs)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    errs = max_errors(tensor_leaves(expected), run_manifest(args.out, tensors),
                      where=f"{result.manifest_path} against eager")
    print(f"max |onnxruntime - eager| = {max(errs.values()):.3e} (eager on the same weights)")
    return 0


# --------------------------------------------------------------------------------- mlir
@dumper("mlir")
def _dump_mlir(args) -> str:
    from meshweave.codegen.mlir.dump import INSTALL_HINT, dump_mlir, torch_mlir_available

    if not torch_mlir_available():
        return INSTALL_HINT  # one line, exit status 0: the optional extra is not installed
    _, inputs, cm = compile_zoo_model(args, execute=False)
    graph = cm.graph
    rank = getattr(args, "rank", None)
    if rank is not None:
        plan = plan_from_args(graph, args)
        if plan is None:
            raise CLIError("--rank needs --mesh or --plan-file (the plan whose rank to dump)")
        graph = _lower_rank(graph, plan, rank)
        inputs = None  # per-rank inputs may be slices; synthesized from the rank's types
    return dump_mlir(graph, inputs, dialect=getattr(args, "dialect", None) or "torch")


# --------------------------------------------------------------------------------- report
def _setup_report(p) -> None:
    from meshweave.cli_flags import add_planning_args

    _add_model_args(p)
    add_planning_args(p)  # --mesh or --plan-file; --memory-gib also sets the memory bars
    p.add_argument("-o", "--out", default="plan.html", help="output file (default plan.html)")
    p.add_argument("--offload", default=None, metavar="FILE",
                   help="report a hybrid generation plan instead (`meshweave generate "
                        "--memory-gib G --plan-out FILE`): which sequences keep their KV cache "
                        "on the CPU, and the memory split")


@command("report", "write a self-contained HTML report of a zoo model's parallel plan")(
    _setup_report
)
def _report(args) -> int:
    from meshweave.cli_flags import resolve_planning
    from meshweave.report import write_report

    if args.offload:
        from meshweave.report.offload import load_offload, write_offload_report

        if args.mesh or args.plan_file:
            raise CLIError("--offload reports a generation plan: it takes no --mesh or "
                           "--plan-file")
        try:
            doc = load_offload(args.offload)
        except ValueError as e:
            raise CLIError(str(e)) from None
        path = write_offload_report(args.out, doc)
        print(f"wrote {os.path.abspath(path)}")
        return 0
    resolve_planning(args, "report", needs="mesh|plan-file")
    # a report needs shapes, not weights: a big model is traced on the meta device
    if args.plan_file:
        from meshweave.cli_parallel import graph_for_plan

        plan = args.plan_value
        graph = graph_for_plan(forward_args(args), plan)  # the trace the plan was made for
    else:
        from meshweave.cli_parallel import planning_graph

        graph = planning_graph(forward_args(args))  # a big model: 2 layers, costed at depth
        plan = plan_from_args(graph, args)
    cap = args.memory_gib * 2**30 if args.memory_gib else None
    title = f"meshweave plan: {args.model} on {args.mesh or args.plan_file}"
    path = write_report(args.out, plan, graph, capacity_bytes=cap, title=title)
    print(f"wrote {os.path.abspath(path)}")
    return 0
