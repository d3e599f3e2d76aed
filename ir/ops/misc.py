"""Tensor creation, pooling/resampling, and SymInt arithmetic (`sym.*`).

Creation ops take their shape from arguments; SymInt ops compute sizes from sizes and are what
torch.export emits for dynamic dimensions (`x.shape[0] * 5`).
"""

from __future__ import annotations

import math
import operator

import torch

from ..registry import register_op
from ..types import OpaqueType, ScalarType, TensorType
from .common import as_dim, numel


def _device_of(device) -> str:
    return "cpu" if device is None else torch.device(device).type


def _full_rule(size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is None:
        dtype = (torch.bool if isinstance(fill_value, bool) else
                 torch.int64 if isinstance(fill_value, int) else torch.get_default_dtype())
    return [TensorType(tuple(as_dim(s) for s in size), dtype, _device_of(device))]


def _fill_flops(args, kwargs, outs):
    return 0


register_op("aten.full.default", shape=_full_rule, flops=_fill_flops, category="creation")


def _like_rule(x, *args, dtype=None, layout=None, device=None, pin_memory=None,
               memory_format=None):
    return [TensorType(x.shape, dtype or x.dtype, _device_of(device) if device else x.device)]


for _name in ("full_like.default", "zeros_like.default", "ones_like.default",
              "empty_like.default"):
    register_op(f"aten.{_name}", shape=_like_rule, flops=_fill_flops, category="creation")


def _sized_rule(size, *, dtype=None, layout=None, device=None, pin_memory=None,
                memory_format=None):
    return [TensorType(tuple(as_dim(s) for s in size), dtype or torch.get_default_dtype(),
                       _device_of(device))]


for _name in ("zeros.default", "ones.default", "empty.memory_format"):
    register_op(f"aten.{_name}", shape=_sized_rule, flops=_fill_flops, category="creation")


def _arange_rule(start, end=None, step=1, *, dtype=None, layout=None, device=None,
                 pin_memory=None):
    if end is None:
        start, end = 0, start
    vals = [start, end, step]
    if any(isinstance(v, ScalarType) for v in vals):
        length = (as_dim(end) - as_dim(start))
    else:
        length = max(0, math.ceil((end - start) / step))
    if dtype is None:
        dtype = torch.int64 if all(isinstance(v, (int, ScalarType)) for v in vals) else (
            torch.get_default_dtype())
    return [TensorType((length,), dtype, _device_of(device))]


register_op("aten.arange.start_step", shape=_arange_rule, flops=_fill_flops, category="creation")
register_op("aten.arange.default", shape=_arange_rule, flops=_fill_flops, category="creation")
register_op("aten.arange.start", shape=_arange_rule, flops=_fill_flops, category="creation")


def _scalar_tensor_rule(value, *, dtype=None, layout=None, device=None, pin_memory=None):
    return [TensorType((), dtype or torch.get_default_dtype(), _device_of(device))]


register_op("aten.scalar_tensor.default", shape=_scalar_tensor_rule, flops=_fill_flops,
            category="creation")


def _pool_flops(args, kwargs, outs):
    return numel(args[0].shape)


for _name in ("max_pool2d_with_indices.default", "avg_pool2d.default",
              "_adaptive_avg_pool2d.default", "upsample_nearest2d.vec",
              "upsample_bilinear2d.vec", "_unsafe_index.Tensor"):
    register_op(f"aten.{_name}", flops=_pool_flops, category="pool")

# ---- SymInt arithmetic ------------------------------------------------------------------------


def _sym_result(fn):
    def rule(*args):
        exprs = [a.expr if isinstance(a, ScalarType) else a for a in args]
        if any(e is None for e in exprs):
            return [ScalarType("int")]
        return [ScalarType("int", fn(*exprs))]

    return rule


def _floordiv(a, b):
    import sympy

    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return sympy.floor(sympy.sympify(a) / b)


_SYM_OPS = {
    "sym.add": operator.add,
    "sym.sub": operator.sub,
    "sym.mul": operator.mul,
    "sym.floordiv": operator.floordiv,
    "sym.mod": operator.mod,
    "sym.neg": operator.neg,
}
_SYM_COMPARE = {
    "sym.gt": operator.gt, "sym.lt": operator.lt, "sym.ge": operator.ge,
    "sym.le": operator.le, "sym.eq": operator.eq, "sym.ne": operator.ne,
}
_SYM_SHAPE = {"sym.floordiv": _floordiv}
for _name, _fn in _SYM_OPS.items():
    register_op(_name, _fn, shape=_sym_result(_SYM_SHAPE.get(_name, _fn)),
                flops=lambda a, k, o: 0, category="sym")


for _name, _fn in _SYM_COMPARE.items():
    register_op(_name, _fn, shape=lambda *a: [ScalarType("bool")], flops=lambda a, k, o: 0,
                category="sym")


def _sym_size_rule(x, dim):
    return [ScalarType("int", x.shape[dim])]


register_op("aten.sym_size.int", shape=_sym_size_rule, flops=lambda a, k, o: 0, category="sym")
register_op("aten.sym_numel.default", shape=lambda x: [ScalarType("int", numel(x.shape))],
            flops=lambda a, k, o: 0, category="sym")


def _constant_rule(value):
    if isinstance(value, bool):
        return [ScalarType("bool", None)]
    if isinstance(value, int):
        return [ScalarType("int", value)]
    if isinstance(value, float):
        return [ScalarType("float", None)]
    return None


register_op("prim.constant", lambda value: value, shape=_constant_rule, flops=lambda a, k, o: 0,
            category="constant", doc="a Python constant returned by the model")


register_op("aten._assert_tensor_metadata.default", shape=lambda *a, **k: [OpaqueType("none")],
            flops=lambda a, k, o: 0, category="assert",
            doc="a trace-time metadata check; dead after tracing, DCE removes it")
