"""Quantized ONNX export (com.microsoft::MatMulNBits) and non-tensor inputs, in real onnxruntime.

Every failure message carries a one-line repro (`meshweave export --model ... --out DIR`).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import meshweave
from meshweave.codegen.onnx.export import export_onnx, run_manifest
from meshweave.codegen.onnx.matmul_nbits import (
    QuantExportWarning,
    block_for,
    matmul_nbits,
    pack_rows,
    to_matmul_nbits,
    unpack_rows,
)
from meshweave.codegen.onnx.scalars import ScalarInputError
from meshweave.ir.ops.quant import quant_linear
from meshweave.ir.packing import pack
from meshweave.models import build_model
from meshweave.passes.quant import dequantized_model
from meshweave.passes.quant.quantizer import rtn

TOL = 1e-4


def _compile_quant(model, inputs, spec: str, **overrides):
    cfg = meshweave.QuantConfig.parse(spec, **overrides)
    return meshweave.compile(model, inputs, options=meshweave.CompileOptions(quantize=cfg))


def _nbits_nodes(path: str) -> list:
    m = onnx.load(path)
    return [n for n in m.graph.node if n.op_type == "MatMulNBits"]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# --------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_rows_is_low_bits_first(bits):
    codes = torch.randint(0, 1 << bits, (3, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (40 * bits + 7) // 8)
    assert torch.equal(unpack_rows(packed, bits, 40), codes.to(torch.int32))
    if bits == 4:  # onnxruntime: the first code is the low nibble of byte 0
        assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


@pytest.mark.parametrize("bits,k,group,sym", [(4, 64, 32, False), (4, 176, 176, False),
                                              (8, 128, 128, True), (2, 96, 32, False)])
def test_repacked_weights_compute_quant_linear(bits, k, group, sym):
    """The ONNX-side tensors, read as MatMulNBits reads them, give quant.linear's result."""
    torch.manual_seed(0)
    n = 24
    codes, scales, zeros = rtn(torch.randn(n, k), bits, group, sym)
    qw = pack(codes.T.to(torch.int32), bits)
    sc, zr = scales.T.contiguous(), None if sym else zeros.T.contiguous().to(torch.uint8)
    block = block_for(group)
    b, s, z = to_matmul_nbits(qw, sc, zr, bits, group, block)
    assert b.shape == (n, k // block, block * bits // 8) and s.shape == (n, k // block)
    x, bias = torch.randn(3, 5, k), torch.randn(n)
    want = quant_linear(x, qw, sc, zr, bias, bits=bits, group_size=group)
    got = matmul_nbits(x, b, s, z, bias, k, n, bits, block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- llama-tiny
@pytest.mark.parametrize("spec,skip", [("w4c", ()), ("w4g32", ("down_proj",))])
def test_llama_tiny_exports_matmul_nbits(spec, skip, tmp_path):
    model, inputs = build_model("llama-tiny")
    cm = _compile_quant(model, inputs, spec, skip=skip)
    layers = cm.artifacts["quantization"].layers
    repro = (f"meshweave export --model llama-tiny --quantize {spec}"
             + (f" --quant-skip {','.join(skip)}" if skip else "") + " --out /tmp/x")
    result = export_onnx(cm, str(tmp_path), list(inputs))
    nodes = _nbits_nodes(result.paths[0])
    assert len(nodes) == len(layers) and not result.notes, repro
    assert all(n.domain == "com.microsoft" for n in nodes), repro
    for node in nodes:
        a = _attrs(node)
        assert a["bits"] == 4 and a["block_size"] in (16, 32, 64) and a["K"] % a["block_size"] == 0
    # onnxruntime against meshweave's own quantized output, and the dequantized eager model
    got = run_manifest(str(tmp_path), list(inputs))[0]
    with torch.no_grad():
        ours = cm(*inputs)
        dq = dequantized_model(model, cm.graph)(*inputs)
        fp = model(*inputs)
    err = float(np.abs(got - ours.numpy()).max())
    assert err < TOL, f"max |onnxruntime - meshweave| = {err:.2e}. repro: {repro}"
    np.testing.assert_allclose(got, dq.numpy(), rtol=TOL, atol=TOL, err_msg=repro)
    # the quantization is real: the original model differs by far more than the export does
    assert float(np.abs(got - fp.numpy()).max()) > 100 * err, repro
    # the float weights of the quantized layers are gone from the file
    names = {t.name for t in onnx.load(result.paths[0]).graph.initializer}
    quantized = {layer.target for layer in layers}
    assert not names & quantized, names & quantized


# --------------------------------------------------------------------------------- small models
class _MLP(torch.nn.Module):
    def __init__(self, k: int = 64, hidden: int = 128, bias: bool = True):
        super().__init__()
        self.up = torch.nn.Linear(k, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, k, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("spec,sym", [("w8c", True), ("w2g32", False), ("w4g64", True)])
def test_bits_and_bias_in_onnxruntime(spec, sym, tmp_path):
    torch.manual_seed(0)
    model, x = _MLP().eval(), torch.randn(2, 7, 64)
    cm = _compile_quant(model, (x,), spec, symmetric=sym)
    result = export_onnx(cm, str(tmp_path), [x])  # verify: onnxruntime vs the reference
    nodes = _nbits_nodes(result.paths[0])
    assert len(nodes) == 2 and all(n.domain == "com.microsoft" for n in nodes)
    for node in nodes:  # inputs A, B, scales, zero_points, g_idx, bias
        assert (node.input[3] == "") == sym and node.input[5] != ""
        assert _attrs(node)["bits"] == int(spec[1])
    with torch.no_grad():
        want = cm(x)
    np.testing.assert_allclose(run_manifest(str(tmp_path), [x])[0], want.numpy(), rtol=TOL,
                               atol=TOL, err_msg=f"{spec} symmetric={sym}")


def test_three_bits_fall_back_to_dequantize_matmul(tmp_path):
    """onnxruntime's MatMulNBits has no 3-bit kernel: the export says so and still runs."""
    torch.manual_seed(0)
    model, x = _MLP().eval(), torch.randn(3, 64)
    cm = _compile_quant(model, (x,), "w3g32")
    with pytest.warns(QuantExportWarning, match="bits=3"):
        result = export_onnx(cm, str(tmp_path), [x])
    assert len(result.notes) == 2 and "up.weight" in result.notes[0]
    assert "not com.microsoft::MatMulNBits" in result.notes[0]
    assert "note: up.weight" in result.summary()
    m = onnx.load(result.paths[0])
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" not in ops and {"DequantizeLinear", "MatMul"} <= ops, ops
    codes = [t for t in m.graph.initializer if "onnx_codes" in t.name]
    assert len(codes) == 2 and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    with torch.no_grad():
        want = cm(x)
    np.testing.assert_allclose(run_manifest(str(tmp_path), [x])[0], want.numpy(), rtol=TOL,
                               atol=TOL)


def test_group_without_power_of_two_block_falls_back(tmp_path):
    """K=24 per channel: no power-of-two block of 16 or more divides it."""
    model, x = _MLP(k=24, hidden=32).eval(), torch.randn(3, 24)
    cm = _compile_quant(model, (x,), "w4c", skip=("down",))
    with pytest.warns(QuantExportWarning, match="group_size=24"):
        result = export_onnx(cm, str(tmp_path), [x])
    assert len(result.notes) == 1 and result.notes[0].startswith("up.weight [32x24] w4")


# --------------------------------------------------------------------------------- file size
@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_w4_file_is_about_a_quarter_of_fp16(tmp_path):
    """A Llama whose weights are mostly linear layers (hidden 256, ffn 768), both files
    written in fp16: the w4g128 file (MatMulNBits, fp16 scales, uint8 zero points, fp16
    embedding) against the unquantized fp16 file of the same model."""
    kw = dict(dtype=torch.float16, hidden_size=256, ffn_hidden_size=768, num_layers=2)
    model, inputs = build_model("llama-tiny", **kw)
    fp16 = export_onnx(meshweave.compile(model, inputs), str(tmp_path / "fp16"), list(inputs),
                       verify=False)
    cm = _compile_quant(model, inputs, "w4g128")
    q = export_onnx(cm, str(tmp_path / "w4"), list(inputs), rtol=2e-2, atol=2e-2)
    assert len(_nbits_nodes(q.paths[0])) == len(cm.artifacts["quantization"].layers)
    ratio = os.path.getsize(q.paths[0]) / os.path.getsize(fp16.paths[0])
    print(f"w4g128 / fp16 .onnx size: {ratio:.3f}")
    assert ratio < 0.35, f"{ratio:.3f}. repro: see test_quant_onnx.py::{__name__}"
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(q.paths[0]).graph.initializer}
    assert not any(a.dtype == np.float16 and a.size >= 256 * 256 for a in weights.values())


# --------------------------------------------------------------------------------- scalars
class _WithFlags(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, use_cache=False, scale=2):
        y = self.proj(x)
        return (y * scale) if not use_cache else y


def test_non_tensor_arguments_are_folded(tmp_path):
    """Regression: export_onnx raised `TypeError: value %use_cache is bool, not a tensor`."""
    model, x = _WithFlags().eval(), torch.randn(3, 8)
    kwargs = {"use_cache": False, "scale": 3}
    cm = meshweave.compile(model, (x,), kwargs)
    result = cm.export_onnx(str(tmp_path / "a"))  # synthesized inputs
    m = onnx.load(result.paths[0])
    assert [i.name for i in m.graph.input] == ["x"]
    assert [i["name"] for i in result.manifest["inputs"]] == ["x"]
    with torch.no_grad():
        want = model(x, **kwargs)
    np.testing.assert_allclose(run_manifest(str(tmp_path / "a"), [x])[0], want.numpy(),
                               rtol=TOL, atol=TOL)
    # all user inputs, scalars included, are accepted too
    export_onnx(cm, str(tmp_path / "b"), [x, False, 3])
    with pytest.raises(ScalarInputError, match="traced as 3"):
        export_onnx(cm, str(tmp_path / "c"), [x, False, 4])


@pytest.mark.slow
def test_hf_llama_use_cache_false_exports(tmp_path):
    pytest.importorskip("transformers")
    model, inputs = build_model("hf:llama")
    cm = meshweave.compile(model, inputs, {"use_cache": False})
    result = cm.export_onnx(str(tmp_path))
    assert [i.name for i in onnx.load(result.paths[0]).graph.input] == ["input_ids"]
    with torch.no_grad():
        want = model(*inputs, use_cache=False).logits
    np.testing.assert_allclose(run_manifest(str(tmp_path), list(inputs))[0], want.numpy(),
                               rtol=TOL, atol=TOL, err_msg="repro: cm.export_onnx for hf:llama")
