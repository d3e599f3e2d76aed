"""LOWERINGS: the per-op rule table that turns one IR node into a Triton expression.

Two kinds of rule, both keyed by op name in `LOWERINGS = RuleTable("triton_lowering")`:

  Pointwise(fn)  elementwise ops. The kernel context evaluates the tensor inputs at the
                 (broadcast) index, casts them to the output's compute type, and calls
                 fn(node, *args, **kwargs) with TVars in place of tensors; fn returns source text.
  Indexed(fn)    ops whose inputs are read at a *different* index than the output: gathers
                 (embedding), concatenation, padding, creation ops (full, arange), tril/triu.
                 fn(ctx, node, index) evaluates what it needs through ctx and returns a TVar.

Adding an op means adding an entry here; the scheduler fuses any op that has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy
import torch

from meshweave.ir.graph import Node, Value, map_values
from meshweave.ir.registry import RuleTable
from meshweave.ir.types import ScalarType
from .indexing import FloorDiv, broadcast_index, scalar_arg, to_expr
from .tvalues import CodegenError, TVar, cast, compute_ctype, is_float_ctype, lit, promote_ctypes

LOWERINGS = RuleTable("triton_lowering")


@dataclasses.dataclass(frozen=True)
class Pointwise:
    fn: Callable[..., str]
    cast: str = "out"  # "out": inputs to the output's compute type; "common": to their
    #                    promoted type (comparisons); "none": the rule casts itself
    supports: Callable[[Node], str | None] | None = None

    def lower(self, ctx, node: Node, pos: int, index) -> TVar:
        out = node.outputs[0].tensor_type
        axes: set = set()

        def arg(v: Value):
            if isinstance(v.type, ScalarType):
                return ctx.scalar(v)
            tv = ctx.value(v, broadcast_index(index, out.shape, v.tensor_type.shape))
            axes.update(tv.axes)
            return tv

        args = map_values(node.args, arg)
        kwargs = map_values(node.kwargs, arg)
        target = compute_ctype(out.dtype)
        if self.cast == "common":
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, TVar)]
            target = promote_ctypes(*(t.ctype for t in tensors)) if tensors else target
        if self.cast != "none":
            args = tuple(cast(a, target) if isinstance(a, TVar) else a for a in args)
            kwargs = {k: cast(a, target) if isinstance(a, TVar) else a for k, a in kwargs.items()}
        text = self.fn(node, *args, **kwargs)
        return ctx.emit(text, compute_ctype(out.dtype), axes)


@dataclasses.dataclass(frozen=True)
class Indexed:
    fn: Callable[..., TVar]
    supports: Callable[[Node], str | None] | None = None

    def lower(self, ctx, node: Node, pos: int, index) -> TVar:
        return self.fn(ctx, node, index)


def pointwise(*ops: str, cast: str = "out", supports=None):
    def deco(fn):
        LOWERINGS.register(*ops)(Pointwise(fn, cast, supports))
        return fn

    return deco


def indexed(*ops: str, supports=None):
    def deco(fn):
        LOWERINGS.register(*ops)(Indexed(fn, supports))
        return fn

    return deco


def _ops(base: str, *overloads: str) -> list[str]:
    return [f"aten.{base}.{ov}" for ov in overloads]


def _out_ctype(node: Node) -> str:
    return compute_ctype(node.outputs[0].tensor_type.dtype)


def _s(x) -> str:
    return x if isinstance(x, str) else lit(x)


def tanh(x: str) -> str:
    # 1 - 2 / (exp(2x) + 1): exact at both tails; libdevice.tanh is not available under the
    # Triton interpreter, and this costs one exp like Inductor's fallback formula.
    return f"(1.0 - 2.0 / (tl.exp(2.0 * {x}) + 1.0))"


# --- arithmetic -------------------------------------------------------------------------------
def _alpha(x, alpha) -> str:
    return _s(x) if alpha == 1 else f"{_s(x)} * {lit(alpha)}"


@pointwise(*_ops("add", "Tensor", "Scalar"))
def _add(node, a, b, alpha=1):
    return f"{_s(a)} + {_alpha(b, alpha)}"


@pointwise(*_ops("sub", "Tensor", "Scalar"))
def _sub(node, a, b, alpha=1):
    return f"{_s(a)} - {_alpha(b, alpha)}"


@pointwise(*_ops("rsub", "Tensor", "Scalar"))
def _rsub(node, a, b, alpha=1):
    return f"{_s(b)} - {_alpha(a, alpha)}"


@pointwise(*_ops("mul", "Tensor", "Scalar"))
def _mul(node, a, b):
    return f"{_s(a)} * {_s(b)}"


def _div_supported(node: Node) -> str | None:
    mode = node.kwargs.get("rounding_mode")
    if mode is not None and not node.outputs[0].tensor_type.dtype.is_floating_point:
        return f"integer division with rounding_mode={mode!r}"
    return None


@pointwise(*_ops("div", "Tensor", "Scalar", "Tensor_mode", "Scalar_mode"), supports=_div_supported)
def _div(node, a, b, rounding_mode=None):
    q = f"{_s(a)} / {_s(b)}"
    if rounding_mode == "floor":
        return f"tl.math.floor({q})"
    if rounding_mode == "trunc":
        return f"tl.where({q} < 0, tl.math.ceil({q}), tl.math.floor({q}))"
    return q


def _float_only(node: Node) -> str | None:
    if not node.outputs[0].tensor_type.dtype.is_floating_point:
        return f"{node.op} on {node.outputs[0].tensor_type.dtype}"
    return None


@pointwise(*_ops("fmod", "Tensor", "Scalar"), supports=_float_only)
def _fmod(node, a, b):
    q = f"{_s(a)} / {_s(b)}"
    return f"{_s(a)} - {_s(b)} * tl.where({q} < 0, tl.math.ceil({q}), tl.math.floor({q}))"


@pointwise(*_ops("remainder", "Tensor", "Scalar"), supports=_float_only)
def _remainder(node, a, b):
    return f"{_s(a)} - {_s(b)} * tl.math.floor({_s(a)} / {_s(b)})"


@pointwise(*_ops("pow", "Tensor_Scalar", "Tensor_Tensor", "Scalar"))
def _pow(node, a, b):
    if not isinstance(b, TVar):
        e = float(b)
        if e == int(e) and 0 <= e <= 4:
            return " * ".join([_s(a)] * int(e)) if e else "1.0"
        if e == 0.5:
            return f"tl.sqrt({_s(a)})"
        if e == -0.5:
            return f"tl.rsqrt({_s(a)})"
        if e == int(e) and -4 <= e < 0:
            return f"1.0 / ({' * '.join([_s(a)] * int(-e))})"
        if e == int(e):
            sign = f"tl.where({_s(a)} < 0, -1.0, 1.0)" if int(e) % 2 else "1.0"
            return f"{sign} * tl.exp2({lit(e)} * tl.log2(tl.abs({_s(a)})))"
    return f"tl.exp2({_s(b)} * tl.log2({_s(a)}))"


@pointwise("aten.hypot.default")
def _hypot(node, a, b):
    return f"tl.sqrt({_s(a)} * {_s(a)} + {_s(b)} * {_s(b)})"


# --- unary math -------------------------------------------------------------------------------
_UNARY = {
    "neg": "-{a}",
    "abs": "tl.abs({a})",
    "exp": "tl.exp({a})",
    "exp2": "tl.exp2({a})",
    "expm1": "(tl.exp({a}) - 1.0)",
    "log": "tl.log({a})",
    "log1p": "tl.log(1.0 + {a})",
    "log2": "tl.log2({a})",
    "log10": "(tl.log({a}) * 0.4342944819032518)",
    "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})",
    "sin": "tl.sin({a})",
    "cos": "tl.cos({a})",
    "sigmoid": "tl.sigmoid({a})",
    "relu": "tl.where({a} < 0, 0, {a})",
    "silu": "{a} * tl.sigmoid({a})",
    "erf": "tl.math.erf({a})",
    "erfc": "(1.0 - tl.math.erf({a}))",
    "reciprocal": "1.0 / {a}",
    "clone": "{a}",
    "hardsigmoid": "(tl.minimum(tl.maximum({a} + 3.0, 0.0), 6.0) / 6.0)",
    "hardswish": "{a} * (tl.minimum(tl.maximum({a} + 3.0, 0.0), 6.0) / 6.0)",
    "sign": "tl.where({a} > 0, 1, tl.where({a} < 0, -1, 0))",
}
_FLOAT_UNARY = {
    "ceil": "tl.math.ceil({a})",
    "floor": "tl.math.floor({a})",
    "trunc": "tl.where({a} < 0, tl.math.ceil({a}), tl.math.floor({a}))",
}


def _unary(template: str):
    def fn(node, a, *rest, **kw):
        return template.format(a=a)

    return fn


for _name, _tmpl in _UNARY.items():
    pointwise(f"aten.{_name}.default")(_unary(_tmpl))


def _rounding(template: str):
    def fn(node, a, *rest, **kw):
        return template.format(a=a) if is_float_ctype(a.ctype) else a

    return fn


for _name, _tmpl in _FLOAT_UNARY.items():
    pointwise(f"aten.{_name}.default")(_rounding(_tmpl))


@pointwise("aten.tanh.default")
def _tanh(node, a):
    return tanh(a)


def _gelu_supported(node: Node) -> str | None:
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return None if approx in ("none", "tanh") else f"gelu approximate={approx!r}"


@pointwise("aten.gelu.default", supports=_gelu_supported)
def _gelu(node, a, approximate="none"):
    if approximate == "tanh":
        inner = f"0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})"
        return f"0.5 * {a} * (1.0 + {tanh('(' + inner + ')')})"
    return f"0.5 * {a} * (1.0 + tl.math.erf({a} * 0.7071067811865476))"


@pointwise("aten.hardtanh.default")
def _hardtanh(node, a, min_val=-1.0, max_val=1.0):
    return f"tl.minimum(tl.maximum({a}, {lit(float(min_val))}), {lit(float(max_val))})"


@pointwise("aten.leaky_relu.default")
def _leaky_relu(node, a, negative_slope=0.01):
    return f"tl.where({a} > 0, {a}, {a} * {lit(float(negative_slope))})"


@pointwise("aten.elu.default")
def _elu(node, a, alpha=1.0, scale=1.0, input_scale=1.0):
    neg = f"{lit(float(alpha * scale))} * (tl.exp({a} * {lit(float(input_scale))}) - 1.0)"
    return f"tl.where({a} > 0, {a} * {lit(float(scale))}, {neg})"


def _softplus_text(a: str, beta=1.0, threshold=20.0) -> str:
    b = lit(float(beta))
    return (
        f"tl.where({a} * {b} > {lit(float(threshold))}, {a}, tl.log(1.0 + tl.exp({a} * {b})) / {b})"
    )


@pointwise("aten.softplus.default")
def _softplus(node, a, beta=1.0, threshold=20.0):
    return _softplus_text(a, beta, threshold)


@pointwise("aten.mish.default")
def _mish(node, a):
    return f"{a} * {tanh(_softplus_text(a))}"


# --- comparisons and logic --------------------------------------------------------------------
def _binary(op: str, wrap: Callable = _s):
    def fn(node, a, b):
        return f"{wrap(a)} {op} {wrap(b)}"

    return fn


_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
for _name, _op in _CMP.items():
    pointwise(*_ops(_name, "Tensor", "Scalar"), cast="common")(_binary(_op))


@pointwise("aten.isnan.default", cast="none")
def _isnan(node, a):
    return f"{a} != {a}"


@pointwise("aten.isinf.default", cast="none")
def _isinf(node, a):
    return f'tl.abs({a}) == float("inf")' if is_float_ctype(a.ctype) else "0"


@pointwise("aten.isfinite.default", cast="none")
def _isfinite(node, a):
    return f'({a} == {a}) & (tl.abs({a}) != float("inf"))' if is_float_ctype(a.ctype) else "1"


def _truth(x) -> str:
    return x if isinstance(x, TVar) and x.ctype == "tl.int1" else f"({_s(x)} != 0)"


@pointwise("aten.logical_not.default", cast="none")
def _logical_not(node, a):
    return f"{a} == 0"


_LOGIC = {"logical_and": "&", "logical_or": "|", "logical_xor": "^"}
for _name, _op in _LOGIC.items():
    pointwise(f"aten.{_name}.default", cast="none")(_binary(_op, _truth))

_BITWISE = {"bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}
for _name, _op in _BITWISE.items():
    pointwise(*_ops(_name, "Tensor", "Scalar"))(_binary(_op))


def _int_only(node: Node) -> str | None:
    if node.outputs[0].tensor_type.dtype.is_floating_point:
        return f"{node.op} on {node.outputs[0].tensor_type.dtype}"
    return None


@pointwise("aten.bitwise_not.default", supports=_int_only)
def _bitwise_not(node, a):
    return f"{a} == 0" if a.ctype == "tl.int1" else f"~{a}"


@pointwise(*_ops("maximum", "default"))
def _maximum(node, a, b):
    return f"tl.where(({a} != {a}) | ({a} > {b}), {a}, {b})"


@pointwise(*_ops("minimum", "default"))
def _minimum(node, a, b):
    return f"tl.where(({a} != {a}) | ({a} < {b}), {a}, {b})"


@pointwise("aten.where.self", cast="none")
def _where(node, cond, a, b):
    ct = _out_ctype(node)
    return f"tl.where({_truth(cond)}, {_s(cast(a, ct))}, {_s(cast(b, ct))})"


@pointwise("aten.masked_fill.Scalar", "aten.masked_fill.Tensor", cast="none")
def _masked_fill(node, x, mask, value):
    ct = _out_ctype(node)
    return f"tl.where({_truth(mask)}, {_s(cast(value, ct))}, {_s(cast(x, ct))})"


def _clamp_text(a, lo, hi) -> str:
    out = a
    if lo is not None:
        out = f"tl.maximum({out}, {_s(lo)})"
    if hi is not None:
        out = f"tl.minimum({out}, {_s(hi)})"
    return out


@pointwise("aten.clamp.default", "aten.clamp.Tensor")
def _clamp(node, a, min=None, max=None):
    return _clamp_text(a, min, max)


@pointwise("aten.clamp_min.default")
def _clamp_min(node, a, min):
    return _clamp_text(a, min, None)


@pointwise("aten.clamp_max.default")
def _clamp_max(node, a, max):
    return _clamp_text(a, None, max)


# --- conversions ------------------------------------------------------------------------------
def _to_copy_supported(node: Node) -> str | None:
    dev = node.kwargs.get("device")
    if dev is not None and torch.device(dev).type != node.args[0].tensor_type.device:
        return "device transfer"
    return None


@pointwise("aten._to_copy.default", cast="none", supports=_to_copy_supported)
def _to_copy(node, a, **kwargs):
    dtype = node.outputs[0].tensor_type.dtype
    target = compute_ctype(dtype)
    if dtype in (torch.float16, torch.bfloat16):  # explicit casts round, as in eager
        storage = "tl.float16" if dtype == torch.float16 else "tl.bfloat16"
        return f"{cast(a, 'tl.float32')}.to({storage}).to(tl.float32)"
    return cast(a, target)


@pointwise("aten.copy.default", cast="none")
def _copy(node, dst, src, non_blocking=False):
    return cast(src, _out_ctype(node))


# --- indexed ops: gathers, concatenation, padding, creation -----------------------------------
@indexed("aten.embedding.default")
def _embedding(ctx, node, index):
    weight, ids = node.args[0], node.args[1]
    row = ctx.indirect(ctx.value(ids, tuple(index[:-1])))
    return ctx.value(weight, (row, index[-1]))


@indexed("aten.index_select.default")
def _index_select(ctx, node, index):
    x, dim, ids = node.args[0], node.args[1] % node.args[0].tensor_type.rank, node.args[2]
    pos = ctx.indirect(ctx.value(ids, (index[dim],)))
    return ctx.value(x, tuple(pos if d == dim else i for d, i in enumerate(index)))


def _index_tensors(node: Node) -> list[int]:
    return [i for i, t in enumerate(node.args[1]) if isinstance(t, Value)]


def _index_supported(node: Node) -> str | None:
    present = _index_tensors(node)
    if not present:
        return "index with no index tensors"
    if present != list(range(present[0], present[-1] + 1)):
        return "advanced indexing with non-adjacent index tensors (result dims move first)"
    for i in present:
        dtype = node.args[1][i].tensor_type.dtype
        if dtype not in (torch.int64, torch.int32):
            return f"advanced indexing with a {dtype} index (boolean masks have data-dependent shapes)"
    return None


@indexed("aten.index.Tensor", supports=_index_supported)
def _index(ctx, node, index):
    """x[..., i0, i1, ...] with adjacent integer index tensors (broadcast together): the
    broadcast index dims replace the indexed dims in place; negative indices wrap."""
    x, indices = node.args[0], node.args[1]
    present = _index_tensors(node)
    first = present[0]
    out_shape = node.outputs[0].tensor_type.shape
    m = len(out_shape) - (x.tensor_type.rank - len(present))  # rank of the broadcast index
    b_index, b_shape = tuple(index[first : first + m]), tuple(out_shape[first : first + m])
    src = list(index[:first])
    for j in present:
        t = indices[j]
        iv = ctx.value(t, broadcast_index(b_index, b_shape, t.tensor_type.shape))
        size = ctx.sym_text(to_expr(x.tensor_type.shape[j]))
        iv = ctx.emit(f"tl.where({iv} < 0, {iv} + {size}, {iv})", iv.ctype, iv.axes)
        src.append(ctx.indirect(iv))
    src += list(index[first + m :])
    return ctx.value(x, tuple(src))


@indexed("aten.flip.default")
def _flip(ctx, node, index):
    x = node.args[0]
    shape, rank = x.tensor_type.shape, x.tensor_type.rank
    dims = {d % rank for d in node.args[1]}
    src = tuple(to_expr(shape[d]) - 1 - i if d in dims else i for d, i in enumerate(index))
    return ctx.value(x, src)


@indexed("aten.cat.default")
def _cat(ctx, node, index):
    tensors = [
        t for t in node.args[0] if not (t.tensor_type.rank == 1 and t.tensor_type.shape[0] == 0)
    ]
    rank = node.outputs[0].tensor_type.rank
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
    ct = _out_ctype(node)
    branches = []
    offset = sympy.Integer(0)
    for t in tensors:
        size = to_expr(t.tensor_type.shape[dim])
        lo, hi = offset, offset + size
        cond = ctx.condition(index[dim], lo, hi)
        sub = tuple(i - lo if d == dim else i for d, i in enumerate(index))
        with ctx.masked(cond):
            branches.append((cond, cast(ctx.value(t, sub), ct)))
        offset = hi
    result = branches[-1][1]
    axes = set(result.axes) if isinstance(result, TVar) else set()
    for cond, val in reversed(branches[:-1]):
        axes |= set(getattr(val, "axes", ())) | set(cond.axes)
        result = ctx.emit(f"tl.where({cond}, {val}, {result})", ct, axes)
    return result if isinstance(result, TVar) else ctx.emit(result, ct, axes)


@indexed("aten.constant_pad_nd.default")
def _constant_pad(ctx, node, index):
    x, pad = node.args[0], node.args[1]
    value = node.args[2] if len(node.args) > 2 else 0.0
    shape = x.tensor_type.shape
    ct = _out_ctype(node)
    sub = list(index)
    conds = []
    for i in range(len(pad) // 2):
        d = len(shape) - 1 - i
        before = to_expr(scalar_arg(pad[2 * i]))
        sub[d] = index[d] - before
        conds.append(ctx.condition(sub[d], 0, to_expr(shape[d])))
    cond = ctx.emit(
        " & ".join(f"({c})" for c in conds), "tl.int1", set().union(*(c.axes for c in conds))
    )
    with ctx.masked(cond):
        inner = cast(ctx.value(x, tuple(sub)), ct)
    return ctx.emit(
        f"tl.where({cond}, {inner}, {cast(value, ct)})", ct, set(inner.axes) | set(cond.axes)
    )


def _fill_value(node: Node):
    op = node.op
    if op.startswith(("aten.zeros", "aten.empty")):
        return 0
    if op.startswith("aten.ones"):
        return 1
    if op == "aten.full_like.default":
        return node.args[1]
    return node.args[1] if op == "aten.full.default" else node.args[0]


def _fill_supported(node: Node) -> str | None:
    v = _fill_value(node)
    return None if isinstance(v, (int, float, bool)) else f"fill value {v!r}"


@indexed(
    "aten.full.default",
    "aten.full_like.default",
    "aten.zeros_like.default",
    "aten.ones_like.default",
    "aten.empty_like.default",
    "aten.zeros.default",
    "aten.ones.default",
    "aten.empty.memory_format",
    "aten.scalar_tensor.default",
    supports=_fill_supported,
)
def _fill(ctx, node, index):
    ct = _out_ctype(node)
    return TVar(cast(_fill_value(node), ct), ct)


@indexed("aten.arange.start_step", "aten.arange.default", "aten.arange.start")
def _arange(ctx, node, index):
    args = [scalar_arg(a) if isinstance(a, Value) else a for a in node.args]
    if node.op == "aten.arange.default" or len(args) == 1:
        start, step = 0, 1
    else:
        start, step = args[0], (args[2] if len(args) > 2 else 1)
    ct = _out_ctype(node)
    if isinstance(start, (int, sympy.Expr)) and isinstance(step, int):
        pos = ctx.index_tvar(to_expr(start) + index[0] * step)
        return ctx.emit(cast(pos, ct), ct, pos.axes)
    pos = ctx.index_tvar(index[0])
    expr = f"{lit(float(start))} + {cast(pos, 'tl.float32')} * {lit(float(step))}"
    return ctx.emit(cast(TVar(expr, "tl.float32", pos.axes), ct), ct, pos.axes)


@indexed("aten.tril.default", "aten.triu.default")
def _tril_triu(ctx, node, index):
    diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
    x = ctx.value(node.args[0], index)
    diff = ctx.index_tvar(index[-1] - index[-2])
    op = "<=" if node.op == "aten.tril.default" else ">="
    ct = _out_ctype(node)
    cond = f"(({diff}) {op} {lit(diagonal)})"
    return ctx.emit(f"tl.where({cond}, {x}, {cast(0, ct)})", ct, set(x.axes) | diff.axes)


# --- normalization with given statistics -------------------------------------------------------
def _batch_norm_supported(node: Node) -> str | None:
    x = node.args[0].tensor_type
    return None if x.rank >= 2 else f"batch norm of a rank-{x.rank} input"


@dataclasses.dataclass(frozen=True)
class FirstOutput(Indexed):
    """An Indexed rule for a multi-output op of which kernels compute output 0 only (the
    others, like batch norm's empty saved statistics in inference, are never read)."""

    def lower(self, ctx, node: Node, pos: int, index) -> TVar:
        if pos != 0:
            raise CodegenError(f"{node.op}: only output 0 is computed by kernels, not {pos}")
        return self.fn(ctx, node, index)


def _batch_norm_inference(ctx, node, index):
    """(x - running_mean) * rsqrt(running_var + eps) * weight + bias, per channel (dim 1)."""
    x, weight, bias, mean, var = node.args[:5]
    eps = float(node.args[6])
    channel = (index[1],)
    axes = set()

    def per_channel(v: Value) -> TVar:
        tv = ctx.value(v, channel)
        axes.update(tv.axes)
        return cast(tv, "tl.float32")

    xv = ctx.value(x, index)
    axes.update(xv.axes)
    expr = (f"({cast(xv, 'tl.float32')} - {per_channel(mean)}) * "
            f"tl.rsqrt({per_channel(var)} + {lit(eps)})")
    if isinstance(weight, Value):
        expr = f"{expr} * {per_channel(weight)}"
    if isinstance(bias, Value):
        expr = f"{expr} + {per_channel(bias)}"
    ct = _out_ctype(node)
    return ctx.emit(cast(TVar(f"({expr})", "tl.float32", axes), ct), ct, axes)


LOWERINGS.register("aten._native_batch_norm_legit_no_training.default")(
    FirstOutput(_batch_norm_inference, _batch_norm_supported)
)


# --- spatial resampling: nearest upsampling and max pooling -----------------------------------
def _static_hw(node: Node) -> tuple | None:
    shapes = (node.args[0].tensor_type.shape, node.outputs[0].tensor_type.shape)
    dims = [d for s in shapes for d in s[-2:]]
    return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None


def _upsample_supported(node: Node) -> str | None:
    hw = _static_hw(node)
    if hw is None:
        return "nearest upsampling of a symbolic spatial size"
    ih, iw, oh, ow = hw
    if oh % ih or ow % iw:
        return f"nearest upsampling by a non-integer factor ({ih}x{iw} -> {oh}x{ow})"
    scales = node.args[2] if len(node.args) > 2 else None
    if scales and [float(s) for s in scales] != [oh / ih, ow / iw]:
        return f"nearest upsampling with scale factors {scales} not equal to the size ratio"
    return None


@indexed("aten.upsample_nearest2d.vec", supports=_upsample_supported)
def _upsample_nearest(ctx, node, index):
    """out[..., h, w] = x[..., h // kh, w // kw]: exact for integer factors, as in eager."""
    ih, iw, oh, ow = _static_hw(node)
    *lead, h, w = index
    return ctx.value(node.args[0], (*lead, FloorDiv(h, oh // ih), FloorDiv(w, ow // iw)))


def _pool_params(node: Node):
    def pair(v, default):
        v = default if v is None or v == [] else v
        v = [v] if isinstance(v, int) else list(v)
        return (int(v[0]), int(v[-1]))

    args = list(node.args) + [None] * 6
    k = pair(args[1], None)
    s = pair(args[2], k)
    p = pair(args[3], 0)
    d = pair(args[4], 1)
    return k, s, p, d, bool(args[5])


def _max_pool_supported(node: Node) -> str | None:
    if node.args[0].tensor_type.rank != 4:
        return "max pooling of a non-4-d input"
    k, _, _, d, ceil = _pool_params(node)
    if d != (1, 1) or ceil:
        return "max pooling with dilation or ceil_mode"
    if k[0] * k[1] > 16:
        return f"max pooling window {k[0]}x{k[1]} (unrolled up to 16 elements)"
    return None


def _max_pool2d(ctx, node, index):
    """Values of max_pool2d_with_indices: the window max, unrolled; padding reads -inf."""
    (kh, kw), (sh, sw), (ph, pw), _, _ = _pool_params(node)
    x = node.args[0]
    height, width = x.tensor_type.shape[2], x.tensor_type.shape[3]
    n, c, h, w = index
    ct = _out_ctype(node)
    result, axes = None, set()
    for i in range(kh):
        for j in range(kw):
            hi, wj = h * sh + i - ph, w * sw + j - pw
            conds = []
            if ph:
                conds.append(ctx.condition(hi, 0, to_expr(height)))
            if pw:
                conds.append(ctx.condition(wj, 0, to_expr(width)))
            cond = None
            if conds:
                cond = conds[0] if len(conds) == 1 else ctx.emit(
                    f"{conds[0]} & {conds[1]}", "tl.int1", conds[0].axes | conds[1].axes)
            if cond is not None:
                with ctx.masked(cond):
                    v = cast(ctx.value(x, (n, c, hi, wj)), ct)
                v = ctx.emit(f"tl.where({cond}, {v}, float('-inf'))", ct, set(v.axes) | cond.axes)
            else:
                v = cast(ctx.value(x, (n, c, hi, wj)), ct)
            axes |= set(v.axes)
            # NaN propagates as in eager: a NaN element wins the comparison
            result = v if result is None else ctx.emit(
                f"tl.where(({v} > {result}) | ({v} != {v}), {v}, {result})", ct, axes)
    return result


LOWERINGS.register("aten.max_pool2d_with_indices.default")(
    FirstOutput(_max_pool2d, _max_pool_supported)
)


# --- the backward's elementwise ops (lowering_grads.py) ------------------------------------
from . import lowering_grads  # noqa: E402  (its rules use the helpers above)

lowering_grads.register(pointwise, tanh)
