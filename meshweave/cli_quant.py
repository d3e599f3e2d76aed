"""The CLI's weight quantization flags, shared by `meshweave compile` and `meshweave export`.

    meshweave compile --model llama-tiny --quantize w4c [--method gptq] [--quant-skip lm_head]
    meshweave export --model llama-tiny --quantize w4c --out DIR     # MatMulNBits in ONNX

A thin layer over `CompileOptions(quantize=QuantConfig, calibration=[...])`: the flags become
a QuantConfig; GPTQ's calibration batches are random inputs shaped like the example inputs
(tokens drawn over the vocabulary, floats from a normal), seeded, and the CLI says so. Checking
a quantized model against eager means eager with the dequantized weights loaded
(passes/quant/rewrite.py's `dequantized_model`): that is what the compiled graph computes. The
original model's difference is printed too, as the quantization error, and is not checked.

This module must not import meshweave.cli (cli.py imports it): bad input raises ValueError,
which the CLI's main prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

CALIBRATION_BATCHES = 4
CALIBRATION_SEED = 0


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, metavar="SPEC",
                   help="weight-only quantization of the linear layers: w<bits>g<group> or "
                        "w<bits>c (per channel), e.g. w4g128, w4g32, w8c; bits 2, 3, 4, 8")
    p.add_argument("--method", choices=["rtn", "gptq"], default=None,
                   help="with --quantize: round to nearest (default) or GPTQ, calibrated on "
                        f"{CALIBRATION_BATCHES} seeded random batches shaped like the inputs")
    p.add_argument("--quant-skip", default=None, metavar="NAMES",
                   help="with --quantize: comma-separated parameter names (substrings) to leave "
                        "in floating point, e.g. lm_head,down_proj")


def quant_compile_options(args: Any, inputs: tuple, vocab_size: int | None = None
                          ) -> tuple[dict, list[str]]:
    """CompileOptions keyword arguments for the flags, and lines to print about them."""
    spec = getattr(args, "quantize", None)
    method = getattr(args, "method", None)
    skip_text = getattr(args, "quant_skip", None)
    if spec is None:
        if method or skip_text:
            flag = "--method" if method else "--quant-skip"
            raise ValueError(f"{flag} applies to weight quantization; add --quantize, "
                             "e.g. --quantize w4g128")
        return {}, []
    from meshweave.passes.quant import QuantConfig

    skip = tuple(s.strip() for s in (skip_text or "").split(",") if s.strip())
    try:
        config = QuantConfig.parse(spec, method=method or "rtn", skip=skip)
    except ValueError as e:
        text = str(e)
        raise ValueError(text if text.startswith("--quantize") else f"--quantize {spec!r}: {text}"
                         ) from None
    options: dict = {"quantize": config}
    lines = []
    if config.method == "gptq":
        options["calibration"] = calibration_batches(inputs, vocab_size)
        shapes = ", ".join(str(list(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        lines.append(f"GPTQ calibration: {CALIBRATION_BATCHES} batches of random inputs shaped "
                     f"like the example inputs ({shapes}), seed {CALIBRATION_SEED}"
                     + (f", tokens in [0, {vocab_size})" if vocab_size else ""))
    return options, lines


def calibration_batches(inputs: tuple, vocab_size: int | None = None,
                        count: int = CALIBRATION_BATCHES, seed: int = CALIBRATION_SEED
                        ) -> list[tuple]:
    """`count` batches like `inputs`: integer tensors uniform over [0, vocab_size) (default:
    the example's largest value + 1), floating ones standard normal, other values as given."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = []
        for x in inputs:
            if not isinstance(x, torch.Tensor):
                batch.append(x)
            elif x.is_floating_point():
                batch.append(torch.randn(x.shape, generator=gen).to(x.dtype))
            else:
                high = (vocab_size or int(x.max()) + 1) if x.numel() else 1
                batch.append(torch.randint(0, max(high, 1), x.shape, generator=gen,
                                           dtype=x.dtype))
        batches.append(tuple(batch))
    return batches


def quantization_hint(error: Exception, spec: str) -> str:
    """The pass's QuantizationError (which names the layer), with the CLI flags that fix it."""
    import re

    text = str(error).splitlines()[0]
    bits = re.match(r"w\d+", spec.strip().lower())
    weight = re.search(r"weight '([^']+)'", text)
    # the layer's own name matches that layer in every block (skip names are substrings)
    skip = weight.group(1).removesuffix(".weight").rsplit(".", 1)[-1] if weight else "NAME"
    return (f"--quantize {spec}: {text}. On the command line: --quantize "
            f"{bits.group(0) if bits else 'w4'}c (per channel), another group size, or "
            f"--quant-skip {skip}")


def eager_references(model: torch.nn.Module, cm: Any, inputs: tuple) -> list[tuple[str, Any]]:
    """(label, eager outputs) to compare the compiled model with, the checked one first.

    Unquantized: the model itself. Quantized: the model with its quantized weights replaced by
    their dequantized values (what the graph computes), then the original model."""
    from meshweave.passes.quant import dequantized_model

    with torch.no_grad():
        if "quantization" not in getattr(cm, "artifacts", {}):
            return [("eager", model(*inputs))]
        dq = dequantized_model(model, cm.graph)
        return [("eager (dequantized weights)", dq(*inputs)),
                ("eager (original weights)", model(*inputs))]


def reference_note(label: str) -> str:
    """What a reference line means when it is not the checked one."""
    if label == "eager (original weights)":
        return " (the quantization error; not checked)"
    return ""
