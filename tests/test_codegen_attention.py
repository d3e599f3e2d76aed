"""Flash attention kernel vs torch SDPA: causal, arbitrary boolean (tree) masks, additive masks,
grouped-query attention, fp32 and fp16, and the SDPA fallback for what the kernel does not do."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPRO = "pytest tests/test_codegen_attention.py::{}"


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWEAVE_CACHE_DIR", str(tmp_path / "cache"))


class Attention(torch.nn.Module):
    def __init__(self, causal=False, scale=None, gqa=False, dropout=0.0):
        super().__init__()
        self.causal, self.scale, self.gqa, self.dropout = causal, scale, gqa, dropout

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout,
            is_causal=self.causal,
            scale=self.scale,
            enable_gqa=self.gqa,
        )


def tree_mask(n: int) -> torch.Tensor:
    """A token-tree mask (speculative decoding): each node sees its ancestors and itself."""
    parent = [-1] + [(i - 1) // 2 for i in range(1, n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    return mask


def qkv(dtype, b=2, h=4, hk=4, sq=11, sk=11, d=16):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    return r(b, h, sq, d), r(b, hk, sk, d), r(b, hk, sk, d)


CASES = {
    "causal": ({"causal": True}, {}, None),
    "causal_rectangular": ({"causal": True}, {"sq": 7, "sk": 19}, None),
    "tree_bool_mask": ({}, {"sq": 13, "sk": 13}, "tree"),
    "random_bool_mask_broadcast": ({"scale": 0.2}, {"sq": 9, "sk": 21}, "bool"),
    "additive_mask": ({}, {"sq": 10, "sk": 17}, "additive"),
    "gqa_causal": ({"causal": True, "gqa": True}, {"h": 4, "hk": 2, "sq": 12, "sk": 12}, None),
}


def make_mask(kind, sq, sk, dtype):
    if kind == "tree":
        return tree_mask(sq).to(DEVICE)
    if kind == "bool":
        m = torch.rand(2, 1, sq, sk, generator=torch.Generator().manual_seed(1)) > 0.4
        m[..., 0] = True
        return m.to(DEVICE)
    if kind == "additive":
        return torch.randn(1, 4, sq, sk, generator=torch.Generator().manual_seed(2)).to(
            DEVICE, dtype
        )
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_matches_sdpa(case, dtype):
    mod_kw, shape_kw, mask_kind = CASES[case]
    q, k, v = qkv(dtype, **shape_kw)
    mask = make_mask(mask_kind, q.shape[2], k.shape[2], dtype)
    args = (q, k, v) if mask is None else (q, k, v, mask)
    model = Attention(**mod_kw)
    cm = meshweave.compile(model, args, options=CompileOptions(backend="triton"))
    assert [k.name for k in cm.kernels] == ["triton_flash_attention"], cm.explain()
    got = cm(*args)
    eager = model(*args)
    repro = REPRO.format(f"test_flash_attention_matches_sdpa[{case}-{dtype}]")
    if dtype == torch.float32:
        torch.testing.assert_close(
            got, eager, atol=2e-5, rtol=2e-5, msg=lambda m: f"{m}\nrepro: {repro}"
        )
    else:
        up = [a.float() if a.is_floating_point() else a for a in args]
        ref = model(*up)
        ours, theirs = (got.float() - ref).abs().max(), (eager.float() - ref).abs().max()
        assert ours <= 2 * theirs + 1e-3, f"{ours} vs eager {theirs}\nrepro: {repro}"


def test_attention_output_layout_makes_head_merge_a_view():
    class MergeHeads(torch.nn.Module):
        def forward(self, q, k, v):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2.0

    q, k, v = qkv(torch.float32)
    cm = meshweave.compile(MergeHeads(), (q, k, v), options=CompileOptions(backend="triton"))
    call = cm.artifacts["kernels"].module_source.split("def call")[1]
    assert "aten.reshape" not in call and "aten.permute" not in call  # index arithmetic
    assert [k.kind for k in cm.kernels] == ["attention", "pointwise"]
    torch.testing.assert_close(cm(q, k, v), MergeHeads()(q, k, v), atol=2e-5, rtol=2e-5)


def test_sdpa_fallback_for_unsupported_attention():
    q, k, v = qkv(torch.float32, d=300)  # head dim over the kernel's 256
    model = Attention()
    cm = meshweave.compile(model, (q, k, v), options=CompileOptions(backend="triton"))
    fallbacks = cm.artifacts["kernels"].fallbacks
    assert [f["op"] for f in fallbacks] == ["aten.scaled_dot_product_attention.default"]
    assert "head dim 300" in fallbacks[0]["reason"]
    torch.testing.assert_close(cm(q, k, v), model(q, k, v))


class RepeatKV(torch.nn.Module):
    """Llama-style GQA: K/V heads repeated before SDPA, in [B, S, H, D] (zoo) or [B, H, S, D]
    (HF) layout; `wrong` repeats along the sequence instead, which must not be folded."""

    def __init__(self, layout: str, wrong: bool = False):
        super().__init__()
        self.layout, self.wrong = layout, wrong

    def forward(self, q, k, v):
        def rep(x, dim):  # x[:, :, None] expanded along a new dim after `dim`, then merged
            shape = list(x.shape)
            y = x.unsqueeze(dim + 1).expand(*shape[: dim + 1], 3, *shape[dim + 1:])
            shape[dim] *= 3
            return y.reshape(shape)

        if self.layout == "bshd":
            k, v = rep(k, 2), rep(v, 2)
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        dim = 2 if self.wrong else 1
        return F.scaled_dot_product_attention(q, rep(k, dim), rep(v, dim))


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_repeated_kv_heads_fold_into_grouped_attention(layout):
    torch.manual_seed(0)
    shape_q = (2, 5, 6, 16) if layout == "bshd" else (2, 6, 5, 16)
    shape_kv = (2, 5, 2, 16) if layout == "bshd" else (2, 2, 5, 16)
    q = torch.randn(shape_q, device=DEVICE)
    k, v = torch.randn(shape_kv, device=DEVICE), torch.randn(shape_kv, device=DEVICE)
    model = RepeatKV(layout)
    cm = meshweave.compile(model, (q, k, v), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)
    src = cm.artifacts["kernels"].module_source
    assert "enable_gqa=True" in src, "the K/V repeat was not folded"
    assert [k.kind for k in cm.kernels] == ["attention"], [k.name for k in cm.kernels]
    assert "enable_gqa" not in str(cm.graph)  # the traced graph itself is left as it was


def test_repeat_along_another_dim_is_not_folded():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 15, 8, device=DEVICE)
    k, v = torch.randn(1, 2, 5, 8, device=DEVICE), torch.randn(1, 2, 5, 8, device=DEVICE)
    model = RepeatKV("bhsd", wrong=True)  # repeats positions, not heads
    cm = meshweave.compile(model, (q, k, v), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)
    assert "enable_gqa=True" not in cm.artifacts["kernels"].module_source


def test_folded_nodes_are_listed_in_explain():
    from meshweave.models import build_model

    model, inputs = build_model("llama-tiny", device=DEVICE, batch=1, seq=8)
    cm = meshweave.compile(model, inputs, options=CompileOptions(backend="triton"))
    art = cm.artifacts["kernels"]
    ops = {n.outputs[0].name: n.op for n in cm.graph.nodes}
    assert art.folded and {ops[n] for n in art.folded} <= {
        "aten.unsqueeze.default", "aten.expand.default", "aten.clone.default",
        "aten.view.default", "aten.permute.default"}, art.folded
    assert "traced nodes need no kernel: K/V head repeat folded" in art.summary()


def test_sdpa_choice_keeps_the_kernel_layout():
    """Policy "torch": attention runs torch SDPA (what "auto" picks where it measures faster),
    copied into the flash kernel's [B, S, H, D] storage that the generated code indexes."""
    from meshweave.codegen import CodegenConfig, attach_triton_backend
    from meshweave.models.gpt import Block, GPTConfig

    torch.manual_seed(0)
    block = Block(GPTConfig(hidden_size=64, num_heads=4)).to(DEVICE).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 8, 64, device=DEVICE)
    cm = meshweave.compile(block, (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(matmul="torch"))
    torch.testing.assert_close(cm(x), block(x), atol=2e-5, rtol=2e-5)
    assert any(k.kind == "attention" for k in cm.kernels)
