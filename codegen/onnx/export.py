"""ONNX export: the optimized IR, as one .onnx file, or one file per rank and segment.

`export_onnx` is the entry point. Without a plan it writes one file (single.py); a partitioned
plan gives per-rank programs (passes/parallel/lower/) with `dist.*` collective nodes, which
partition.py cuts into segments at their collectives, one .onnx file each. manifest.json lists,
in an order that runs, the steps that connect them: run a file on a rank, or apply a collective
to named values of the ranks in its group. `run_manifest` (partition.py) is the reference
reading of that format, with numpy collectives. Every export is checked by onnx.checker and run
in onnxruntime against the reference executor.

  single.py        one Graph -> one .onnx file; verify_onnx, run_onnx
  partition.py     per-rank programs -> segments, the manifest and its runner
  translations.py  custom ONNX translations (ONNX_TRANSLATIONS) for ops torchlib lacks
  matmul_nbits.py  quant.linear -> com.microsoft::MatMulNBits (or a dequantize fallback)
  scalars.py       non-tensor user inputs (use_cache=False) folded as trace constants
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from meshweave.ir.graph import Graph
from meshweave.runtime.reference import run_graph
from .matmul_nbits import lower_quant_linears
from .partition import export_partitioned, run_manifest
from .scalars import fold_scalar_inputs, full_inputs, tensor_leaves
from .single import (
    EXTERNAL_DATA_THRESHOLD,
    OPSET,
    OnnxExport,
    compare_outputs,
    _to_numpy,
    example_inputs,
    export_graph,
    single_manifest,
)

__all__ = ["OPSET", "export_onnx", "run_manifest"]


def export_onnx(
    cm: Any,
    directory: str,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    plan: Any = None,
    opset: int = OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> OnnxExport:
    """Export a CompiledModel (or a Graph) to ONNX under `directory`.

    Without a plan (or with a one-device plan) this writes model.onnx; with a partitioned
    meshweave Plan, one file per rank and segment (see the module docstring). Always writes
    manifest.json. `inputs` are example user inputs (default: synthesized from the traced
    types); with `verify`, every file is checked with onnx.checker and the whole export is run
    in onnxruntime and compared with the reference executor (rtol/atol).

    Non-tensor inputs (a `use_cache=False` flag) are constants of the trace: they are folded
    and are not ONNX inputs (scalars.py); `inputs` may hold all user inputs or only the
    tensors. Quantized linears become com.microsoft::MatMulNBits (matmul_nbits.py); a layer
    that cannot (3 bits) is exported as dequantize-then-MatMul, listed in the result's notes.
    """
    from meshweave.progress import step

    traced: Graph = cm if isinstance(cm, Graph) else cm.graph
    name = getattr(cm, "model_name", traced.name)
    full = full_inputs(traced, inputs if inputs is not None else example_inputs(traced))
    graph = fold_scalar_inputs(traced, full)
    inputs = tensor_leaves(traced, full)
    lowered, notes = lower_quant_linears(graph)
    os.makedirs(directory, exist_ok=True)
    if plan is not None and plan.world_size > 1:
        result = export_partitioned(
            graph,
            plan,
            directory,
            inputs,
            opset=opset,
            external_data_threshold=external_data_threshold,
            name=name,
        )
    else:
        with step(f"exporting {name} to ONNX (opset {opset})"):
            f = export_graph(
                lowered,
                os.path.join(directory, "model.onnx"),
                inputs,
                opset=opset,
                external_data_threshold=external_data_threshold,
            )
        manifest = single_manifest(graph, f, name, opset)
        result = OnnxExport(directory, [f], manifest)
    result.notes = notes
    with open(result.manifest_path, "w") as fh:
        json.dump(result.manifest, fh, indent=1)
    if verify:
        import onnx

        with step("checking the ONNX export in onnxruntime"):
            for path in result.paths:
                onnx.checker.check_model(path, full_check=True)  # by path: external data ok
            expected = run_graph(traced, full)  # the IR as compiled: quant.linear, scalars
            got = run_manifest(directory, inputs)
            result.max_error = compare_outputs(
                got, [_to_numpy(x) for x in expected], rtol, atol, result.manifest_path
            )
    if hasattr(cm, "artifacts"):
        cm.artifacts["onnx"] = result
    return result
