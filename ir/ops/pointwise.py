"""Elementwise ops: one output, broadcast of the tensor inputs, promoted dtype."""

from __future__ import annotations

import torch

from ..registry import register_op
from ..types import TensorType
from .common import broadcast_shapes, first_tensor, numel, result_dtype

UNARY = ["abs", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "sinh", "cosh", "asin", "acos", "atan", "asinh", "acosh", "atanh", "sigmoid", "relu", "gelu", "silu", "erf", "erfc", "erfinv", "ceil", "floor", "round", "trunc", "sign", "reciprocal", "bitwise_not", "logical_not", "isnan", "isinf", "isfinite", "hardtanh", "leaky_relu", "elu", "clone", "softplus", "hardswish", "hardsigmoid", "mish", "alias", "lift_fresh_copy", "detach", "frac"]

BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "fmod", "remainder", "atan2", "bitwise_and", "bitwise_or", "bitwise_xor", "logical_and", "logical_or", "logical_xor", "eq", "ne", "lt", "le", "gt", "ge", "copy", "floor_divide", "rsub", "hypot"]

# AOTAutograd's activation backwards (grad, input or output[, flags]): elementwise too
BACKWARD = ["gelu_backward", "silu_backward", "sigmoid_backward", "tanh_backward",
            "threshold_backward"]

COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite"}
LOGICAL = {"logical_and", "logical_or", "logical_xor", "logical_not"}
FLOAT_RESULT = {"exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "sin", "cos", "erf", "exp2",
                "log2", "log10", "log1p", "expm1", "reciprocal"}
OVERLOADS = ("default", "Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor", "Scalar_Tensor",
             "self", "ScalarOther", "ScalarSelf", "Tensor_mode", "Scalar_mode")


def _pointwise_shape(base: str):
    def rule(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, TensorType)]
        shape = broadcast_shapes(*(t.shape for t in tensors))
        if base in COMPARISONS or base in LOGICAL:
            dtype = torch.bool
        elif base == "copy":
            dtype = args[0].dtype
        else:
            dtype = result_dtype(*[a for a in args if not isinstance(a, (list, dict))])
            if base == "div" and kwargs.get("rounding_mode") is None and not dtype.is_floating_point:
                dtype = torch.get_default_dtype()
            if base in FLOAT_RESULT and not dtype.is_floating_point:
                dtype = torch.get_default_dtype()
        return [TensorType(shape, dtype, first_tensor(args).device)]

    return rule


def _pointwise_flops(args, kwargs, outs):
    return numel(outs[0].shape)


def _register_family(base: str) -> None:
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return
    for ov in packet.overloads():
        if ov not in OVERLOADS:
            continue
        register_op(f"aten.{base}.{ov}", getattr(packet, ov), shape=_pointwise_shape(base),
                    flops=_pointwise_flops, category="pointwise")


for _name in UNARY + BINARY + BACKWARD:
    _register_family(_name)


def _where_shape(cond, a, b):
    shapes = [x.shape for x in (cond, a, b) if isinstance(x, TensorType)]
    vals = [x for x in (a, b) if isinstance(x, TensorType)] or [cond]
    dtype = result_dtype(*[x for x in (a, b)]) if vals[0] is not cond else torch.float32
    return [TensorType(broadcast_shapes(*shapes), dtype, cond.device)]


register_op("aten.where.self", shape=_where_shape, flops=_pointwise_flops, category="pointwise")


def _to_copy_shape(x, **kwargs):
    dtype = kwargs.get("dtype") or x.dtype
    device = kwargs.get("device")
    dev = x.device if device is None else torch.device(device).type
    return [TensorType(x.shape, dtype, dev)]


register_op("aten._to_copy.default", shape=_to_copy_shape, flops=_pointwise_flops,
            category="pointwise")


def _clamp_shape(x, *args, **kwargs):
    return [TensorType(x.shape, x.dtype, x.device)]


for _ov in ("default", "Tensor"):
    register_op(f"aten.clamp.{_ov}", shape=_clamp_shape, flops=_pointwise_flops,
                category="pointwise")
for _ov in ("default",):
    register_op(f"aten.clamp_min.{_ov}", shape=_clamp_shape, flops=_pointwise_flops,
                category="pointwise")
    register_op(f"aten.clamp_max.{_ov}", shape=_clamp_shape, flops=_pointwise_flops,
                category="pointwise")


def _masked_fill_shape(x, mask, value):
    return [TensorType(broadcast_shapes(x.shape, mask.shape), x.dtype, x.device)]


register_op("aten.masked_fill.Scalar", shape=_masked_fill_shape, flops=_pointwise_flops,
            category="pointwise")
register_op("aten.masked_fill.Tensor", shape=_masked_fill_shape, flops=_pointwise_flops,
            category="pointwise")
