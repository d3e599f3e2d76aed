"""Weight quantization: round-to-nearest and GPTQ int2/3/4/8 weights for linear layers.

Packs weights, scales and zeros as graph tensors behind the `quant.linear` op. May import ir/,
passes/ and runtime/reference (GPTQ's calibration runs through the reference executor); its
Triton kernels live in codegen/triton/kernels/, the packed format and the op in ir/ (packing.py,
ops/quant.py: the op's eager rule needs the format, and ir/ imports nothing above it).

  config.py     QuantConfig (bits, group size, method, symmetric, act order), "w4g128" parsing
  quantizer.py  the grid of a group (scale, zero point) and round to nearest
  gptq.py       GPTQ: Hessian accumulation, lazy batch updates, act order with static groups
  targets.py    which nodes are quantized (linear, mm/matmul/addmm with a parameter weight)
  calibrate.py  calibration batches through the reference executor, in lock step
  rewrite.py    the pass: targets -> quant.linear; explain()'s summary; the dequantized oracle
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import QuantConfig
from .rewrite import (
    QuantizationError,
    QuantSummary,
    dequantized_model,
    dequantized_state,
    packed_weights,
    quantize_graph,
)


def quantization_pass(config: QuantConfig, calibration: Sequence[Sequence[Any]] | None = None,
                      given: dict | None = None):
    """The pass for the pipeline (passes/pipeline.py's Pass), bound to its configuration.
    `calibration` holds each batch's flattened user inputs (Signature.flatten); `given` packed
    weights to reuse (rewrite.packed_weights)."""
    from ..pipeline import Pass

    if not isinstance(config, QuantConfig):
        raise TypeError(f"CompileOptions.quantize: expected a meshweave.QuantConfig, got "
                        f"{type(config).__name__}: {config!r}")

    def quantize(graph):
        return quantize_graph(graph, config, calibration, given)

    return Pass("quantize", quantize, f"weights -> {config.tag} {config.method} quant.linear")


__all__ = [
    "QuantConfig",
    "QuantSummary",
    "QuantizationError",
    "dequantized_model",
    "dequantized_state",
    "packed_weights",
    "quantization_pass",
    "quantize_graph",
]
