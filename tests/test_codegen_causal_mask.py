"""codegen/triton/causal_mask.py: constant causal masks become is_causal attention, nothing else does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meshweave.codegen.triton.causal_mask import FOLDED, is_causal_mask

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPRO = "pytest tests/test_codegen_causal_mask.py::{}"

pytestmark = pytest.mark.usefixtures("kernel_cache")  # conftest.py: a private kernel cache


class MaskedAttention(torch.nn.Module):
    """Attention with a mask built in forward from arange (kind: bool, float, shifted, user)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, user_mask):
        s = q.shape[2]
        i = torch.arange(s, device=q.device)
        keep = i[None, :] <= i[:, None]
        if self.kind == "shifted":  # strictly below the diagonal: not causal
            keep = i[None, :] < i[:, None] + 0
            keep = keep & (i[:, None] > 0) | (i[None, :] == 0)
        if self.kind == "user":
            keep = keep & user_mask
        mask = keep[None, None]
        if self.kind == "float":
            mask = torch.zeros(s, s, device=q.device).masked_fill(~keep, float("-inf"))[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs(s=8):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, s, 16, device=DEVICE) for _ in range(3))
    return q, k, v, torch.ones(s, s, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize("kind,folds", [("bool", True), ("float", True), ("shifted", False),
                                        ("user", False)])
def test_constant_causal_masks_fold(kind, folds):
    args = _inputs()
    model = MaskedAttention(kind)
    cm = meshweave.compile(model, args, options=CompileOptions(backend="triton"))
    art = cm.artifacts["kernels"]
    src = art.module_source
    assert ("is_causal=True" in src) == folds, src[src.find("rt.attention"):][:300]
    assert (FOLDED in art.folded.values()) == folds, art.folded
    test = REPRO.format(f"test_constant_causal_masks_fold[{kind}-{folds}]")
    torch.testing.assert_close(cm(*args), model(*args), rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"{m}\nrepro: {test}")
    if kind == "user":  # a mask from a user input changes per call: never folded
        args2 = (*args[:3], torch.rand(8, 8, device=DEVICE) > 0.3)
        torch.testing.assert_close(cm(*args2), model(*args2), rtol=2e-5, atol=2e-5)


def test_hf_gpt2_mask_folds():
    pytest.importorskip("transformers")
    from meshweave.models import build_model

    model, inputs = build_model("hf:gpt2", device=DEVICE, batch=2, seq=8)
    cm = meshweave.compile(model, inputs, options=CompileOptions(backend="triton"))
    art = cm.artifacts["kernels"]
    assert art.module_source.count("is_causal=True") == model.config.n_layer
    assert FOLDED in art.folded.values()
    got, ref = cm(*inputs), model(*inputs)
    got = got.logits if hasattr(got, "logits") else got[0]
    torch.testing.assert_close(got, ref.logits, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{m}\nrepro: {REPRO.format('test_hf_gpt2_mask_folds')}")


def test_is_causal_mask_patterns():
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    q = (1, 2, 4, 8)
    assert is_causal_mask(keep, q, q)
    assert is_causal_mask(keep[None, None].expand(1, 2, 4, 4), q, q)
    assert not is_causal_mask(torch.ones(4, 4, dtype=torch.bool).tril(-1), q, q)
    assert not is_causal_mask(keep, q, (1, 2, 5, 8))  # not square: alignment is ambiguous
    assert not is_causal_mask(keep[:, :3], (1, 2, 4, 8), (1, 2, 3, 8))
    add = torch.zeros(4, 4).masked_fill(~keep, float("-inf"))
    assert is_causal_mask(add, q, q)
    assert is_causal_mask(torch.zeros(4, 4).masked_fill(~keep, torch.finfo(torch.float).min), q, q)
    assert not is_causal_mask(torch.zeros(4, 4).masked_fill(~keep, -1.0), q, q)  # soft mask
    assert not is_causal_mask(keep.to(torch.int64), q, q)
    assert not is_causal_mask(torch.ones(3, 4, 4, dtype=torch.bool).tril(), (2, 2, 4, 8), q)
