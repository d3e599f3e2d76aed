"""Weight quantization: packing, RTN/GPTQ, the quant.linear op and the pass through compile()."""

from __future__ import annotations

import pytest
import torch

import meshweave
from meshweave.ir.ops.quant import quant_linear
from meshweave.ir.packing import dequantize, pack, unpack
from meshweave.models import build_model
from meshweave.passes.quant import QuantizationError, dequantized_model
from meshweave.passes.quant.gptq import HessianAccumulator, gptq
from meshweave.passes.quant.quantizer import rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [32, 96, 128])
def test_pack_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (k, 7), generator=torch.Generator().manual_seed(k))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k * bits // 32, 7)
    assert torch.equal(unpack(packed, bits, k), codes.to(torch.int32))


def test_pack_4bit_is_gptq_nibble_order():
    codes = torch.arange(16).view(16, 1) % 16
    word = int(pack(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(range(8))


def test_pack_bad_input():
    with pytest.raises(ValueError, match="bits=5"):
        pack(torch.zeros(32, 2, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="outside"):
        pack(torch.full((32, 2), 16), 4)


def _dq_nk(codes, scales, zeros):
    n, k = codes.shape
    g = k // scales.shape[1]
    return ((codes.view(n, k // g, g) - zeros[..., None]) * scales[..., None]).view(n, k)


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 32, False, False), (4, 128, True, True), (3, 128, False, True), (4, None, False, False),
    (8, 64, True, False)])
def test_gptq_layer_error_below_rtn(bits, group, sym, act_order):
    torch.manual_seed(0)
    n, k = 48, 256
    w = torch.randn(n, k)
    x = torch.randn(384, k) @ torch.randn(k, k) * 0.3  # correlated features, as in real layers
    acc = HessianAccumulator(k)
    acc.add(x)
    g = group or k
    e_rtn = ((x @ (w - _dq_nk(*rtn(w, bits, g, sym))).T) ** 2).mean()
    e_gptq = ((x @ (w - _dq_nk(*gptq(w, acc.h, bits, g, sym, act_order=act_order))).T) ** 2).mean()
    assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


def test_quant_linear_matches_dequantized_matmul():
    torch.manual_seed(1)
    n, k, bits, g = 24, 64, 4, 32
    w = torch.randn(n, k)
    codes, scales, zeros = rtn(w, bits, g, symmetric=False)
    qw = pack(codes.T.to(torch.int32), bits)
    sc, zr = scales.T.contiguous(), zeros.T.contiguous().to(torch.uint8)
    w_kn = dequantize(qw, sc, zr, bits, g)
    assert torch.allclose(w_kn, _dq_nk(codes, scales, zeros).T)
    x, bias = torch.randn(3, 5, k), torch.randn(n)
    got = quant_linear(x, qw, sc, zr, bias, bits=bits, group_size=g)
    torch.testing.assert_close(got, x @ w_kn + bias)


def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_compiled_llama_tiny_matches_dequantized_eager(method):
    model, inputs = build_model("llama-tiny", batch=2, seq=16)
    model.eval()
    cal = [build_model("llama-tiny", batch=2, seq=16)[1] for _ in range(2)]
    cfg = meshweave.QuantConfig(bits=4, group_size=32, method=method, skip=("down_proj",))
    cm = meshweave.compile(model, inputs,
                           options=meshweave.CompileOptions(quantize=cfg, calibration=cal))
    ops = cm.graph.op_counts()
    assert ops.get("quant.linear", 0) >= 10 and ops.get("aten.linear.default", 0) == 2
    assert "quant.linear" in str(cm.graph)
    assert "w4g32" in cm.explain() and "saved" in cm.explain()
    with torch.no_grad():
        got = _first(cm(*inputs))
        oracle = _first(dequantized_model(model, cm.graph)(*inputs))
        fp = _first(model(*inputs))
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)
    assert (got - fp).abs().max() > 1e-4  # it really is quantized


def test_gptq_beats_rtn_end_to_end_on_llama_tiny():
    model, inputs = build_model("llama-tiny", batch=2, seq=16)
    model.eval()
    cal = [inputs] + [build_model("llama-tiny", batch=2, seq=16)[1]]
    errs = {}
    for method in ("rtn", "gptq"):
        cfg = meshweave.QuantConfig(bits=3, group_size=None, method=method, skip=("down_proj",))
        cm = meshweave.compile(model, inputs,
                               options=meshweave.CompileOptions(quantize=cfg, calibration=cal))
        with torch.no_grad():
            errs[method] = float((_first(cm(*inputs)) - _first(model(*inputs))).pow(2).mean())
    assert errs["gptq"] < errs["rtn"], errs


def test_bad_config():
    with pytest.raises(ValueError, match="bits=5"):
        meshweave.QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size=48"):
        meshweave.QuantConfig(group_size=48)
    assert meshweave.QuantConfig.parse("w4g128") == meshweave.QuantConfig(bits=4, group_size=128)
    assert meshweave.QuantConfig.parse("w8c").group_size is None
    with pytest.raises(ValueError, match="w<bits>g<group>"):
        meshweave.QuantConfig.parse("int4")


def test_bad_input_to_the_pass():
    model, inputs = build_model("llama-tiny", batch=2, seq=16)
    with pytest.raises(QuantizationError, match="does not divide K=176"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=meshweave.QuantConfig(bits=4, group_size=32)))
    with pytest.raises(QuantizationError, match="needs calibration data"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=meshweave.QuantConfig(method="gptq", group_size=None)))
