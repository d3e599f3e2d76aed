"""meshweave.compile: trace -> convert -> passes -> backend."""

from __future__ import annotations

from typing import Any

import torch

from meshweave import env
from meshweave.compiled import CompiledModel
from meshweave.frontend import convert, decompose, export_model
from meshweave.ir.types import tensor_type_of
from meshweave.options import CompileOptions, default_options
from meshweave.passes.pipeline import default_pipeline, run_pipeline
from meshweave.signature import InputSlot, Signature, _path_name


def _select_passes(names):
    table = {p.name: p for p in default_pipeline()}
    if names is None:
        return list(table.values())
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known: {sorted(table)}")
    return [table[n] for n in names]


def _signature(ep: torch.export.ExportedProgram, graph) -> Signature:
    in_spec = ep.call_spec.in_spec
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user_names = {s.arg.name for s in ep.graph_signature.input_specs
                  if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    vals = [n.meta.get("val") for n in placeholders if n.name in user_names]
    example = torch.utils._pytree.tree_unflatten(vals, in_spec)
    paths = [_path_name(p) for p, _ in torch.utils._pytree.tree_flatten_with_path(example)[0]]
    slots = []
    for path, val in zip(paths, vals):
        expected = tensor_type_of(val) if isinstance(val, torch.Tensor) else val
        slots.append(InputSlot(path, expected))
    return Signature(in_spec, slots, graph.symbols, paths)


def compile(
    model: torch.nn.Module,
    args: Any = (),
    kwargs: dict | None = None,
    *,
    dynamic_shapes: Any = None,
    options: CompileOptions | None = None,
) -> CompiledModel:
    """Compile `model` for the example inputs `args`/`kwargs`.

    dynamic_shapes is torch.export's argument (e.g. {"x": {0: torch.export.Dim("batch")}});
    those dimensions become sympy symbols in the IR and may vary from call to call.
    """
    options = options or default_options()
    if not isinstance(args, tuple):
        args = (args,)
    dp = None
    if options.local_batch:  # trace at the global batch: each rank's example, dp times
        dp = _local_dp(options)
        args, kwargs, batched = _repeat_batch(args, kwargs, dp)
    if options.backend == "triton":
        # torch.export imports triton; the interpreter switch must come before it.
        from meshweave.codegen import prepare_triton_backend

        prepare_triton_backend(options, model)
    ep = traced = export_model(model, args, kwargs, dynamic_shapes=dynamic_shapes,
                               strict=options.strict)
    if options.decompose:
        ep = decompose(ep)
    name = type(model).__name__
    graph = convert(ep, eager_fallback=options.eager_fallback, name=name)
    dump_dir = options.dump_dir or env.dump_dir()
    signature = _signature(ep, graph)
    passes = _select_passes(options.passes) + _quant_passes(options, signature)
    optimized = run_pipeline(graph, passes, dump_dir=dump_dir, verify_each=options.verify)
    cm = CompiledModel(optimized, signature, ep.call_spec.out_spec, options, graph, name)
    cm.source_model, cm.compile_fn = model, compile  # cm.generate compiles its steps
    if "quant" in optimized.meta:
        cm.artifacts["quantization"] = optimized.meta["quant"]
    _attach_backend(cm, options)
    if options.training:
        _attach_training(cm, model, traced, args, kwargs, options)
    if options.plan is not None:
        cm.plan = saved_plan(options.plan, options.mesh, cm.graph, training=options.training)
    elif options.mesh is not None:
        cm.plan = plan_for(cm.graph, options.mesh, training=options.training,
                           hardware=options.hardware or "h100",
                           micro_batches=options.micro_batches,
                           memory_budget=_planner_memory(options),
                           # the curve's solves are paid only where memory is capped
                           remat_curve=_remat_curve(cm) if options.training
                           and options.memory_limit is not None else None)
    if dp is not None:
        _check_local_plan(cm.plan)
        cm.signature = signature.local_batch(dp, batched)
    if dump_dir:
        cm.dump(dump_dir)
    return cm


def _planner_memory(options: CompileOptions) -> int | None:
    """CompileOptions.memory_limit under mesh=: the bytes per device the planner plans in."""
    if options.memory_limit is None:
        return None
    from meshweave.passes.offload import memory_limit_bytes

    return memory_limit_bytes(options.memory_limit)


def _remat_curve(cm: CompiledModel):
    """The remat pass's memory-versus-recompute curve of the model's joint graph, for the
    planner to price stages that recompute (passes/remat/curve.py)."""
    from meshweave.passes.remat.curve import remat_curve

    problem = cm.remat.get("problem")
    return remat_curve(problem) if problem is not None else None


def _local_dp(options: CompileOptions) -> int:
    """The dp degree that CompileOptions(local_batch=True) splits the batch over."""
    from meshweave.ir.errors import MeshweaveError
    from meshweave.ir.mesh import DeviceMesh

    mesh = options.mesh
    if options.plan is not None:
        plan = saved_plan(options.plan, mesh, None, training=options.training)
        mesh = plan.mesh
    if not isinstance(mesh, DeviceMesh) or mesh.axis_names is None or "dp" not in mesh.names:
        raise MeshweaveError(f"CompileOptions.local_batch=True: the batch is split over a 'dp' "
                             f"mesh axis, and mesh={mesh!r} has none; use a named mesh such as "
                             f"DeviceMesh((2, 2), ('dp', 'tp'))")
    return mesh.axis_size("dp")


def _repeat_batch(args: tuple, kwargs: dict | None, dp: int):
    """(args, kwargs) with every tensor of rank >= 1 repeated dp times along dim 0, and which
    leaves were (the signature's local slots)."""
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten((args, dict(kwargs or {})))
    batched = [isinstance(x, torch.Tensor) and x.dim() >= 1 for x in leaves]
    leaves = [torch.cat([x] * dp, 0) if b else x for x, b in zip(leaves, batched)]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return args, kwargs, batched


def _check_local_plan(plan) -> None:
    from meshweave.ir.errors import MeshweaveError

    if plan.num_stages > 1 and not plan.uniform:
        raise MeshweaveError(f"CompileOptions.local_batch=True with pipeline stages needs "
                             f"stages of one mesh (each rank's outputs come from the last "
                             f"stage's rank at its coordinates); this plan's stage meshes are "
                             f"{plan.meshes_text()}: pass the global batch instead")


def _quant_passes(options: CompileOptions, signature: Signature) -> list:
    """CompileOptions.quantize: the quantization pass (passes/quant/), after the others."""
    if options.quantize is None:
        return []
    from meshweave.passes.quant import quantization_pass

    if options.training:
        raise ValueError("CompileOptions.quantize is weight-only quantization for inference; "
                         "it cannot be combined with training=True")
    batches = [signature.flatten(*_as_call(c)) for c in (options.calibration or ())]
    return [quantization_pass(options.quantize, batches, options.quantized_weights)]


def _as_call(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {}


MEGATRON_AXES = ("dp", "ep", "tp", "pp")


def plan_for(graph, mesh, *, training: bool = False, batch: int | None = None,
             hardware: str = "h100", micro_batches: int = 1,
             memory_budget: float | None = None, remat_curve: tuple | None = None):
    """The Plan of `graph` on `mesh` (a DeviceMesh): a mesh named only by dp/ep/tp/pp axes gets
    that Megatron layout (an "ep" axis: expert parallelism for moe.experts, data parallelism
    for the rest, strategies/moe_rules.py); any other mesh (or a device count) goes to the planner's search
    (under `memory_budget` bytes per device, when given: plan_parallel's; a stage over it
    recomputes, priced by `remat_curve`, passes/remat/curve.py, when given).
    `batch` defaults to the batch the graph was traced at."""
    from meshweave.ir.mesh import DeviceMesh

    if not isinstance(mesh, (DeviceMesh, int)):
        raise TypeError(f"CompileOptions.mesh: expected a meshweave.DeviceMesh (or a device "
                        f"count), got {type(mesh).__name__}: {mesh!r}")
    if isinstance(mesh, DeviceMesh) and mesh.axis_names is not None \
            and set(mesh.names) <= set(MEGATRON_AXES):
        from meshweave.passes.parallel.search.megatron_grid import megatron_plan

        sizes = {n: mesh.axis_size(n) for n in mesh.names}
        return megatron_plan(graph, sizes.get("dp", 1), sizes.get("tp", 1), sizes.get("pp", 1),
                             micro_batches=micro_batches, batch=batch, training=training,
                             spec=hardware, ep=sizes.get("ep"), memory_budget=memory_budget,
                             remat_curve=remat_curve)
    from meshweave.passes.parallel.search.search import plan_parallel
    from meshweave.passes.parallel.strategies.node_strategies import infer_batch_dims

    batch = batch or infer_batch_dims(graph).traced_batch
    return plan_parallel(graph, mesh, hardware, batch=batch, training=training,
                         memory_budget=memory_budget, remat_curve=remat_curve)


def saved_plan(plan, mesh, graph, *, training: bool):
    """CompileOptions.plan: a Plan (or the path of its JSON) checked against the mesh's size
    and the batch the graph was traced at."""
    from meshweave.ir.errors import MeshweaveError
    from meshweave.ir.mesh import DeviceMesh
    from meshweave.passes.parallel.plan import Plan
    from meshweave.passes.parallel.strategies.node_strategies import infer_batch_dims

    where = "CompileOptions.plan"
    if isinstance(plan, str):
        where = plan
        try:
            with open(plan) as f:
                plan = Plan.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MeshweaveError(f"CompileOptions.plan={where!r}: cannot read a meshweave Plan "
                                 f"JSON from it ({type(e).__name__}: {e})") from None
    if not isinstance(plan, Plan):
        raise TypeError(f"CompileOptions.plan: expected a Plan or the path of its JSON, got "
                        f"{type(plan).__name__}")
    size = mesh.size if isinstance(mesh, DeviceMesh) else mesh
    if size is not None and size != plan.world_size:
        raise MeshweaveError(f"{where}: the plan needs {plan.world_size} devices, but "
                             f"CompileOptions.mesh={mesh} has {size}")
    made_for = (plan.search or {}).get("batch") if isinstance(plan.search, dict) else None
    traced = infer_batch_dims(graph).traced_batch if graph is not None else None
    if made_for is not None and traced is not None and made_for != traced:
        raise MeshweaveError(f"{where}: the plan was made for a global batch of {made_for}, "
                             f"the model was traced at {traced}; trace at batch {made_for} "
                             f"(meshweave run --batch {made_for}) or plan again")
    plan.training = training
    return plan


def _attach_training(cm, model, ep, args, kwargs, options) -> None:
    """The joint forward + backward (frontend/joint.py) of the trace `ep` as exported (AOTAutograd
    differentiates the ATen ops itself): calls with grad enabled run it."""
    from meshweave.frontend.joint import build_joint
    from meshweave.codegen import triton_runner
    from meshweave.ir.errors import MeshweaveError
    from meshweave.passes.remat.partition import partition_for
    from meshweave.runtime.python_runner import python_runner

    trainable = [n for n, p in model.named_parameters()
                 if p.requires_grad and p.dtype.is_floating_point]
    if not trainable:
        raise MeshweaveError(
            f"CompileOptions(training=True): {type(model).__name__} has no floating-point "
            f"parameter that requires grad, so there is nothing to train; compile it with "
            f"training=False"
        )
    passes = _select_passes(options.passes)

    def optimize(g):
        return run_pipeline(g, passes, verify_each=options.verify)

    leaves = cm.signature.flatten(args, dict(kwargs or {}))
    # the eager backend runs both graphs as generated Python (runtime/python_runner.py)
    kw = {"make_runner": triton_runner(options) if cm.backend == "triton" else python_runner}
    cm.remat = remat = {}
    kw["partition"] = partition_for(options.memory_budget, options.hardware, remat,
                                    _leaf_device(leaves))
    kw["recomputed"] = lambda: remat.get("recomputed", [])
    cm.joint = build_joint(ep, leaves, cm.model_name, eager_fallback=options.eager_fallback,
                           optimize=optimize, **kw)


def _leaf_device(leaves) -> str:
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


def _attach_backend(cm: CompiledModel, options: CompileOptions) -> None:
    backend = options.backend
    if backend is None:
        backend = "triton" if _graph_on_cuda(cm) and _triton_available() else "eager"
    cm.backend = backend
    if options.cuda_graphs and (backend != "triton" or not _graph_on_cuda(cm)):
        raise ValueError(
            f"CompileOptions.cuda_graphs=True needs the triton backend on CUDA tensors; this "
            f"model compiled for backend {backend!r} on "
            f"{'CUDA' if _graph_on_cuda(cm) else 'the CPU'}: move the model and inputs to a "
            f"GPU or drop cuda_graphs")
    if backend == "triton":
        from meshweave.codegen import attach_triton_backend

        attach_triton_backend(cm)
        on, cm.cuda_graphs = _graphs_decision(cm, options)
        if on:
            from meshweave.codegen.triton.cuda_graphs import CudaGraphRunner

            cm._runner = CudaGraphRunner(cm._runner)


def _graphs_decision(cm: CompiledModel, options: CompileOptions) -> tuple[bool, str]:
    """Whether the generated module replays from CUDA graphs, and why (explain() shows it).
    cuda_graphs=None turns them on where that is exact and bounded: CUDA tensors, inference,
    static shapes (one graph per input signature) and every node in a kernel (a
    reference-executor node may synchronize, which capture cannot take)."""
    if options.cuda_graphs:
        return True, "on (cuda_graphs=True)"
    if options.cuda_graphs is False:
        return False, "off (cuda_graphs=False)"
    fallbacks = cm.artifacts["kernels"].fallbacks
    why = ("the model runs on the CPU" if not _graph_on_cuda(cm) else
           "training" if options.training else
           "dynamic shapes" if cm.graph.symbols else
           f"{len(fallbacks)} nodes run by the reference executor" if fallbacks else None)
    if why:
        return False, f"off ({why})"
    return True, "on (static-shape inference on CUDA; cuda_graphs=False turns it off)"


def _graph_on_cuda(cm: CompiledModel) -> bool:
    return any(getattr(v.type, "device", "cpu") == "cuda" for v in cm.graph.all_values())


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
