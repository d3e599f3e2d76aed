"""Triton codegen: numerics against the reference executor, kernel structure, generated source.

Without a GPU the generated kernels run under Triton's interpreter, which must be switched on
before triton is first imported (torch.export imports it), hence the preamble.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ast

import pytest
import torch.nn.functional as F
from meshweave.codegen import CodegenConfig, attach_triton_backend
from meshweave.models.gpt import Block, GPTConfig
from meshweave.runtime.reference import run_graph

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPRO = "pytest tests/test_codegen.py::{}"


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWEAVE_CACHE_DIR", str(tmp_path / "cache"))


def compile_triton(model, args, **opts):
    return meshweave.compile(model, args, options=CompileOptions(backend="triton", **opts))


def assert_close(got, ref, atol, rtol, test: str):
    torch.testing.assert_close(
        got.float(),
        ref.float(),
        atol=atol,
        rtol=rtol,
        equal_nan=True,
        msg=lambda m: f"{m}\nrepro: {REPRO.format(test)}",
    )


def assert_no_worse_than_eager(
    got, eager, ref32, test: str, slack: float = 2.0, atol: float = 2e-3
):
    """Low precision: our error against the fp32 reference is within `slack` x eager's."""
    ours = (got.float() - ref32).abs().max().item()
    theirs = (eager.float() - ref32).abs().max().item()
    assert ours <= slack * theirs + atol, (
        f"error {ours:.3g} vs eager's {theirs:.3g}\nrepro: {REPRO.format(test)}"
    )


def gpt_block(dtype=torch.float32):
    torch.manual_seed(0)
    block = Block(GPTConfig(hidden_size=64, num_heads=4)).to(DEVICE, dtype).eval()
    for p in block.parameters():  # the zoo zero-inits biases; make every epilogue matter
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 8, 64, device=DEVICE, dtype=dtype)
    return block, x


# --- (1) a GPT block matches the reference executor -----------------------------------------
def test_gpt_block_fp32_matches_reference():
    block, x = gpt_block()
    cm = compile_triton(block, (x,))
    got = cm(x)
    ref = run_graph(cm.graph, [x])[0]
    assert_close(got, ref, 1e-5, 1e-5, "test_gpt_block_fp32_matches_reference")
    assert_close(got, block(x), 1e-5, 1e-5, "test_gpt_block_fp32_matches_reference")


def test_gpt_block_fp16_no_worse_than_eager():
    block, x = gpt_block(torch.float16)
    # verify=False: the IR's LayerNorm shape rule types fp16 statistics as fp32 (eager
    # returns fp16); reported to the IR owners. The statistics are unused here.
    cm = compile_triton(block, (x,), verify=False)
    got = cm(x)
    ref32 = block.float()(x.float())
    eager = block.half()(x)
    assert got.dtype == torch.float16
    assert_no_worse_than_eager(got, eager, ref32, "test_gpt_block_fp16_no_worse_than_eager")


# --- (2) structure ----------------------------------------------------------------------------
# Kernel bound for one pre-LN GPT block: 4 matmuls (qkv, out-proj, fc_in, fc_out), 1 flash
# attention, 2 LayerNorms = 7. Everything else must fuse: the biases and GELU into matmul
# epilogues, the second residual add into fc_out's epilogue, the first residual add into the
# second LayerNorm's kernel, and the q/k/v split/view/permute and head merge are views.
GPT_BLOCK_MAX_KERNELS = 7


def test_gpt_block_kernel_structure():
    block, x = gpt_block()
    cm = compile_triton(block, (x,))
    kernels = cm.kernels
    assert len(kernels) <= GPT_BLOCK_MAX_KERNELS, [k.name for k in kernels]
    assert sum(k.kind == "matmul" for k in kernels) == 4
    assert sum(k.kind == "attention" for k in kernels) == 1
    ln_add = [
        k
        for k in kernels
        if k.kind == "reduction"
        and "aten.add.Tensor" in k.ops
        and "aten.native_layer_norm.default" in k.ops
    ]
    assert len(ln_add) == 1, [(k.name, k.ops) for k in kernels]
    assert ln_add[0].name.startswith("triton_red_add_native_layer_norm")
    epilogues = {tuple(k.ops) for k in kernels if k.kind == "matmul"}
    assert ("aten.linear.default", "aten.gelu.default") in epilogues
    assert ("aten.linear.default", "aten.add.Tensor") in epilogues
    assert not cm.artifacts["kernels"].fallbacks
    covered = [n for k in kernels for n in k.nodes]
    assert len(covered) == len(set(covered))  # every node in exactly one kernel


def test_gpt_tiny_kernel_count():
    from meshweave.models import build_model

    model, (ids,) = build_model("gpt-tiny", device=DEVICE, batch=1, seq=8)
    cm = compile_triton(model, (ids,))
    # 7 per block, except that each block's first LayerNorm shares the previous residual add
    # (or the embedding sum) kernel: 1 (emb + LN) + 6 + 7 + (add + ln_f) + lm_head = 16.
    assert len(cm.kernels) == 16, [k.name for k in cm.kernels]
    assert cm.kernels[0].ops[:3] == [
        "aten.embedding.default",
        "aten.embedding.default",
        "aten.add.Tensor",
    ]
    assert_close(cm(ids), model(ids), 1e-5, 1e-5, "test_gpt_tiny_kernel_count")


# --- (4) generated source: parses, readable, names its nodes -----------------------------------
def test_generated_source_parses_and_names_nodes(tmp_path):
    block, x = gpt_block()
    cm = compile_triton(block, (x,))
    art = cm.artifacts["kernels"]
    tree = ast.parse(art.module_source)
    defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "call" in defs
    for k in cm.kernels:
        assert k.name in defs
        ast.parse(k.source)
        assert k.sources and all("gpt.py" in s for s in k.sources)
    for node in cm.graph.nodes:
        if node.op not in (
            "aten.view.default",
            "aten.permute.default",
            "aten.split_with_sizes.default",
        ):
            assert f"%{node.outputs[0].name} " in art.module_source, node
    red = next(k for k in cm.kernels if k.kind == "reduction")
    assert "# IR nodes" in red.source and "models/gpt.py" in red.source
    files = cm.dump(str(tmp_path / "dump"))
    assert any(f.endswith("kernels.py") for f in files)
    with open(next(f for f in files if f.endswith("kernels.txt"))) as f:
        listing = f.read()
    assert "triton_red_add_native_layer_norm" in listing
    assert "Triton launch sites" in cm.explain()


# --- (6) matmul template with bias + gelu + residual epilogue ----------------------------------
class LinearGeluResidual(torch.nn.Module):
    def __init__(self, k=48, n=80):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x, res):
        return F.gelu(self.fc(x)) + res


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_epilogue(variant, dtype):
    test = f"test_matmul_epilogue[{dtype}-{variant}]"
    torch.manual_seed(0)
    model = LinearGeluResidual().to(DEVICE, dtype)
    x = torch.randn(3, 7, 48, device=DEVICE, dtype=dtype)
    res = torch.randn(3, 7, 80, device=DEVICE, dtype=dtype)
    cm = meshweave.compile(model, (x, res), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(matmul=variant))
    assert [k.ops for k in cm.kernels] == [
        ["aten.linear.default", "aten.gelu.default", "aten.add.Tensor"]
    ]
    got = cm(x, res)
    if dtype == torch.float32:
        assert_close(got, model(x, res), 1e-5, 1e-5, test)
    else:
        ref32 = model.float()(x.float(), res.float())
        assert_no_worse_than_eager(got, model.half()(x, res), ref32, test)


@pytest.mark.parametrize("variant", ["triton", "torch"])
def test_linear_bias_only_goes_to_cublas_epilogue(variant):
    """A linear layer with nothing fused: cuBLAS (torch.addmm) adds the bias itself."""
    test = f"test_linear_bias_only_goes_to_cublas_epilogue[{variant}]"
    torch.manual_seed(0)
    model = torch.nn.Linear(48, 80).to(DEVICE)
    x = torch.randn(3, 7, 48, device=DEVICE)
    cm = meshweave.compile(model, (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(matmul=variant))
    src = cm.artifacts["kernels"].module_source
    assert "bias=arg_p_bias" in src and "direct_out=buf_" in src, src[src.find("rt.matmul"):]
    assert_close(cm(x), model(x), 1e-5, 1e-5, test)


def test_bmm_and_addmm_template():
    class M(torch.nn.Module):
        def forward(self, a, b, bias, c):
            return torch.bmm(a, b).relu(), torch.addmm(bias, c, c.t(), beta=0.5, alpha=2.0)

    a, b = torch.randn(3, 5, 20), torch.randn(3, 20, 17)
    bias, c = torch.randn(9), torch.randn(9, 33)
    args = tuple(t.to(DEVICE) for t in (a, b, bias, c))
    cm = compile_triton(M(), args)
    assert all(k.kind == "matmul" for k in cm.kernels), [k.name for k in cm.kernels]
    for got, ref in zip(cm(*args), M()(*args)):
        assert_close(got, ref, 1e-4, 1e-5, "test_bmm_and_addmm_template")


class Conv1DGeluResidual(torch.nn.Module):
    """HF GPT-2's Conv1D: addmm on the flattened rows, then a view back to [b, s, n]."""

    def __init__(self, k=24, n=40):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(k, n) * 0.2)
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, res):
        b, s, k = x.shape
        h = torch.addmm(self.b, x.view(-1, k), self.w).view(b, s, -1)
        y = F.gelu(h) + res
        # a transposed read of the matmul output is not the flat identity: it must not fuse
        # into the epilogue (it still has to be right)
        z = h.view(b * s, -1).t() * 2.0
        return y, z


@pytest.mark.parametrize("variant", ["triton", "torch"])
def test_matmul_epilogue_through_view(variant):
    test = f"test_matmul_epilogue_through_view[{variant}]"
    torch.manual_seed(0)
    model = Conv1DGeluResidual().to(DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    res = torch.randn(3, 5, 40, device=DEVICE)
    cm = meshweave.compile(model, (x, res), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(matmul=variant))
    mm = [k for k in cm.kernels if k.kind == "matmul"]
    assert [k.ops for k in mm] == [["aten.addmm.default", "aten.gelu.default", "aten.add.Tensor"]]
    assert len(cm.kernels) == 2, [k.ops for k in cm.kernels]  # + the transposed consumer
    got = cm(x, res)
    ref = run_graph(cm.graph, [x, res])
    for g, r, e in zip(got, ref, model(x, res)):
        assert_close(g, r, 1e-5, 1e-5, test)
        assert_close(g, e, 1e-5, 1e-5, test)


def test_hf_gpt2_epilogue_fuses_through_view():
    """HF GPT-2 (Conv1D = addmm -> view): the tanh-GELU after c_fc fuses into its addmm."""
    pytest.importorskip("transformers")
    from meshweave.models import build_model

    model, inputs = build_model("hf:gpt2", device=DEVICE, batch=2, seq=8)
    cm = compile_triton(model, inputs)
    kernels = cm.kernels
    # 2 layers, before: 18 launch sites (the GELU of each layer was its own pointwise kernel)
    assert len(kernels) == 16, [(k.name, k.ops) for k in kernels]
    assert not [k for k in kernels if k.kind == "pointwise"], [k.name for k in kernels]
    gelu = [k for k in kernels if k.kind == "matmul" and "aten.tanh.default" in k.ops]
    assert len(gelu) == 2, [(k.name, k.ops) for k in kernels]
    by_name = {n.outputs[0].name: n for n in cm.graph.nodes}
    for k in gelu:
        assert by_name[k.nodes[0]].op == "aten.addmm.default"
        assert any(by_name[n].op == "aten.tanh.default" for n in k.nodes)
    covered = [n for k in kernels for n in k.nodes]
    assert len(covered) == len(set(covered))
    import torch.utils._pytree as pytree

    got = pytree.tree_leaves(cm(*inputs))
    ref = run_graph(cm.graph, list(inputs))
    for g, r in zip(got, ref):
        assert_close(g, r, 2e-5, 2e-5, "test_hf_gpt2_epilogue_fuses_through_view")


# --- fusion of reductions with producers and consumers ---------------------------------------
class Norms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32))

    def forward(self, x, y):
        h = x * 2.0 + y
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        sm = torch.softmax(h, dim=-1)
        lsm = torch.log_softmax(x.permute(0, 2, 1), dim=1)
        stats = (x.sum(dim=1), x.amax(dim=(0, 2)), x.var(dim=-1), x.mean())
        return rms, sm, lsm, stats


def test_reductions_fuse_and_match():
    x = torch.randn(2, 6, 32, device=DEVICE)
    y = torch.randn(6, 32, device=DEVICE)
    model = Norms().to(DEVICE)
    cm = compile_triton(model, (x, y))
    got, ref = cm(x, y), model(x, y)
    flat_got, flat_ref = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)
    for g, r in zip(flat_got, flat_ref):
        assert_close(g, r, 1e-5, 1e-5, "test_reductions_fuse_and_match")
    fused = [k for k in cm.kernels if "aten.mean.dim" in k.ops]
    assert fused and {"aten.mul.Tensor", "aten.rsqrt.default"} <= set(fused[0].ops)
    assert any("aten._softmax.default" in k.ops and "aten.mean.dim" in k.ops for k in cm.kernels), (
        "softmax over the same rows should share the RMS kernel"
    )


# --- views, gathers, concatenation and pointwise op coverage ---------------------------------
class Pointwise(torch.nn.Module):
    def forward(self, x, y, ids, m):
        a = torch.cat([x[:, :3].neg(), x[:, 3:].exp()], dim=1)
        b = torch.where(m, a.sigmoid(), torch.tanh(y.transpose(0, 1)))
        c = F.silu(b) + F.relu(x) * F.leaky_relu(x, 0.1) - F.elu(x).abs()
        d = torch.clamp(c, -1.0, 2.0).sqrt().log1p() + x.pow(3) / (1.0 + x * x)
        e = F.embedding(ids, y.t()) + F.pad(x, (1, 1))[:, 1:-1]
        f = (x > 0.5) | (y.t() < 0)
        g = (
            torch.maximum(x, y.t()) * torch.minimum(x, y.t() * 0.5).clamp_max(0.25)
            + torch.erf(x)
            + F.softplus(x)
        )
        h = x.unsqueeze(0).expand(2, 5, 7).reshape(10, 7)[3:8] * 3 + torch.arange(7, device=x.device)
        return a, b, c, d, e, f, g, h, x.to(torch.float16).to(torch.float32), F.hardswish(x)


class LongRows(torch.nn.Module):
    def forward(self, x, y):
        h = x * 2.0 + y
        return (
            torch.softmax(h, -1),
            torch.log_softmax(x, -1),
            h.sum(-1),
            x.mean(-1, keepdim=True),
            x.amax(-1),
            F.layer_norm(x, (x.shape[-1],)),
        )


def test_looped_reductions_over_long_rows():
    """Rows longer than a persistent tile (> MAX_PERSISTENT_RNUMEL) compile as looped
    reductions (online max + sum for softmax) instead of falling back to the reference."""
    from meshweave.codegen.triton.kernels.reduction import MAX_PERSISTENT_RNUMEL

    torch.manual_seed(0)
    x, y = torch.randn(3, 20000, device=DEVICE), torch.randn(3, 20000, device=DEVICE)
    assert x.shape[-1] > MAX_PERSISTENT_RNUMEL
    x[1, 5:] = float("-inf")  # a row that is almost all -inf (the online max starts at -inf)
    x[2, 7:] = -1e4
    cm = compile_triton(LongRows(), (x, y))
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks
    assert all(k.kind == "reduction" for k in cm.kernels)
    assert all("roffset" in k.source for k in cm.kernels), [k.source for k in cm.kernels]
    got = cm(x, y)
    ref = run_graph(cm.graph, [x, y])
    test = "test_looped_reductions_over_long_rows"
    for i in (0, 1, 5):  # softmax, log_softmax, layer_norm (full rows)
        assert_close(got[i], ref[i], 1e-5, 1e-5, test)
    assert_close(got[2], ref[2], 1e-3, 1e-5, test)  # sums of 20000 terms: order differs
    assert_close(got[3], ref[3], 1e-5, 1e-5, test)
    assert_close(got[4], ref[4], 0, 0, test)


def test_pointwise_views_and_gathers():
    torch.manual_seed(0)
    x, y = torch.randn(5, 7), torch.randn(7, 5)
    ids = torch.randint(0, 5, (5,))
    m = torch.rand(5, 7) > 0.5
    args = tuple(t.to(DEVICE) for t in (x, y, ids, m))
    cm = compile_triton(Pointwise(), args)
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks
    for i, (g, r) in enumerate(zip(cm(*args), Pointwise()(*args))):
        assert g.dtype == r.dtype, i
        assert_close(g, r, 2e-5, 2e-5, "test_pointwise_views_and_gathers")


def test_views_are_index_arithmetic():
    class M(torch.nn.Module):
        def forward(self, x):
            return (x.view(2, 3, 4, 5).permute(0, 3, 1, 2)[:, 1:4].transpose(1, 2) + 1.0).exp()

    x = torch.randn(6, 20, device=DEVICE)
    cm = compile_triton(M(), (x,))
    assert len(cm.kernels) == 1 and cm.kernels[0].kind == "pointwise"
    assert "aten.permute" not in cm.artifacts["kernels"].module_source.split("def call")[1]
    assert_close(cm(x), M()(x), 1e-6, 1e-6, "test_views_are_index_arithmetic")


# --- (7) fallback ops run through the reference executor and are listed -----------------------
def test_fallback_op_listed_and_correct():
    class M(torch.nn.Module):
        def forward(self, x):
            v, i = torch.topk(x.relu(), 3, dim=-1)  # no Triton lowering for topk
            return v * 2.0 + 1.0, i

    x = torch.randn(4, 10, device=DEVICE)
    cm = compile_triton(M(), (x,))
    fallbacks = cm.artifacts["kernels"].fallbacks
    assert [f["op"] for f in fallbacks] == ["aten.topk.default"]
    assert "no Triton lowering" in fallbacks[0]["reason"]
    assert "aten.topk.default" in cm.explain()
    got, ref = cm(x), M()(x)
    assert_close(got[0], ref[0], 1e-6, 1e-6, "test_fallback_op_listed_and_correct")
    assert torch.equal(got[1], ref[1])
    assert len(cm.kernels) == 2  # relu before, mul+add after


def test_unsupported_dtype_falls_back_with_reason():
    class M(torch.nn.Module):
        def forward(self, x, y):
            return (x.double() * 3).sum(-1), y + 1

    x, y = torch.randn(4, 5, device=DEVICE), torch.randn(3, device=DEVICE)
    cm = compile_triton(M(), (x, y))
    reasons = {f["op"]: f["reason"] for f in cm.artifacts["kernels"].fallbacks}
    assert "dtype f64 is not supported" in reasons["aten.mul.Tensor"]
    assert [k.ops for k in cm.kernels] == [["aten.add.Tensor"]]
    got, ref = cm(x, y), M()(x, y)
    assert got[0].dtype == torch.float64
    assert_close(got[0], ref[0], 1e-6, 1e-6, "test_unsupported_dtype_falls_back_with_reason")


def test_invalid_backend_name():
    with pytest.raises(ValueError, match="backend"):
        CompileOptions(backend="cuda-graphs")
    with pytest.raises(ValueError, match="cuda_graphs=True .* needs backend='triton'"):
        CompileOptions(backend="eager", cuda_graphs=True)
    if not torch.cuda.is_available():  # CPU tensors cannot be graphed
        x = torch.randn(2, 4)
        with pytest.raises(ValueError, match="needs the triton backend on CUDA tensors"):
            compile_triton(torch.nn.Linear(4, 4), (x,), cuda_graphs=True)
    with pytest.raises(ValueError, match="matmul"):
        CodegenConfig(matmul="cublas")


# --- dynamic shapes: symbolic dims are kernel arguments ---------------------------------------
def test_dynamic_batch_and_seq():
    from meshweave.models import build_model

    model, (ids,) = build_model("llama-tiny", batch=2, seq=8)
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)}
    cm = meshweave.compile(
        model, (ids,), dynamic_shapes=(dims,), options=CompileOptions(backend="triton")
    )
    src = cm.artifacts["kernels"].module_source
    assert "arg_input_ids.shape[0]" in src and "arg_input_ids.shape[1]" in src
    for b, s in ((1, 5), (3, 12)):
        x = torch.randint(0, 128, (b, s), device=DEVICE)
        assert_close(cm(x), model(x), 2e-5, 2e-5, f"test_dynamic_batch_and_seq ({b}x{s})")


def test_unfused_config_matches():
    block, x = gpt_block()
    cm = meshweave.compile(block, (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(fuse=False))
    assert len(cm.kernels) > GPT_BLOCK_MAX_KERNELS
    assert_close(cm(x), block(x), 1e-5, 1e-5, "test_unfused_config_matches")


class MoreIndexed(torch.nn.Module):
    def forward(self, x, idx, n):
        a = torch.index_select(x, 1, idx) * 2
        b = torch.tril(x, diagonal=1) + torch.triu(x, diagonal=-1)
        c = x.masked_fill(x > 0.3, -1.0) + torch.arange(0.5, 3.5, 0.5, device=x.device)
        d = torch.remainder(x * 5, 1.5) + torch.div(x * 7, 2, rounding_mode="floor")
        e = x[:, None, :].expand(4, 3, 6).transpose(0, 1).contiguous() * n.shape[0]
        return a, b, c, d, e


def test_more_indexed_ops():
    torch.manual_seed(0)
    x = torch.randn(4, 6, device=DEVICE)
    idx = torch.tensor([5, 0, 3, 3], device=DEVICE)
    n = torch.zeros(3, device=DEVICE)
    cm = compile_triton(MoreIndexed(), (x, idx, n))
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks
    for g, r in zip(cm(x, idx, n), MoreIndexed()(x, idx, n)):
        assert_close(g, r, 1e-5, 1e-5, "test_more_indexed_ops")


def test_kernel_that_fails_to_emit_falls_back_with_reason(monkeypatch):
    from meshweave.codegen.triton.lowering import LOWERINGS, Pointwise
    from meshweave.codegen.triton.tvalues import CodegenError

    def broken(node, a):
        raise CodegenError("simulated emitter bug")

    monkeypatch.setitem(LOWERINGS.rules, "aten.sin.default", Pointwise(broken))

    class M(torch.nn.Module):
        def forward(self, x):
            return (x.exp().sin() + 1).softmax(-1)

    x = torch.randn(3, 5, device=DEVICE)
    cm = meshweave.compile(M(), (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(use_cache=False))
    reasons = {f["op"]: f["reason"] for f in cm.artifacts["kernels"].fallbacks}
    assert "simulated emitter bug" in reasons["aten.sin.default"]
    assert_close(cm(x), M()(x), 1e-6, 1e-6, "test_kernel_that_fails_to_emit_falls_back_with_reason")


def test_kernels_precompile_in_parallel_on_the_gpu_only():
    block, x = gpt_block()
    cm = compile_triton(block, (x,))
    assert cm._runner.precompiled is None
    assert_close(cm(x), block(x), 1e-5, 1e-5, "test_kernels_precompile_in_parallel_on_the_gpu_only")
    status = cm._runner.precompiled
    if torch.cuda.is_available():
        assert status.startswith("compiled "), status
    else:
        assert status == "skipped: the interpreter compiles nothing"


class ReductionThenIndexed(torch.nn.Module):
    def forward(self, x):
        s = torch.softmax(x, dim=-1)
        return s.flip(-1) + torch.cat([s[..., 16:], s[..., :16]], dim=-1) * 2.0


def test_indexed_consumer_of_a_reduction_gets_its_own_kernel():
    """flip/cat read a softmax row at other positions than the reduction kernel holds: they
    must not join it (found by the random-program fuzzer: 'computed per row but read at
    (x0, 32 - r0)')."""
    x = torch.randn(3, 33, device=DEVICE)
    cm = compile_triton(ReductionThenIndexed(), (x,))
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks
    assert_close(cm(x), ReductionThenIndexed()(x), 1e-5, 1e-5,
                 "test_indexed_consumer_of_a_reduction_gets_its_own_kernel")
