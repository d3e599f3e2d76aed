"""The W4A16 / W8A16 Triton GEMM (codegen/triton/kernels/quant_matmul.py) under the interpreter:
against ir/packing.dequantize + matmul, split-K, the GPU (autotuned) source, bad input, and a
quantized llama-tiny on backend="triton" against the eager backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import meshweave
from meshweave.codegen.triton.kernels import quant_matmul as qm
from meshweave.codegen.triton.kernels.pointwise import interpreter_loops
from meshweave.ir.packing import dequantize, pack
from meshweave.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPRO = "pytest tests/test_quant_kernel.py::{}"


def quantized(k: int, n: int, bits: int, group: int, symmetric: bool, seed: int = 0):
    """Random codes packed as the pass packs them, with scales keeping |w| around 1."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) + 0.5) * (2.0 / (1 << bits))
    zeros = None if symmetric else torch.randint(0, 1 << bits, (k // group, n), generator=g,
                                                 dtype=torch.uint8)
    return pack(codes, bits).to(DEVICE), scales.to(DEVICE), None if zeros is None else \
        zeros.to(DEVICE)


def reference(x, qw, sc, zr, bias, bits, group):
    """fp32 matmul of the activations and the weight dequantized to their dtype (the kernel
    dequantizes to the same values and accumulates in fp32)."""
    w = dequantize(qw, sc, zr, bits, group, dtype=x.dtype).float()
    out = x.float() @ w
    return out if bias is None else out + bias.float()


def check(test: str, m, k, n, bits, group, symmetric, with_bias, dtype=torch.float32,
          tile=None, lead=()):
    qw, sc, zr = quantized(k, n, bits, group, symmetric, seed=m + n + bits)
    g = torch.Generator().manual_seed(k * m)
    x = torch.randn(*lead, m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if with_bias else None
    got = qm.quant_matmul(x, qw, sc.to(dtype), zr, bias, bits, group, tile=tile)
    want = reference(x, qw, sc.to(dtype), zr, bias, bits, group)
    assert got.shape == (*lead, m, n) and got.dtype == dtype
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol,
                               msg=lambda s: f"{s}\nrepro: {REPRO.format(test)}")
    return got


@pytest.mark.parametrize("m,n,bits,group,symmetric,with_bias", [
    (1, 40, 4, 32, False, True),
    (3, 72, 4, 128, True, False),
    (16, 40, 4, None, False, False),   # per channel
    (33, 72, 4, 32, True, True),
    (1, 72, 8, 128, False, False),
    (3, 40, 8, 32, True, True),
    (16, 72, 8, None, True, True),
    (33, 40, 8, 128, False, False),
])
def test_kernel_matches_dequantized_matmul(m, n, bits, group, symmetric, with_bias):
    k = 256
    check("test_kernel_matches_dequantized_matmul", m, k, n, bits, group or k, symmetric,
          with_bias)


@pytest.mark.parametrize("bits,k,group", [(4, 176, 176), (8, 96, 32), (4, 40, 40)])
def test_k_not_a_multiple_of_the_tile(bits, k, group):
    """K steps the tile does not divide (llama-tiny's down_proj has K=176, per channel) and a
    group smaller than the K step: the scale is then loaded per row of the tile."""
    check("test_k_not_a_multiple_of_the_tile", 5, k, 24, bits, group, False, True)
    check("test_k_not_a_multiple_of_the_tile", 5, k, 24, bits, group, True, False,
          tile=qm.QuantTile(16, 32, 64, 1))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (4, 96)])
def test_row_gather_unpacking(bits, group):
    """The GATHER_ROWS variant (a word load per code row, no reshape) the GPU may pick."""
    for split in (1, 2):
        check("test_row_gather_unpacking", 5, 192, 40, bits, group, False, True,
              tile=qm.QuantTile(16, 32, 32, split, gather=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True)])
def test_dequantized_weights_are_bit_exact(dtype, bits, symmetric):
    """x = I: the kernel's output is its dequantized weight tile, which must be exactly
    dequantize()'s (fp16 dequantizes in the activation dtype, fp32 in fp32)."""
    k, n, group = 64, 40, 32
    qw, sc, zr = quantized(k, n, bits, group, symmetric)
    eye = torch.eye(k, device=DEVICE, dtype=dtype)
    got = qm.quant_matmul(eye, qw, sc.to(dtype), zr, None, bits, group)
    want = dequantize(qw, sc.to(dtype), zr, bits, group, dtype=dtype)
    assert torch.equal(got, want), (got - want).abs().max()


def test_fp16_activations_and_leading_dims():
    check("test_fp16_activations_and_leading_dims", 3, 128, 40, 4, 32, False, True,
          dtype=torch.float16, lead=(2,))
    check("test_fp16_activations_and_leading_dims", 17, 128, 40, 8, 128, True, False,
          dtype=torch.float16)


def test_split_k_is_exercised_and_deterministic():
    assert qm.interpreter_config(1, 256).split_k == 2  # the default path at small M splits K
    assert qm.interpreter_config(33, 256).split_k == 1
    test = "test_split_k_is_exercised_and_deterministic"
    one = check(test, 3, 256, 40, 4, 32, False, True, tile=qm.QuantTile(16, 32, 32, 1))
    # 8 K steps over 3 slices (3 + 3 + 2) and over more slices than steps (empty slices)
    for split in (3, 12):
        got = check(test, 3, 256, 40, 4, 32, False, True, tile=qm.QuantTile(16, 32, 32, split))
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
    again = check(test, 3, 256, 40, 4, 32, False, True, tile=qm.QuantTile(16, 32, 32, 3))
    assert torch.equal(again, check(test, 3, 256, 40, 4, 32, False, True,
                                    tile=qm.QuantTile(16, 32, 32, 3)))


def test_gpu_autotuned_source_runs_with_one_config():
    """The GPU module's kernel (autotune decorator, bucket pruning, best_config -> split-K
    reduce) run under the interpreter with its config list cut to one split-K tile."""
    mm, reduce = qm.compile_kernels(
        "\n".join(interpreter_loops(qm.quant_kernel_source(False).splitlines())) + "\n")
    assert hasattr(mm, "configs") and len(mm.configs) == sum(map(len, qm.GPU_CONFIGS.values()))
    prune = mm.early_config_prune
    for m in (1, 16, 17, 64, 300):
        kept = prune(mm.configs, {"M_BUCKET": qm.m_bucket(m)})
        assert kept and all(c.kwargs["M_BUCKET_OF"] == qm.m_bucket(m) for c in kept)
    assert {c.kwargs["BLOCK_M"] for c in prune(mm.configs, {"M_BUCKET": 16})} == {16}
    mm.configs = [c for c in mm.configs if c.kwargs["M_BUCKET_OF"] == 16
                  and c.kwargs["SPLIT_K"] == 4 and c.kwargs["BLOCK_N"] == 64
                  and not c.kwargs["GATHER_ROWS"]]
    assert len(mm.configs) == 1
    qw, sc, zr = quantized(256, 72, 4, 128, False)
    x, bias = torch.randn(2, 256, device=DEVICE), torch.randn(72, device=DEVICE)
    got = qm.quant_matmul(x, qw, sc, zr, bias, 4, 128, kernels=(mm, reduce))
    assert mm.best_config.kwargs["SPLIT_K"] == 4
    torch.testing.assert_close(got, reference(x, qw, sc, zr, bias, 4, 128), rtol=1e-5,
                               atol=1e-4)


def test_bad_input_names_what_where_and_expected():
    qw, sc, zr = quantized(64, 8, 4, 32, False)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(qm.QuantKernelError, match=r"quant_matmul: bits=3 .*expected one of"):
        qm.quant_matmul(x, pack(torch.zeros(64, 8, dtype=torch.int32), 3), sc, zr, None, 3, 32)
    with pytest.raises(qm.QuantKernelError, match=r"qweight has 8 rows; expected .*K=32"):
        qm.quant_matmul(x[:, :32], qw, sc, zr, None, 4, 32)
    with pytest.raises(qm.QuantKernelError, match=r"scales \(2, 8\) with group_size=64"):
        qm.quant_matmul(x, qw, sc, zr, None, 4, 64)
    with pytest.raises(qm.QuantKernelError, match=r"zeros torch.float32 .*expected uint8"):
        qm.quant_matmul(x, qw, sc, sc, None, 4, 32)
    with pytest.raises(qm.QuantKernelError, match=r"bias \(7,\); expected \[N\] = \[8\]"):
        qm.quant_matmul(x, qw, sc, zr, torch.zeros(7), 4, 32)
    with pytest.raises(qm.QuantKernelError, match=r"x has dtype torch.int64"):
        qm.quant_matmul(x.long(), qw, sc, zr, None, 4, 32)


def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


@pytest.fixture
def llama():
    model, inputs = build_model("llama-tiny", batch=1, seq=8)
    return model.eval(), inputs


@pytest.mark.parametrize("cfg", [
    meshweave.QuantConfig(bits=4, group_size=32, skip=("down_proj",)),
    meshweave.QuantConfig(bits=8, group_size=None, symmetric=True),  # down_proj: K=176
], ids=["w4g32", "w8c_sym"])
def test_quantized_llama_tiny_runs_the_kernel(llama, cfg, kernel_cache):
    model, inputs = llama
    runs = {}
    for backend in ("eager", "triton"):
        cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=cfg, backend=backend))
        with torch.no_grad():
            runs[backend] = _first(cm(*inputs))
    n_quant = cm.graph.op_counts()["quant.linear"]
    assert n_quant >= 13
    assert sum(k.kind == "quant" for k in cm.kernels) == n_quant, cm.explain()
    fallbacks = cm.artifacts["kernels"].fallbacks
    assert not [f for f in fallbacks if f["op"] == "quant.linear"], fallbacks
    assert f"{n_quant} quant" in cm.explain()
    assert "rt.quant_linear(" in cm.artifacts["kernels"].module_source
    torch.testing.assert_close(runs["triton"], runs["eager"], rtol=1e-4, atol=1e-4, msg=lambda
                               s: f"{s}\nrepro: {REPRO.format('test_quantized_llama_tiny')}")


def test_unsupported_bits_fall_back_with_the_reason(llama, kernel_cache):
    model, inputs = llama
    cfg = meshweave.QuantConfig(bits=3, group_size=32, skip=("down_proj",))
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
        quantize=cfg, backend="triton"))
    reasons = {f["reason"] for f in cm.artifacts["kernels"].fallbacks if f["op"] == "quant.linear"}
    assert len(reasons) == 1 and "bits=3" in reasons.pop()
    assert not any(k.kind == "quant" for k in cm.kernels)


def test_benchmark_script_runs_on_cpu(tmp_path):
    """benchmarks/quant_bench.py --cpu: the per-(shape, M) lines and the goal summary."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("TRITON_INTERPRET", None)  # the script sets it before triton is imported
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "quant_bench.py"),
                          "--cpu", "--m", "1", "32"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = [x for x in lines if re.match(r"K=\d+ N=\d+ M=\d+: ours [\d.]+ ms, cublas", x)]
    assert len(rows) == 4, out.stdout
    assert all("speedup vs cublas" in x for x in rows)
    assert any(x.strip().startswith("M<=16: worst speedup vs cublas") for x in lines)
    assert "not a performance measurement" in out.stdout
