"""Matmul-class ops, attention, convolution and embedding: where the FLOPs are."""

from __future__ import annotations

import torch

from ..registry import register_op
from ..types import TensorType
from .common import broadcast_shapes, numel


def _mm_rule(a, b):
    return [TensorType((a.shape[0], b.shape[1]), a.dtype, a.device)]


def _mm_flops(args, kwargs, outs):
    a, b = args[0], args[1]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


register_op("aten.mm.default", shape=_mm_rule, flops=_mm_flops, category="matmul")


def _addmm_rule(bias, a, b, *, beta=1, alpha=1):
    return _mm_rule(a, b)


def _addmm_flops(args, kwargs, outs):
    return _mm_flops(args[1:], kwargs, outs) + numel(outs[0].shape)


register_op("aten.addmm.default", shape=_addmm_rule, flops=_addmm_flops, category="matmul")


def _bmm_rule(a, b):
    return [TensorType((a.shape[0], a.shape[1], b.shape[2]), a.dtype, a.device)]


def _bmm_flops(args, kwargs, outs):
    a, b = args[0], args[1]
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


register_op("aten.bmm.default", shape=_bmm_rule, flops=_bmm_flops, category="matmul")


def _linear_rule(x, w, bias=None):
    return [TensorType(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype, x.device)]


def _linear_flops(args, kwargs, outs):
    x, w = args[0], args[1]
    return 2 * numel(x.shape) * w.shape[0]


register_op("aten.linear.default", shape=_linear_rule, flops=_linear_flops, category="matmul")


def _matmul_rule(a, b):
    if a.rank == 1 and b.rank == 1:
        return [TensorType((), a.dtype, a.device)]
    if b.rank == 1:
        return [a.with_shape(a.shape[:-1])]
    if a.rank == 1:
        return [b.with_shape(tuple(b.shape[:-2]) + (b.shape[-1],))]
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), a.dtype, a.device)]


def _matmul_flops(args, kwargs, outs):
    return 2 * numel(outs[0].shape) * args[0].shape[-1]


register_op("aten.matmul.default", shape=_matmul_rule, flops=_matmul_flops, category="matmul")


def _sdpa_rule(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
               enable_gqa=False):
    return [TensorType(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype, q.device)]


def _sdpa_flops(args, kwargs, outs):
    q, k, v = args[0], args[1], args[2]
    batch_heads = numel(q.shape[:-2])
    return 2 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


register_op("aten.scaled_dot_product_attention.default", shape=_sdpa_rule, flops=_sdpa_flops,
            category="attention")


def _embedding_rule(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return [TensorType(tuple(indices.shape) + (weight.shape[1],), weight.dtype, weight.device)]


def _embedding_bytes(args, kwargs, outs):
    # Reads only the gathered rows and the indices, not the whole table.
    return 2 * outs[0].nbytes() + args[1].nbytes()


register_op("aten.embedding.default", shape=_embedding_rule, flops=lambda a, k, o: 0,
            category="gather", bytes=_embedding_bytes)


def _conv_out(size, k, stride, pad, dil):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_rule(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        return None
    nd = w.rank - 2
    spatial = []
    for i in range(nd):
        def pick(s, i=i):
            return s[i] if len(s) > 1 else s[0]

        spatial.append(_conv_out(x.shape[2 + i], w.shape[2 + i], pick(stride), pick(padding),
                                 pick(dilation)))
    return [TensorType((x.shape[0], w.shape[0], *spatial), x.dtype, x.device)]


def _conv_flops(args, kwargs, outs):
    w = args[1]
    return 2 * numel(outs[0].shape) * numel(w.shape[1:])


register_op("aten.convolution.default", shape=_conv_rule, flops=_conv_flops, category="conv")


# The fused attention kernels that torch's decompositions call (in AOTAutograd's joint graphs
# and their forward programs): the same FLOPs as the public op. They return tuples (output,
# logsumexp, and on CUDA RNG state and sequence lengths), whose types the traced values carry,
# so no shape rule is registered.
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(torch.ops.aten, _name):
        register_op(f"aten.{_name}.default", flops=_sdpa_flops, category="attention")
