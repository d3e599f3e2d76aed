"""Quantized generation: CompiledModel.generate on a W4 model runs W4 prefill/decode programs
that reuse the compiled model's own packed weights (GPTQ's too), and its greedy tokens equal the
dequantized-weights model's (the oracle)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import meshweave
from meshweave.models import build_model
from meshweave.passes.quant import dequantized_model, packed_weights

from generate_helpers import eager_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [[3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4_generation_matches_the_dequantized_oracle(method):
    model, _ = build_model("llama-tiny", batch=1, seq=8)
    calib = [(torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(i)),)
             for i in range(3)]
    q = meshweave.QuantConfig.parse("w4c", method=method)
    with torch.no_grad():
        cm = meshweave.compile(model, (torch.tensor(PROMPT),), options=meshweave.CompileOptions(
            quantize=q, calibration=calib if method == "gptq" else None))
    out = cm.generate(PROMPT, 10)
    assert out.tokens == [eager_greedy(dequantized_model(model, cm.graph), PROMPT[0], 10)]
    # the decode programs are quantized and hold exactly the compiled model's packed weights
    gen = next(iter(cm._generators.values()))
    mine = packed_weights(cm.graph)
    for prog in gen.programs.values():
        theirs = packed_weights(prog.graph)
        assert len(theirs) == len(mine) > 0
        for target, t in theirs.items():
            src = mine[target.removeprefix("model.")]
            assert torch.equal(t["qweight"], src["qweight"])
            assert torch.equal(t["scales"], src["scales"])


def test_gptq_programs_without_given_weights_need_calibration():
    from meshweave.passes.quant import QuantizationError, quantize_graph

    model, inputs = build_model("llama-tiny", batch=1, seq=8)
    g = meshweave.compile(model, inputs).graph
    with pytest.raises(QuantizationError, match="needs calibration data"):
        quantize_graph(g, meshweave.QuantConfig.parse("w4c", method="gptq"))


@pytest.mark.heavy
def test_quant_decode_bench_runs_tiny():
    r = subprocess.run([sys.executable, "benchmarks/quant_decode.py", "--cpu",
                        "--new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("decode tokens/s fp32 ") and ", W4 " in last and ": ratio " in last
