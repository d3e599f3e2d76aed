"""moe.experts lowered by the Triton backend (schedule: its own "moe" group; wrapper:
rt.moe_experts; runtime: the grouped GEMM): a hand-built graph against the reference executor,
the "torch" policy's eager rule, the precompile warm-up, moe-tiny end to end, and the GPU
kernel source compiled for sm_90 without a GPU."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from moe_helpers import DEVICE, TOL, moe_graph, routing

import meshweave
from meshweave.codegen import CodegenConfig, attach_triton_backend
from meshweave.runtime.reference import run_graph

REPRO = "pytest tests/test_moe_lowering.py::{}"


def triton_runner(graph, tmp_path, matmul="auto"):
    holder = SimpleNamespace(graph=graph, options=meshweave.CompileOptions(), artifacts={},
                             kernels=[], _runner=None)
    attach_triton_backend(holder, CodegenConfig(matmul=matmul, cache_dir=str(tmp_path)))
    return holder


@pytest.mark.parametrize("layout,gate,dtype,cf", [
    ("kn", "fused", torch.float32, None),
    ("nk", "separate", torch.float16, None),
    ("kn", "none", torch.float32, 0.75),
])
def test_graph_with_moe_experts_on_triton_matches_reference(tmp_path, layout, gate, dtype, cf):
    graph = moe_graph(9, 32, 24, 4, 2, layout, gate, dtype, cf)
    meshweave.ir.verify(graph)
    holder = triton_runner(graph, tmp_path)
    art = holder.artifacts["kernels"]
    assert [k.kind for k in holder.kernels] == ["moe", "pointwise"]
    assert not art.fallbacks, art.fallbacks
    assert "rt.moe_experts(triton_moe_grouped_gemm" in art.module_source
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    weights, ids = routing(9, 4, 2, seed=4)
    got = holder._runner([x, weights, ids])
    want = run_graph(graph, [x, weights, ids])
    rtol, atol = TOL[dtype]
    repro = REPRO.format("test_graph_with_moe_experts_on_triton_matches_reference")
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol,
                               msg=lambda s: f"{s}\nrepro: {repro}")
    assert int(got[1]) == int(want[1]) and (cf is None) == (int(got[1]) == 0), repro


def test_torch_policy_runs_the_eager_rule(tmp_path):
    graph = moe_graph(5, 16, 16, 3, 2, "kn", "fused", torch.float32)
    holder = triton_runner(graph, tmp_path, matmul="torch")
    x = torch.randn(5, 16).to(DEVICE)
    weights, ids = routing(5, 3, 2)
    got = holder._runner([x, weights, ids])
    torch.testing.assert_close(got[0], run_graph(graph, [x, weights, ids])[0])


_SM90_COMPILE = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshweave.codegen.triton.kernels.grouped_gemm import choose_tile, load_kernel

kernel = load_kernel(False)
names = kernel.arg_names
shared = []
for dt, gated, scale in json.loads(sys.argv[1]):
    size = 2 if dt != "fp32" else 4
    tile = choose_tile(4096, 8, 14336, 4096, False, size, gated)
    sig = {n: "i32" for n in names}
    sig.update(X="*" + dt, Rows="*i32", W="*" + dt, Wg="*" + dt, Scale="*fp32",
               Out="*fp32" if scale else "*" + dt, OutRows="*i64", TileExpert="*i32",
               TileRow="*i32", TileEnd="*i32")
    consts = dict(HAS_ROWS=not scale, HAS_OUT_ROWS=scale, GATED=gated,
                  ACT="silu" if gated else "none", HAS_SCALE=scale, PRECISION="tf32",
                  BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
    sig.update({c: "constexpr" for c in consts})
    # what Triton's launcher specializes: 16-byte aligned pointers, sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(names.index(c),): v for c, v in consts.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": tile.warps, "num_stages": tile.stages})
    assert len(out.asm["cubin"]) > 0
    shared.append(out.metadata.shared)
print("shared", json.dumps(shared))
"""


def test_gpu_source_compiles_for_h100_without_a_gpu(tmp_path):
    """The GPU (non-interpreted) kernel text through Triton's whole compiler to an sm_90
    cubin, for the tiles choose_tile picks at Mixtral sizes; each fits H100 shared memory
    (227 KiB). Nothing is launched. Runs in its own process: TRITON_INTERPRET is read when
    triton is imported."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    cases = [["fp16", True, False], ["bf16", False, True], ["fp32", True, False]]
    out = subprocess.run([sys.executable, "-c", _SM90_COMPILE, json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    if out.returncode and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("this triton has no ptxas to assemble sm_90 code")
    assert out.returncode == 0, out.stderr[-3000:]
    shared = json.loads(out.stdout.split("shared", 1)[1])
    assert len(shared) == 3 and all(0 < s <= 227 * 1024 for s in shared), shared


def test_moe_tiny_on_triton_runs_the_grouped_kernel(kernel_cache):
    """meshweave.compile(moe-tiny, backend="triton"): the recognised moe.experts blocks run
    as grouped-GEMM launches, and the logits equal the model's eager forward."""
    from meshweave.models import build_model

    model, inputs = build_model("moe-tiny")
    model = model.eval()
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(backend="triton"))
    n_moe = cm.graph.op_counts().get("moe.experts", 0)
    assert n_moe >= 1, cm.explain()
    assert sum(k.kind == "moe" for k in cm.kernels) == n_moe
    assert f"{n_moe} moe" in cm.explain()
    fallbacks = cm.artifacts["kernels"].fallbacks
    assert not [f for f in fallbacks if f["op"] == "moe.experts"], fallbacks
    with torch.no_grad():
        got, want = cm(*inputs), model(*inputs)
    got, want = (v[0] if isinstance(v, (tuple, list)) else v for v in (got, want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda s: f"{s}\nrepro: "
                               f"{REPRO.format('test_moe_tiny_on_triton_runs_the_grouped_kernel')}")


def test_warming_runtime_launches_nothing():
    """While precompile.py warms a module, rt.moe_experts returns buffers of the right
    shape without sorting (possibly garbage) ids or launching."""
    from meshweave.codegen.triton.runtime import KernelRuntime

    graph = moe_graph(5, 16, 16, 3, 2, "kn", "fused", torch.float32)
    rt = KernelRuntime(graph, interpret=True)
    rt.warming = True
    bad_ids = torch.full((5, 2), 99, dtype=torch.int64, device=DEVICE)
    x = torch.randn(5, 16, device=DEVICE)
    y, dropped = rt.moe_experts(None, x, torch.rand(5, 2, device=DEVICE), bad_ids,
                                graph.tensors["w_in"], None, graph.tensors["w_out"],
                                act="silu", layout="kn", fused_gate_up=True,
                                capacity_factor=None)
    assert y.shape == x.shape and dropped.shape == () and dropped.dtype == torch.int64


def test_classification_and_mixed_dtype_fallback():
    """moe.experts classifies as its own "moe" kernel; with x and the expert weights in two
    dtypes it stays on the reference executor, saying why."""
    from meshweave.codegen.triton.schedule import classify
    from meshweave.ir.types import TensorType

    graph = moe_graph(4, 16, 16, 2, 1, "kn", "separate", torch.float32)
    node = graph.nodes[0]
    assert classify(node, {}, True, {}) == ("moe", "")
    w_out = node.args[5]
    w_out.type = TensorType(w_out.type.shape, torch.float16, DEVICE)
    kind, reason = classify(node, {}, True, {})
    assert kind == "fallback" and "grouped GEMM takes one dtype" in reason, reason
