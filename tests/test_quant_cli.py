"""`meshweave compile/export --quantize`: the flags, the checks it prints, one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import onnx
import pytest
import torch

from meshweave.cli import main
from meshweave.cli_quant import calibration_batches


def _value(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r" = ([0-9.e+-]+)", text)
    assert m, f"no line '{label} = ...' in:\n{text}"
    return float(m.group(1))


def test_compile_quantized_compares_with_dequantized_eager(capsys):
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w4c"]) == 0
    out = capsys.readouterr().out
    repro = "repro: meshweave compile --model llama-tiny --quantize w4c"
    assert re.search(r"quantization: w4c rtn: 15 layers .* \([\d.]+x smaller, [\d,]+ saved\)",
                     out), repro
    assert _value(out, "max |meshweave - eager (dequantized weights)|") < 1e-4, repro
    # the original model is a different function: the 4-bit error shows, and is not checked
    assert _value(out, "max |meshweave - eager (original weights)|") > 1e-3, repro
    assert "(the quantization error; not checked)" in out


def test_compile_gptq_builds_seeded_calibration(capsys):
    args = ["compile", "--model", "llama-tiny", "--quantize", "w4c", "--method", "gptq",
            "--quant-skip", "lm_head"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "GPTQ calibration: 4 batches of random inputs shaped like the example inputs " \
           "([2, 16]), seed 0, tokens in [0, 128)" in out
    assert "w4c gptq: 14 layers" in out  # lm_head left in floating point
    assert _value(out, "max |meshweave - eager (dequantized weights)|") < 1e-4, " ".join(args)


def test_calibration_batches_are_seeded_and_shaped():
    tokens, feats = torch.zeros(2, 16, dtype=torch.int64), torch.zeros(3, 4)
    a = calibration_batches((tokens, feats), vocab_size=50)
    b = calibration_batches((tokens, feats), vocab_size=50)
    assert len(a) == 4 and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    assert a[0][0].shape == (2, 16) and a[0][0].dtype == torch.int64
    assert int(a[0][0].min()) >= 0 and int(a[0][0].max()) < 50
    assert not torch.equal(a[0][0], a[1][0]) and a[0][1].dtype == torch.float32


def test_export_quantized_writes_matmul_nbits(tmp_path, capsys):
    out_dir = tmp_path / "q"
    args = ["export", "--model", "llama-tiny", "--quantize", "w4g32", "--quant-skip",
            "down_proj", "--out", str(out_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    repro = "repro: meshweave " + " ".join(args)
    nodes = [n for n in onnx.load(str(out_dir / "model.onnx")).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(nodes) == 13 and all(n.domain == "com.microsoft" for n in nodes), repro
    blocks = {a.i for n in nodes for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}, blocks
    assert "quantization: w4g32 rtn: 13 layers" in out
    assert _value(out, "max |onnxruntime - eager (dequantized weights)|") < 1e-4, repro
    assert _value(out, "max |onnxruntime - eager (original weights)|") > 1e-3, repro


@pytest.mark.parametrize("args, message", [
    (["--quantize", "w5g32"], "--quantize 'w5g32': QuantConfig.bits=5: expected one of 2, 3, 4, 8"),
    (["--quantize", "w4x"], "--quantize 'w4x': expected w<bits>g<group> or w<bits>c"),
    (["--quantize", "w4g48"], "group_size=48: expected one of 32, 64, 128"),
    (["--method", "gptq"], "--method applies to weight quantization; add --quantize"),
])
def test_bad_quantize_flags_are_one_line(args, message, capsys):
    assert main(["compile", "--model", "llama-tiny", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and message in err[0], err


def test_group_that_does_not_divide_k_names_the_layer():
    """A real process: exit 2, one line, no traceback, the layer and the flags that fix it."""
    r = subprocess.run([sys.executable, "-m", "meshweave", "compile", "--model", "llama-tiny",
                        "--quantize", "w4g32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln
             and "warn" not in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    assert "group_size=32 does not divide K=176" in line
    assert "'layers.0.mlp.down_proj.weight'" in line and "models/layers.py" in line
    assert "--quantize w4c (per channel)" in line and "--quant-skip down_proj" in line
