"""Reductions and normalizations: sum, mean, amax, softmax, layer norm, variance."""

from __future__ import annotations

import torch

from ..registry import register_op
from ..types import TensorType
from .common import norm_dim, numel


def _reduce_shape(x: TensorType, dims, keepdim: bool, dtype=None) -> TensorType:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, x.rank) for d in dims}
    shape = [(1 if i in dims else d) for i, d in enumerate(x.shape) if keepdim or i not in dims]
    return TensorType(tuple(shape), dtype or x.dtype, x.device)


def _dim_reduction(default_dtype=None):
    def rule(x, dim=None, keepdim=False, *rest, dtype=None, **kw):
        out_dtype = dtype or default_dtype or x.dtype
        if default_dtype is None and not out_dtype.is_floating_point and dtype is None:
            out_dtype = x.dtype if x.dtype != torch.bool else torch.int64
        return [_reduce_shape(x, dim, keepdim, out_dtype)]

    return rule


def _input_flops(args, kwargs, outs):
    return numel(args[0].shape)


def _sum_rule(x, dim=None, keepdim=False, *, dtype=None):
    out_dtype = dtype or (torch.int64 if x.dtype in (torch.bool, torch.int32, torch.int8,
                                                        torch.uint8, torch.int16) else x.dtype)
    return [_reduce_shape(x, dim, keepdim, out_dtype)]


register_op("aten.sum.dim_IntList", shape=_sum_rule, flops=_input_flops, category="reduction")
register_op("aten.sum.default", shape=lambda x, *, dtype=None: _sum_rule(x, None, False,
            dtype=dtype), flops=_input_flops, category="reduction")
register_op("aten.mean.dim", shape=_dim_reduction(), flops=_input_flops, category="reduction")
register_op("aten.mean.default", shape=lambda x, *, dtype=None: [_reduce_shape(x, None, False,
            dtype)], flops=_input_flops, category="reduction")
for _name in ("amax", "amin"):
    register_op(f"aten.{_name}.default", shape=_dim_reduction(), flops=_input_flops,
                category="reduction")
register_op("aten.prod.dim_int", shape=_dim_reduction(), flops=_input_flops,
            category="reduction")


def _bool_reduction(x, dim=None, keepdim=False):
    return [_reduce_shape(x, dim, keepdim, torch.bool)]


register_op("aten.any.dim", shape=_bool_reduction, flops=_input_flops, category="reduction")
register_op("aten.any.dims", shape=_bool_reduction, flops=_input_flops, category="reduction")
register_op("aten.any.default", shape=lambda x: _bool_reduction(x), flops=_input_flops,
            category="reduction")
register_op("aten.all.dim", shape=_bool_reduction, flops=_input_flops, category="reduction")
register_op("aten.all.default", shape=lambda x: _bool_reduction(x), flops=_input_flops,
            category="reduction")


def _var_rule(x, dim=None, *, correction=None, keepdim=False):
    return [_reduce_shape(x, dim, keepdim)]


register_op("aten.var.correction", shape=_var_rule, flops=_input_flops, category="reduction")


def _argmax_rule(x, dim=None, keepdim=False):
    return [_reduce_shape(x, dim, keepdim, torch.int64)]


register_op("aten.argmax.default", shape=_argmax_rule, flops=_input_flops, category="reduction")
register_op("aten.argmin.default", shape=_argmax_rule, flops=_input_flops, category="reduction")


def _max_dim_rule(x, dim, keepdim=False):
    return [_reduce_shape(x, dim, keepdim), _reduce_shape(x, dim, keepdim, torch.int64)]


register_op("aten.max.dim", shape=_max_dim_rule, flops=_input_flops, category="reduction")
register_op("aten.min.dim", shape=_max_dim_rule, flops=_input_flops, category="reduction")


def _softmax_rule(x, dim, half_to_float):
    dtype = torch.float32 if half_to_float else x.dtype
    return [TensorType(x.shape, dtype, x.device)]


def _softmax_flops(args, kwargs, outs):
    return 5 * numel(args[0].shape)


register_op("aten._softmax.default", shape=_softmax_rule, flops=_softmax_flops,
            category="reduction")
register_op("aten._log_softmax.default", shape=_softmax_rule, flops=_softmax_flops,
            category="reduction")


def _layer_norm_rule(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    k = len(normalized_shape)
    stat_shape = tuple(x.shape[: x.rank - k]) + (1,) * k
    # CUDA keeps mean/rstd of half inputs in fp32; the CPU kernel returns the input dtype.
    half = x.dtype in (torch.float16, torch.bfloat16)
    stat_dtype = torch.float32 if half and x.device != "cpu" else x.dtype
    return [
        TensorType(x.shape, x.dtype, x.device),
        TensorType(stat_shape, stat_dtype, x.device),
        TensorType(stat_shape, stat_dtype, x.device),
    ]


def _norm_flops(args, kwargs, outs):
    return 8 * numel(args[0].shape)


register_op("aten.native_layer_norm.default", shape=_layer_norm_rule, flops=_norm_flops,
            category="reduction")


def _batch_norm_rule(x, weight, bias, mean, var, momentum, eps):
    return [TensorType(x.shape, x.dtype, x.device)] + [TensorType((0,), x.dtype, x.device)] * 2


register_op("aten._native_batch_norm_legit_no_training.default", shape=_batch_norm_rule,
            flops=_norm_flops, category="reduction")


def _cumsum_rule(x, dim, *, dtype=None):
    if dtype is None:
        dtype = x.dtype if x.dtype.is_floating_point or x.dtype.is_complex else torch.int64
    return [TensorType(x.shape, dtype, x.device)]


register_op("aten.cumsum.default", shape=_cumsum_rule, flops=_input_flops, category="scan")


def _topk_rule(x, k, dim=-1, largest=True, sorted=True):
    d = norm_dim(dim, x.rank)
    shape = list(x.shape)
    shape[d] = k
    return [x.with_shape(shape), TensorType(tuple(shape), torch.int64, x.device)]


register_op("aten.topk.default", shape=_topk_rule, flops=_input_flops, category="sort")


def _sort_rule(x, dim=-1, descending=False):
    return [x, TensorType(x.shape, torch.int64, x.device)]


register_op("aten.sort.default", shape=_sort_rule, flops=_input_flops, category="sort")
