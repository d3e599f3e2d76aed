"""meshweave.attention and meshweave.attention_backward: the training step's attention pair.

torch differentiates SDPA through a different op on each device (flash attention for CPU;
flash, memory-efficient or cuDNN attention on CUDA), each with its own saved state. The joint
trace (frontend/joint.py, `route_attention`) sends every dropout-free SDPA through this pair
instead, so the forward and backward IR hold the same two ops on every device, and the Triton
backend lowers both to its flash-attention kernels (codegen/triton/kernels/flash_attention.py
and flash_attention_bwd.py) with the forward's masks:

    meshweave.attention(q, k, v, mask, is_causal, scale, enable_gqa) -> (out, lse)
    meshweave.attention_backward(dout, q, k, v, out, lse, mask, is_causal, scale, enable_gqa)
        -> (dq, dk, dv)

q [B, H, Sq, D], k/v [B, Hk, Sk, D] (H % Hk == 0 with enable_gqa: query head h reads K/V head
h // (H / Hk)); mask: bool (True = attend) or additive float, broadcastable to [B, H, Sq, Sk];
is_causal: key j visible to query i iff j <= i (torch's top-left convention). lse [B, H, Sq]
float32 (fp64 for fp64 inputs) is log sum_j exp(scale * q_i . k_j + mask_ij) over the visible
keys, -inf where no key is visible: such rows output 0 in the Triton kernels and the fp32
formulas (as the inference kernel's do), and whatever eager SDPA gives on the CPU. Every output
is contiguous (the fake implementations promise it to AOTAutograd, which plans views on it).
These are torch.library ops; their eager implementations are what the reference executor
runs: on the CPU torch's own flash-attention kernels (what eager SDPA runs there, so gradients
equal eager's), elsewhere the math in fp32. A float mask that requires grad gets its gradient
(the scores' gradient, summed to its shape) from the math in the autograd formula.
"""

import math
from typing import Optional

import torch

from ..registry import register_op
from ..types import TensorType
from .common import numel


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """K or V with its heads repeated to the query's h (grouped-query attention)."""
    if x.dim() != 4 or h % x.shape[1]:
        raise ValueError(f"meshweave.attention: q has {h} heads and k/v {tuple(x.shape)}; "
                         f"expected [B, Hk, S, D] with Hk dividing {h}")
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The math's precision: fp32, or fp64 for fp64 inputs."""
    return x if x.dtype == torch.float64 else x.float()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q, k, mask, is_causal: bool, scale: float | None) -> torch.Tensor:
    """Scaled scores [B, H, Sq, Sk] (fp32; fp64 for fp64 inputs), -inf where a key is hidden."""
    s = (_acc(q) @ _acc(_heads(k, q.shape[1])).transpose(-1, -2)) * _scale(q, scale)
    sq, sk = s.shape[-2:]
    if is_causal:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + _acc(mask)
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))


def _group_sum(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[B, H, S, D] per query head -> [B, Hk, S, D] summed over each K/V head's group."""
    b, h, s, d = x.shape
    return x if h == hk else x.reshape(b, hk, h // hk, s, d).sum(2)


def score_grad(dout, q, k, v, out, lse, mask, is_causal, scale):
    """(probabilities, the scores' gradient dS) of one attention call, in fp32 (fp64)."""
    p = _probs(_scores(q, k, mask, is_causal, scale), lse)
    dp = _acc(dout) @ _acc(_heads(v, q.shape[1])).transpose(-1, -2)
    delta = (_acc(dout) * _acc(out)).sum(-1, keepdim=True)
    return p, p * (dp - delta)


@torch.library.custom_op("meshweave::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              is_causal: bool, scale: Optional[float],
              enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":  # torch's own CPU kernel: what eager SDPA runs, to the bit
        h = q.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _heads(k, h), _heads(v, h), 0.0, is_causal, attn_mask=_additive(mask, q.dtype),
            scale=scale)
        return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()
    return math_forward(q, k, v, mask, is_causal, scale)


def math_forward(q, k, v, mask, is_causal: bool, scale: float | None):
    """(out, lse) by the formula, in fp32 (fp64 for fp64 inputs): the eager path off the CPU."""
    s = _scores(q, k, mask, is_causal, scale)
    lse = torch.logsumexp(s, -1)
    out = _probs(s, lse) @ _acc(_heads(v, q.shape[1]))
    return out.to(q.dtype).contiguous(), lse.contiguous()


def math_backward(dout, q, k, v, out, lse, mask, is_causal: bool, scale: float | None):
    """(dq, dk, dv) per query head by the formula (dk, dv not yet summed over GQA groups)."""
    p, ds = score_grad(dout, q, k, v, out, lse, mask, is_causal, scale)
    sc = _scale(q, scale)
    dq = (ds @ _acc(_heads(k, q.shape[1]))) * sc
    return dq, (ds.transpose(-1, -2) @ _acc(q)) * sc, p.transpose(-1, -2) @ _acc(dout)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask as SDPA converts it (0 where attending, -inf elsewhere)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask,
                                                                               float("-inf"))


@attention.register_fake
def _(q, k, v, mask, is_causal, scale, enable_gqa):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("meshweave::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                       is_causal: bool, scale: Optional[float],
                       enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hk = k.shape[1]
    if q.device.type == "cpu":  # the backward eager SDPA runs on the CPU
        h = q.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, _heads(k, h), _heads(v, h), out, lse, 0.0, is_causal,
            attn_mask=_additive(mask, q.dtype), scale=scale)
    else:
        dq, dk, dv = math_backward(dout, q, k, v, out, lse, mask, is_causal, scale)
    return (dq.to(q.dtype).contiguous(), _group_sum(dk, hk).to(k.dtype).contiguous(),
            _group_sum(dv, hk).to(v.dtype).contiguous())


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, mask, is_causal, scale, enable_gqa):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, enable_gqa = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.flags = (is_causal, scale, enable_gqa)


def _backward(ctx, dout, dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    is_causal, scale, gqa = ctx.flags
    dq, dk, dv = torch.ops.meshweave.attention_backward(dout, q, k, v, out, lse, mask,
                                                        is_causal, scale, gqa)
    dmask = None
    if ctx.needs_input_grad[3]:  # a learned additive mask (bias): dS, summed to its shape
        ds = score_grad(dout, q, k, v, out, lse, mask, is_causal, scale)[1]
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        dims = [i for i in range(4) if shape[i] == 1 and ds.shape[i] != 1]
        ds = ds.sum(dim=dims, keepdim=True) if dims else ds
        dmask = ds.reshape(mask.shape).to(mask.dtype)
    return dq, dk, dv, dmask, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
ATTENTION_OP = torch.ops.meshweave.attention.default
BACKWARD_OP = torch.ops.meshweave.attention_backward.default


# ------------------------------------------------------------------------ the registry's view
def _attention_rule(q, k, v, mask, is_causal, scale, enable_gqa):
    return [TensorType(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype, q.device),
            TensorType(tuple(q.shape[:-1]), _lse_dtype(q.dtype), q.device)]


def _attention_flops(args, kwargs, outs):
    q, k, v = args[0], args[1], args[2]
    return 2 * numel(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _backward_rule(dout, q, k, v, out, lse, mask, is_causal, scale, enable_gqa):
    return [q, k, v]


def _backward_flops(args, kwargs, outs):  # recompute S and P, then dV, dP, dQ and dK: 2.5x
    return int(2.5 * _attention_flops(args[1:4], {}, outs))


register_op("meshweave.attention.default", shape=_attention_rule, flops=_attention_flops,
            category="attention",
            doc="training attention: (out, logsumexp); see ir/ops/attention.py")
register_op("meshweave.attention_backward.default", shape=_backward_rule,
            flops=_backward_flops, category="attention",
            doc="attention's gradients (dq, dk, dv) from the saved out and logsumexp")
