"""Unit tests of codegen's pure parts: index arithmetic, rule tables, scheduling decisions.
No kernels run here."""

from __future__ import annotations

import pytest
import sympy
import torch
from meshweave.codegen.triton.indexing import (
    FloorDiv,
    IndexEnv,
    ModIndex,
    index_var,
    pexpr,
    reshape_index,
)
from meshweave.codegen.triton.kernels.pointwise import interpreter_loops
from meshweave.codegen.triton.kernels.reduction import REDUCTIONS
from meshweave.codegen.triton.lowering import LOWERINGS
from meshweave.codegen.triton.kernels.matmul import MATMULS
from meshweave.codegen.triton.schedule import classify
from meshweave.ir.registry import RuleTable

X = [index_var(f"x{i}") for i in range(4)]


def env(*sizes, hints=None):
    return IndexEnv({x: sympy.sympify(s) for x, s in zip(X, sizes)}, hints or {})


def test_split_view_is_linear_and_merge_uses_div_mod():
    assert reshape_index([2, 8, 64], [2, 8, 4, 16], tuple(X), env(2, 8, 4, 16)) == (
        X[0],
        X[1],
        16 * X[2] + X[3],
    )
    merged = reshape_index([2, 8, 64], [2, 512], tuple(X[:2]), env(2, 512))
    assert [pexpr(e) for e in merged] == ["x0", "((x1) // (64))", "((x1) % (64))"]


def test_size_one_dims_and_symbolic_sizes():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    idx = reshape_index(
        [s0 * 8, 1, 64],
        [s0, 8, 64],
        tuple(X[:3]),
        IndexEnv({X[0]: s0, X[1]: sympy.Integer(8), X[2]: sympy.Integer(64)}, {s0: 2}),
    )
    assert idx == (8 * X[0] + X[1], 0, X[2])


def test_printing_is_exact_integer_arithmetic():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    assert pexpr(2 * s0 * FloorDiv(3 * X[0] + X[1], s0)) == "2*s0*((3*x0 + x1) // (s0))"
    assert pexpr(ModIndex(X[0], 8) * 64 + X[1]) == "x1 + 64*((x0) % (8))"


def test_interpreter_loops_rewrites_range_loops():
    src = [
        "acc = 0",
        "for k0 in range(0, K, BLOCK_K):",
        "    a = f(k0,",
        "          k0)",
        "    acc += a",
        "out = acc",
    ]
    assert interpreter_loops(src) == [
        "acc = 0",
        "k0 = 0",
        "while k0 < K:",
        "    a = f(k0,",
        "          k0)",
        "    acc += a",
        "    k0 += BLOCK_K",
        "out = acc",
    ]


def test_rule_tables_are_registered_tables():
    for table, kind in (
        (LOWERINGS, "triton_lowering"),
        (REDUCTIONS, "triton_reduction"),
        (MATMULS, "triton_matmul"),
    ):
        assert RuleTable.tables[kind] is table
    assert "aten.gelu.default" in LOWERINGS and "aten.native_layer_norm.default" in REDUCTIONS
    assert "aten.linear.default" in MATMULS and "aten.topk.default" not in LOWERINGS


def test_classification_reasons():
    import meshweave

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.topk(x.exp(), 2)[0], (x.double() * 2), x.bfloat16().float()[:, :2]

    cm = meshweave.compile(M(), (torch.randn(3, 4),))
    kinds = {n.op: classify(n, cm.graph.hints(), True, {}) for n in cm.graph.nodes}
    assert kinds["aten.exp.default"] == ("pointwise", "")
    assert kinds["aten.mul.Tensor"][0] == "fallback"
    assert "dtype f64" in kinds["aten.mul.Tensor"][1]
    assert "no Triton lowering" in kinds["aten.topk.default"][1]
    assert "under the Triton interpreter" in kinds["aten._to_copy.default"][1]  # bf16
    assert (
        classify(next(n for n in cm.graph.nodes if n.op == "aten.slice.Tensor"), {}, True, {})[0]
        == "view"
    )


def test_matmul_policies_and_their_candidates(monkeypatch, tmp_path):
    from meshweave.codegen import CodegenConfig
    from meshweave.codegen.triton.runtime import TORCH, MatmulChooser

    auto = MatmulChooser("auto", interpret=False, path=None)
    tune = MatmulChooser("autotune", interpret=False, path=None)
    # auto: cuBLAS against the largest tile that still fills the GPU and the next one down
    assert auto.candidates(4096, 768, 3072, itemsize=2) == [
        TORCH, (128, 128, 64, 8, 3), (128, 128, 32, 8, 3)]
    assert auto.candidates(4096, 50257, 768, itemsize=2)[1] == (128, 256, 64, 8, 3)
    # fp32 blocks of (128, 128, 64) in 3 stages need 192 KiB of shared memory: not offered
    assert auto.candidates(4096, 768, 3072, itemsize=4) == [
        TORCH, (128, 128, 32, 8, 3), (128, 64, 32, 4, 4)]
    # a small output: no tile fills the GPU, so the smallest (cuBLAS may still win)
    assert auto.candidates(128, 768, 768, itemsize=2) == [TORCH, (16, 64, 64, 4, 3)]
    assert auto.candidates(8, 768, 768) == [TORCH, (16, 64, 64, 4, 3)]
    many = tune.candidates(512, 3072, 768)
    assert many[:3] == auto.candidates(512, 3072, 768) and len(many) >= 5
    assert len(set(many)) == len(many)
    # nothing is timed under the interpreter, whatever the policy
    calls = []
    interp = MatmulChooser("autotune", interpret=True, path=None)
    assert interp.choose("k", 8, 8, 8, calls.append) == interp.default_config(8, 8, 8)
    assert calls == []
    monkeypatch.setenv("MESHWEAVE_MATMUL", "autotune")
    assert CodegenConfig().matmul == "autotune"
    monkeypatch.setenv("MESHWEAVE_MATMUL", "fastest")
    with pytest.raises(ValueError, match="MESHWEAVE_MATMUL"):
        CodegenConfig()
