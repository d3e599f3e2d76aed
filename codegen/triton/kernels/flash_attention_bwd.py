"""Flash attention for training in Triton: the backward kernels, and the forward's launcher
that also writes the logsumexp (ir/ops/attention.py's meshweave.attention pair).

Forward: the inference kernel (flash_attention.py) with STORE_LSE, writing
lse = log sum_j exp(scale q.k_j + mask_j) per query row (-inf where nothing is visible), and
its output contiguous [B, H, Sq, D], as the op promises.

Backward (FlashAttention-2's split): with delta_i = dO_i . O_i (one torch reduction) and
P = exp(S - lse) recomputed block by block from the saved lse, so the [Sq, Sk] matrices never
exist in memory,
  - `triton_flash_attention_bwd_dkdv`: one program per BLOCK_N keys of one (batch, query
    head) walks the query blocks: dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q;
  - `triton_flash_attention_bwd_dq`: one program per BLOCK_M queries walks the key blocks:
    dQ += dS K.
Both take the forward's masks (causal, bool, additive) and its GQA head map. Under GQA each
query head writes its own dK/dV (fp32), summed over the group in torch afterwards. Like the
forward kernel, the source is text pasted into the generated module (no triton import here).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from meshweave.ir.graph import Node
from meshweave.ir.registry import RuleTable
from .flash_attention import AttentionArgs, AttentionRule, _pow2, flash_attention, mask_args

ATTENTION_TRAINING = RuleTable("triton_attention_training")

LOG2E = 1.4426950408889634

FLASH_ATTENTION_BWD_SOURCE = """\
@triton.jit
def _flash_bwd_dot(a, b, ALLOW_TF32: tl.constexpr):
    if ALLOW_TF32:
        return tl.dot(a, b)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _flash_bwd_rows(Q, DO, Lse, Delta, b, h, rows, offs_d, offs_dv, sqb, sqh, sqm, sqd,
                    sdob, sdoh, sdom, sdod, slb, slh, slm, H, SQ, D, DV_DIM):
    \"\"\"A block of query rows: q, dO, lse (log2 units) and delta.\"\"\"
    row_ok = rows < SQ
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    lse = tl.load(Lse + b * slb + h * slh + rows * slm, mask=row_ok, other=0.0)
    delta = tl.load(Delta + (b * H + h) * SQ + rows, mask=row_ok, other=0.0)
    return q, do, lse * 1.4426950408889634, delta


@triton.jit
def _flash_bwd_cols(K, V, b, hk, cols, offs_d, offs_dv, skb, skh, skn, skd, svb, svh, svn, svd,
                    SK, D, DV_DIM):
    \"\"\"A block of keys: k and v of K/V head hk.\"\"\"
    col_ok = cols < SK
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)
    return k, v


@triton.jit
def _flash_bwd_probs(q, k, lse, Mask, b, h, rows, cols, smb, smh, smm, smn, SQ, SK, qk_scale,
                     IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                     ALLOW_TF32: tl.constexpr):
    \"\"\"P = exp(S - lse) of one block, recomputed with the forward's masks (0 elsewhere).\"\"\"
    s = _flash_bwd_dot(q, tl.trans(k), ALLOW_TF32) * qk_scale
    inside = (rows[:, None] < SQ) & (cols[None, :] < SK)
    valid = inside & (lse[:, None] > float("-inf"))
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if MASK_KIND == 1:
        mk = tl.load(Mask + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn,
                     mask=inside, other=0)
        valid = valid & (mk != 0)
    if MASK_KIND == 2:
        mk = tl.load(Mask + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn,
                     mask=inside, other=0.0)
        s = s + mk.to(tl.float32) * 1.4426950408889634
    return tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def triton_flash_attention_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, sdob, sdoh, sdom, sdod, slb, slh, slm,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, KV_GROUP, SQ, SK, D, DV_DIM, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = _flash_bwd_cols(K, V, b, h // KV_GROUP, cols, offs_d, offs_dv, skb, skh, skn, skd,
                           svb, svh, svn, svd, SK, D, DV_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if IS_CAUSAL:  # rows before the block's first key see none of it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    n_rows = SQ - lo
    for m_off in range(0, n_rows, BLOCK_M):
        rows = lo + m_off + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _flash_bwd_rows(Q, DO, Lse, Delta, b, h, rows, offs_d, offs_dv,
                                            sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                            slb, slh, slm, H, SQ, D, DV_DIM)
        p = _flash_bwd_probs(q, k, lse, Mask, b, h, rows, cols, smb, smh, smm, smn, SQ, SK,
                             qk_scale, IS_CAUSAL, MASK_KIND, ALLOW_TF32)
        dv += _flash_bwd_dot(tl.trans(p.to(do.dtype)), do, ALLOW_TF32)
        ds = p * (_flash_bwd_dot(do, tl.trans(v), ALLOW_TF32) - delta[:, None])
        dk += _flash_bwd_dot(tl.trans(ds.to(q.dtype)), q, ALLOW_TF32)
    dk = dk * sm_scale
    col_ok = cols[:, None] < SK
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < D))
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < DV_DIM))


@triton.jit
def triton_flash_attention_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, sdob, sdoh, sdom, sdod, slb, slh, slm,
    sdqb, sdqh, sdqm, sdqd,
    H, KV_GROUP, SQ, SK, D, DV_DIM, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, lse, delta = _flash_bwd_rows(Q, DO, Lse, Delta, b, h, rows, offs_d, offs_dv,
                                        sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                        slb, slh, slm, H, SQ, D, DV_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = SK
    if IS_CAUSAL:  # keys after the block's last row are hidden from all of it
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _flash_bwd_cols(K, V, b, h // KV_GROUP, cols, offs_d, offs_dv, skb, skh, skn,
                               skd, svb, svh, svn, svd, SK, D, DV_DIM)
        p = _flash_bwd_probs(q, k, lse, Mask, b, h, rows, cols, smb, smh, smm, smn, SQ, SK,
                             qk_scale, IS_CAUSAL, MASK_KIND, ALLOW_TF32)
        ds = p * (_flash_bwd_dot(do, tl.trans(v), ALLOW_TF32) - delta[:, None])
        dq += _flash_bwd_dot(ds.to(k.dtype), k, ALLOW_TF32)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < SQ) & (offs_d[None, :] < D))
"""


def _parse_forward(node: Node) -> AttentionArgs:
    q, k, v, mask, is_causal, scale, gqa = node.args
    return AttentionArgs(q, k, v, mask, 0.0, bool(is_causal), scale, bool(gqa))


def _parse_backward(node: Node) -> AttentionArgs:
    _, q, k, v, _, _, mask, is_causal, scale, gqa = node.args
    return AttentionArgs(q, k, v, mask, 0.0, bool(is_causal), scale, bool(gqa))


@dataclasses.dataclass(frozen=True)
class TrainingAttentionRule:
    """meshweave.attention(_backward) on these kernels: the inference rule's limits apply."""

    backward: bool

    def parse(self, node: Node) -> AttentionArgs:
        return (_parse_backward if self.backward else _parse_forward)(node)

    def supports(self, node: Node) -> str | None:
        return AttentionRule(self.parse).supports(node)


ATTENTION_TRAINING.register("meshweave.attention.default")(TrainingAttentionRule(False))
ATTENTION_TRAINING.register("meshweave.attention_backward.default")(TrainingAttentionRule(True))


def flash_attention_with_lse(kernel, q, k, v, mask=None, is_causal=False, scale=None,
                             enable_gqa=False, interpret=False, allow_tf32=False):
    """meshweave.attention: (out contiguous [B, H, Sq, Dv], lse [B, H, Sq] fp32), launching
    the forward kernel (FLASH_ATTENTION_SOURCE) with STORE_LSE."""
    B, H, SQ, _ = q.shape
    lse = torch.empty((B, H, SQ), dtype=torch.float32, device=q.device)
    out = flash_attention(kernel, q, k, v, mask, is_causal, scale, enable_gqa,
                          interpret=interpret, allow_tf32=allow_tf32, lse=lse)
    return out, lse


def flash_attention_backward(dkdv_kernel, dq_kernel, dout, q, k, v, out, lse, mask=None,
                             is_causal=False, scale=None, enable_gqa=False, interpret=False,
                             allow_tf32=False):
    """meshweave.attention_backward: (dq, dk, dv), contiguous, in the inputs' dtypes."""
    B, H, SQ, D = q.shape
    HK, SK, DV = k.shape[1], k.shape[2], v.shape[3]
    if H % HK or (HK != H and not enable_gqa):
        raise ValueError(f"attention backward with {H} query heads and {HK} key/value heads "
                         f"needs enable_gqa=True and a divisible head count")
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, H, SQ]
    dq = torch.empty((B, H, SQ, D), dtype=q.dtype, device=q.device)
    grouped = HK != H
    kv_dtype = torch.float32 if grouped else k.dtype
    dk = torch.empty((B, H, SK, D), dtype=kv_dtype, device=q.device)
    dv = torch.empty((B, H, SK, DV), dtype=torch.float32 if grouped else v.dtype,
                     device=q.device)
    mask, ms, kind = mask_args(q, mask, (B, H, SQ, SK))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d, block_dv = _pow2(D), _pow2(DV)
    if interpret:
        block_m, block_n, warps = min(64, _pow2(SQ)), min(64, _pow2(SK)), 4
    else:
        block_m = block_n = 64 if max(block_d, block_dv) <= 64 else 32
        warps = 4
    tf32 = allow_tf32 or q.dtype != torch.float32
    common = (*q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(), *lse.stride())
    sizes = (H, H // HK, SQ, SK, D, DV, scale * LOG2E, scale)
    meta = dict(IS_CAUSAL=bool(is_causal), MASK_KIND=kind, ALLOW_TF32=tf32, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps,
                num_stages=1)
    dkdv_kernel[(-(-SK // block_n), B * H)](q, k, v, mask, dout, lse, delta, dk, dv, *common,
                                            *dk.stride(), *dv.stride(), *sizes, **meta)
    dq_kernel[(-(-SQ // block_m), B * H)](q, k, v, mask, dout, lse, delta, dq, *common,
                                          *dq.stride(), *sizes, **meta)
    if grouped:
        dk = dk.reshape(B, HK, H // HK, SK, D).sum(2).to(k.dtype)
        dv = dv.reshape(B, HK, H // HK, SK, DV).sum(2).to(v.dtype)
    return dq, dk, dv
