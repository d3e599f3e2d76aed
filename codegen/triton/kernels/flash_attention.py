"""Flash attention (forward) in Triton, and the ATTENTION rule table.

One program computes BLOCK_M query rows of one (batch, head): it streams K/V in BLOCK_N
blocks and keeps a running max and normalizer (online softmax), so the [Sq, Sk] score matrix
never exists in memory. Masks: causal (torch's top-left convention, j <= i), an arbitrary
boolean mask (True = attend; tree attention needs this) or an additive float mask, any of them
broadcastable to [B, H, Sq, Sk] (passed with stride 0 on broadcast dims). Grouped-query
attention reads K/V head h // (H / Hk). Rows with nothing to attend to produce 0.

The output is allocated [B, Sq, H, D] and returned as its [B, H, Sq, D] permutation, so the
usual `transpose(1, 2).reshape(B, Sq, H * D)` that follows attention is a free view.

Anything else (dropout, head dim over 256, inputs that are not 4-d) falls back to SDPA through
the reference executor, with the reason listed.

The kernel is kept as source text and pasted into each generated module that needs it, so a
generated module is self-contained and this file never imports triton (which must not happen
before the interpreter mode is settled).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable

ATTENTION = RuleTable("triton_attention")
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    q: Value
    k: Value
    v: Value
    mask: Value | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def parse_sdpa(node: Node) -> AttentionArgs:
    names = ["q", "k", "v", "attn_mask", "dropout_p", "is_causal"]
    vals = dict(zip(names, node.args))
    vals.update(node.kwargs)
    return AttentionArgs(
        vals["q"],
        vals["k"],
        vals["v"],
        vals.get("attn_mask"),
        float(vals.get("dropout_p", 0.0) or 0.0),
        bool(vals.get("is_causal")),
        vals.get("scale"),
        bool(vals.get("enable_gqa", False)),
    )


@dataclasses.dataclass(frozen=True)
class AttentionRule:
    parse: Callable[[Node], AttentionArgs]

    def supports(self, node: Node) -> str | None:
        a = self.parse(node)
        if a.dropout_p:
            return f"dropout_p={a.dropout_p} (training-mode attention)"
        tq, tk, tv = a.q.tensor_type, a.k.tensor_type, a.v.tensor_type
        if not (tq.rank == tk.rank == tv.rank == 4):
            return "attention inputs are not [B, H, S, D]"
        for t in (tq, tk, tv):
            if not isinstance(t.shape[-1], int) or t.shape[-1] > MAX_HEAD_DIM:
                return f"head dim {t.shape[-1]} (the kernel supports static dims <= 256)"
        if tq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"attention in {tq.dtype}"
        if a.mask is not None and (
            not hasattr(a.mask, "tensor_type") or a.mask.tensor_type.rank > 4
        ):
            return "attention mask is not a tensor of rank <= 4"
        if a.scale is not None and not isinstance(a.scale, (int, float)):
            return "symbolic attention scale"
        return None


ATTENTION.register("aten.scaled_dot_product_attention.default")(AttentionRule(parse_sdpa))


FLASH_ATTENTION_SOURCE = """\
@triton.jit
def triton_flash_attention(
    Q, K, V, Mask, Out, Lse,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, sob, soh, som, sod, slb, slh, slm,
    H, KV_GROUP, SQ, SK, D, DV, qk_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ALLOW_TF32: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // KV_GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m[:, None] < SQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = SK
    if IS_CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols[None, :] < SK
        k = tl.load(K + b * skb + hk * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                    mask=col_ok & (offs_d[:, None] < D), other=0.0)
        if ALLOW_TF32:
            s = tl.dot(q, k)
        else:
            s = tl.dot(q, k, input_precision="ieee")
        s = s * qk_scale  # log2 domain: qk_scale includes log2(e)
        valid = col_ok
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if MASK_KIND == 1:
            mk = tl.load(Mask + b * smb + h * smh + offs_m[:, None] * smm + cols[None, :] * smn,
                         mask=row_ok & col_ok, other=0)
            valid = valid & (mk != 0)
        if MASK_KIND == 2:
            mk = tl.load(Mask + b * smb + h * smh + offs_m[:, None] * smm + cols[None, :] * smn,
                         mask=row_ok & col_ok, other=0.0)
            s = s + mk.to(tl.float32) * 1.4426950408889634
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(cols[:, None] < SK) & (offs_dv[None, :] < DV), other=0.0)
        if ALLOW_TF32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < DV))
    if STORE_LSE:  # natural-log logsumexp of the scaled scores, for the backward
        log2_l = tl.log2(tl.where(l_i == 0.0, 1.0, l_i))
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
        tl.store(Lse + b * slb + h * slh + offs_m * slm, lse, mask=offs_m < SQ)
"""


def mask_args(q: torch.Tensor, mask: torch.Tensor | None, shape: tuple) -> tuple:
    """(mask tensor, its strides over [B, H, Sq, Sk] (0 on broadcast dims), MASK_KIND):
    kind 0 none (q stands in), 1 boolean (True = attend), 2 additive."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    mask = mask.expand(*shape)
    return mask, mask.stride(), 1 if mask.dtype == torch.bool else 2


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def flash_attention(
    kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    interpret: bool = False,
    allow_tf32: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, Sq, D], k/v [B, Hk, Sk, D], launching
    `kernel` (FLASH_ATTENTION_SOURCE as compiled in the generated module). With `lse` (a
    [B, H, Sq] fp32 tensor, for training) it also writes the rows' logsumexp there, and the
    output is contiguous [B, H, Sq, D]."""
    B, H, SQ, D = q.shape
    HK, SK, DV = k.shape[1], k.shape[2], v.shape[3]
    if H % HK or (HK != H and not enable_gqa):
        raise ValueError(
            f"attention with {H} query heads and {HK} key/value heads needs "
            f"enable_gqa=True and a divisible head count"
        )
    if lse is None:
        out = torch.empty((B, SQ, H, DV), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    else:
        out = torch.empty((B, H, SQ, DV), dtype=q.dtype, device=q.device)
    mask, ms, kind = mask_args(q, mask, (B, H, SQ, SK))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d, block_dv = _pow2(D), _pow2(DV)
    if interpret:
        block_m, block_n, warps = min(64, _pow2(SQ)), min(64, _pow2(SK)), 4
    else:
        block_m = 128 if SQ >= 128 and max(block_d, block_dv) <= 128 else 64
        block_n = 64 if max(block_d, block_dv) <= 128 else 32
        warps = 8 if block_m == 128 else 4
    grid = (-(-SQ // block_m), B * H)
    tf32 = allow_tf32 or q.dtype != torch.float32
    kernel[grid](
        q,
        k,
        v,
        mask,
        out,
        q if lse is None else lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *ms,
        *out.stride(),
        *((0, 0, 0) if lse is None else lse.stride()),
        H,
        H // HK,
        SQ,
        SK,
        D,
        DV,
        scale * 1.4426950408889634,
        IS_CAUSAL=bool(is_causal),
        MASK_KIND=kind,
        ALLOW_TF32=tf32,
        STORE_LSE=lse is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=warps,
        num_stages=2,
    )
    return out
