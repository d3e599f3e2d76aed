"""The training step's attention: meshweave.attention / attention_backward (ir/ops/attention.py)
against torch's SDPA and its autograd, their Triton kernels (kernels/flash_attention_bwd.py,
in the interpreter) against the ops, and the joint graph that routes SDPA through them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from meshweave.ir.ops import attention as A
from meshweave.models import build_model

import meshweave

# (causal, mask kind, grouped K/V heads, Sq, Sk, head dim)
CASES = [
    (True, None, False, 8, 8, 8),
    (False, "bool", False, 7, 12, 16),
    (False, "float", True, 9, 9, 8),
    (True, "float", True, 6, 6, 24),
]


def _inputs(causal, mask_kind, gqa, sq, sk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, hk = 2, 4, 2 if gqa else 4
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, sk, d, generator=g, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, sq, sk, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(b, 1, sq, sk, generator=g, dtype=dtype)
    return q, k, v, mask


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-gqa{c[2]}" for c in CASES])
def test_the_ops_equal_sdpa_and_its_autograd(case):
    causal, kind, gqa = case[:3]
    q, k, v, mask = _inputs(*case)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if kind == "float":
        leaves.append(mask.requires_grad_())  # a learned bias gets its gradient too
    out, lse = torch.ops.meshweave.attention(q, k, v, mask, causal, None, gqa)
    ref_mask, ref_causal = mask, causal
    if causal and mask is not None:  # SDPA takes one or the other: fold causal into the mask
        hidden = ~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        ref_mask, ref_causal = mask.masked_fill(hidden, float("-inf")), False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask, is_causal=ref_causal,
                                         enable_gqa=gqa)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, leaves, dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v mask".split(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    # lse is the rows' logsumexp of the visible scaled scores
    s = A._scores(q.detach(), k.detach(), None if mask is None else mask.detach(), causal, None)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32


@pytest.mark.parametrize("case", CASES[:3], ids=[f"{c[0]}-{c[1]}" for c in CASES[:3]])
def test_the_math_path_off_the_cpu_equals_the_cpu_kernels(case):
    """What the ops compute on devices without torch's CPU kernel: the formulas in fp32."""
    causal, _, gqa = case[:3]
    q, k, v, mask = _inputs(*case)
    out, lse = A.math_forward(q, k, v, mask, causal, 0.3)
    want_out, want_lse = torch.ops.meshweave.attention(q, k, v, mask, causal, 0.3, gqa)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    dq, dk, dv = A.math_backward(dout, q, k, v, out, lse, mask, causal, 0.3)
    hk = k.shape[1]
    got = (dq, A._group_sum(dk, hk), A._group_sum(dv, hk))
    want = torch.ops.meshweave.attention_backward(dout, q, k, v, out, lse, mask, causal, 0.3,
                                                  gqa)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_fp64_with_a_fully_masked_row():
    q, k, v, _ = _inputs(True, None, True, 4, 5, 3, dtype=torch.float64)
    bias = torch.randn(1, 4, 1, 5, dtype=torch.float64)
    for t in (q, k, v, bias):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.meshweave.attention(*t, True, 0.7, True)[0], (q, k, v, bias))
    keep = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    keep[..., 2, :] = False  # row 2 sees nothing: it outputs 0 and passes no gradient
    out, lse = A.math_forward(q.detach(), k.detach(), v.detach(), keep, False, None)
    assert torch.isinf(lse[:, :, 2]).all() and (out[:, :, 2] == 0).all()


def test_bad_head_counts_are_named():
    q, k, v, _ = _inputs(False, None, False, 4, 4, 8)
    with pytest.raises(ValueError, match=r"q has 4 heads and k/v \(2, 3, 4, 8\); expected "
                                         r"\[B, Hk, S, D\] with Hk dividing 4"):
        torch.ops.meshweave.attention(q, k[:, :3], v[:, :3], None, False, None, True)


# ------------------------------------------------------------------ the Triton kernels
@pytest.fixture(scope="module")
def kernels():
    """The forward and backward kernel sources compiled as a generated module would."""
    import importlib.util
    import tempfile

    from meshweave.codegen.triton.kernels.flash_attention import FLASH_ATTENTION_SOURCE
    from meshweave.codegen.triton.kernels.flash_attention_bwd import FLASH_ATTENTION_BWD_SOURCE
    from meshweave.codegen.triton.kernels.pointwise import interpreter_loops

    body = "\n".join(interpreter_loops(
        (FLASH_ATTENTION_SOURCE + "\n" + FLASH_ATTENTION_BWD_SOURCE).splitlines()))
    path = tempfile.mktemp(suffix="_attention_kernels.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n" + body + "\n")
    spec = importlib.util.spec_from_file_location("attention_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KERNEL_CASES = CASES + [(True, None, False, 80, 80, 16)]  # 80 rows: two blocks of 64


@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=[f"{c[0]}-{c[1]}-gqa{c[2]}-{c[3]}" for c in KERNEL_CASES])
def test_kernels_equal_the_ops(kernels, case):
    from meshweave.codegen.triton.kernels.flash_attention_bwd import (
        flash_attention_backward, flash_attention_with_lse)

    causal, _, gqa = case[:3]
    q, k, v, mask = _inputs(*case)
    out, lse = flash_attention_with_lse(kernels.triton_flash_attention, q, k, v, mask, causal,
                                        None, gqa, interpret=True)
    want_out, want_lse = torch.ops.meshweave.attention(q, k, v, mask, causal, None, gqa)
    assert out.is_contiguous()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=2e-6)
    dout = torch.randn_like(out)
    got = flash_attention_backward(kernels.triton_flash_attention_bwd_dkdv,
                                   kernels.triton_flash_attention_bwd_dq, dout, q, k, v, out,
                                   lse, mask, causal, None, gqa, interpret=True)
    want = torch.ops.meshweave.attention_backward(dout, q, k, v, want_out, want_lse, mask,
                                                  causal, None, gqa)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6, msg=lambda m, n=name: f"d{n}: {m}")


def test_kernels_give_fully_masked_rows_zero(kernels):
    from meshweave.codegen.triton.kernels.flash_attention_bwd import (
        flash_attention_backward, flash_attention_with_lse)

    q, k, v, _ = _inputs(False, None, False, 5, 6, 8)
    keep = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    keep[..., 3, :] = False
    out, lse = flash_attention_with_lse(kernels.triton_flash_attention, q, k, v, keep,
                                        interpret=True)
    want_out, want_lse = A.math_forward(q, k, v, keep, False, None)
    assert torch.isinf(lse[:, :, 3]).all() and (out[:, :, 3] == 0).all()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=2e-6)
    dout = torch.randn_like(out)
    dq, dk, dv = flash_attention_backward(kernels.triton_flash_attention_bwd_dkdv,
                                          kernels.triton_flash_attention_bwd_dq, dout, q, k, v,
                                          out, lse, keep, interpret=True)
    mq, mk, mv = A.math_backward(dout, q, k, v, want_out, want_lse, keep, False, None)
    assert (dq[:, :, 3] == 0).all()
    for a, b in ((dq, mq), (dk, mk), (dv, mv)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6)


# ------------------------------------------------------------------ through compile()
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_training_step_runs_attention_and_activation_backwards_in_triton(name):
    """The joint graph holds meshweave.attention and its backward; backend="triton" compiles
    both (and the activation backwards) to kernels, and the gradients equal eager's."""
    model, inputs = build_model(name, batch=2, seq=8)
    ref = copy.deepcopy(model)
    cm = meshweave.compile(model, inputs,
                           options=meshweave.CompileOptions(training=True, backend="triton"))
    fw_ops = {n.op for n in cm.forward_graph.nodes}
    bw_ops = {n.op for n in cm.backward_graph.nodes}
    assert "meshweave.attention.default" in fw_ops
    assert "meshweave.attention_backward.default" in bw_ops
    assert not any("scaled_dot_product" in op for op in fw_ops | bw_ops)
    fallbacks = {f["op"] for f in cm.backward_graph.meta["kernels"].fallbacks}
    assert not fallbacks & {"meshweave.attention_backward.default", "aten.gelu_backward.default",
                            "aten.silu_backward.default"}, fallbacks
    names = {k.name for k in cm.backward_graph.meta["kernels"].kernels}
    assert "triton_flash_attention_bwd" in names, names
    labels = torch.roll(inputs[0], -1, 1)

    def loss(out):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))

    loss(cm(*inputs)).backward()
    loss(ref(*inputs)).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{name} {n}.grad: {m}")


def test_attention_with_dropout_keeps_torchs_ops():
    """Dropout's RNG is torch's: such SDPA is left to AOTAutograd's own attention ops."""
    from meshweave.frontend.joint import route_attention

    class Drop(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)

    gm = torch.export.export(Drop(), (torch.randn(1, 2, 4, 8),)).module()
    routed = route_attention(gm)
    targets = [str(n.target) for n in routed.graph.nodes if n.op == "call_function"]
    assert any("scaled_dot_product_attention" in t for t in targets), targets
    assert not any("meshweave" in t for t in targets), targets
