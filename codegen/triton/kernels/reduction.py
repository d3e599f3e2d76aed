"""Reduction kernels and the REDUCTIONS rule table (sum, mean, amax/amin, var, softmax,
log_softmax, LayerNorm; RMSNorm arrives as pow/mean/rsqrt/mul and fuses the same way).

The domain is the reduced tensor's shape, split into rows (x axis: the kept dims) and
columns (r axis: the reduced dims). Kernels are *persistent*: one program holds XBLOCK whole
rows in registers (RBLOCK = next power of two of the row length), so multi-pass norms
(mean, then variance, then normalize) read their input once. Producers (a residual add) are
computed in the same tile and consumers (the LN affine, RMSNorm's weight) use the per-row
results by broadcasting; every value needed later is stored from the same kernel.

Rows longer than MAX_PERSISTENT_RNUMEL (by the shape hints) get a *looped* kernel instead: the
same body, but every reduce() becomes one pass over the row in RBLOCK chunks (a `for` loop with
a tile accumulator), the tile values a later pass needs are recomputed there (reloaded), and
full-tile consumers and stores run in a last pass. Softmax/log_softmax take their max and
sum(exp) in one online pass (the running sum is rescaled when the running max grows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable
from ..emitter import Axis, Domain, KernelContext
from ..indexing import numel, shapes_equal
from .pointwise import KernelSource, io_params, sorted_symbols
from ..tvalues import CodegenError, TVar, cast, compute_ctype, lit

REDUCTIONS = RuleTable("triton_reduction")
# Rows longer than this do not fit a persistent tile (register spills, shared-memory limits);
# such reductions are emitted *looped*: passes over the row in RBLOCK chunks (see emit_reduction).
MAX_PERSISTENT_RNUMEL = 16384


@dataclasses.dataclass(frozen=True)
class ReductionRule:
    input: Callable[[Node], Value]  # the tensor being reduced
    dims: Callable[[Node], tuple[int, ...]]  # reduced dims, normalized and sorted
    emit: Callable[[KernelContext, Node, TVar], dict[int, TVar]]  # output position -> value

    def supports(self, node: Node, hints) -> str | None:
        x = self.input(node).tensor_type
        n = numel([x.shape[d] for d in self.dims(node)])
        n = n.subs(hints) if isinstance(n, sympy.Basic) else n
        if not sympy.sympify(n).is_number:
            return "reduction length has no hint"
        return None


def is_looped(shape, red_dims, hints) -> bool:
    """Rows longer than MAX_PERSISTENT_RNUMEL (by the shape hints) get a looped kernel."""
    n = numel([shape[d] for d in red_dims])
    n = n.subs(hints) if isinstance(n, sympy.Basic) else n
    n = sympy.sympify(n)
    return bool(n.is_number and int(n) > MAX_PERSISTENT_RNUMEL)


def _norm_dims(node: Node, dims, rank: int) -> tuple[int, ...]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({d % rank for d in dims})) if rank else ()


def _arg(node: Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def reduction(*ops: str, dims: Callable[[Node], tuple[int, ...]]):
    def deco(emit):
        REDUCTIONS.register(*ops)(ReductionRule(lambda n: n.args[0], dims, emit))
        return emit

    return deco


def _dim_arg(node: Node) -> tuple[int, ...]:
    return _norm_dims(node, _arg(node, 1, "dim"), node.args[0].tensor_type.rank)


def _all_dims(node: Node) -> tuple[int, ...]:
    return tuple(range(node.args[0].tensor_type.rank))


def _last_dim(node: Node) -> tuple[int, ...]:
    return _norm_dims(node, node.args[1], node.args[0].tensor_type.rank)


def _count(ctx: KernelContext) -> str:
    return ctx.sym_text(sympy.expand(ctx.domain.numel("r")))


def _out_ct(node: Node, pos: int = 0) -> str:
    return compute_ctype(node.outputs[pos].tensor_type.dtype)


def _sum(ctx, node, x):
    s = ctx.reduce(cast(x, _out_ct(node)) if _out_ct(node) != x.ctype else x, "sum")
    return {0: s}


reduction("aten.sum.dim_IntList", dims=_dim_arg)(_sum)
reduction("aten.sum.default", dims=_all_dims)(_sum)


def _mean(ctx, node, x):
    s = ctx.reduce(cast(x, "tl.float32") if x.ctype != "tl.float64" else x, "sum")
    return {0: ctx.emit(f"{s} / {_count(ctx)}", s.ctype, s.axes)}


reduction("aten.mean.dim", dims=_dim_arg)(_mean)
reduction("aten.mean.default", dims=_all_dims)(_mean)


@reduction("aten.amax.default", dims=_dim_arg)
def _amax(ctx, node, x):
    return {0: ctx.reduce(x, "max")}


@reduction("aten.amin.default", dims=_dim_arg)
def _amin(ctx, node, x):
    return {0: ctx.reduce(x, "min")}


@reduction("aten.var.correction", dims=_dim_arg)
def _var(ctx, node, x):
    correction = node.kwargs.get("correction")
    correction = 1 if correction is None else correction
    x = cast(x, "tl.float32") if x.ctype != "tl.float64" else x
    mean = ctx.emit(f"{ctx.reduce(x, 'sum')} / {_count(ctx)}", x.ctype, {"x"})
    xc = ctx.emit(f"{x} - {mean}", x.ctype, x.axes | mean.axes)
    ss = ctx.reduce(ctx.emit(f"{xc} * {xc}", x.ctype, xc.axes), "sum")
    return {0: ctx.emit(f"{ss} / ({_count(ctx)} - {lit(float(correction))})", x.ctype, ss.axes)}


def _softmax_parts(ctx, x):
    x = cast(x, "tl.float32") if x.ctype != "tl.float64" else x
    if ctx.loop_axis is not None:  # rows longer than a tile: one online max + sum pass
        m, s = ctx.softmax_stats(x)
        shifted = ctx.emit(
            f'{x} - tl.where({m} == float("-inf"), 0.0, {m})', x.ctype, x.axes | m.axes
        )
        return shifted, ctx.emit(f"tl.exp({shifted})", x.ctype, shifted.axes), s
    m = ctx.reduce(x, "max")
    # A row that is entirely -inf would give exp(nan); eager softmax returns nan there too,
    # but shifting by 0 keeps the masked tail of a partial tile finite.
    shifted = ctx.emit(f'{x} - tl.where({m} == float("-inf"), 0.0, {m})', x.ctype, x.axes | m.axes)
    e = ctx.emit(f"tl.exp({shifted})", x.ctype, shifted.axes)
    return shifted, e, ctx.reduce(e, "sum")


@reduction("aten._softmax.default", dims=_last_dim)
def _softmax(ctx, node, x):
    _, e, s = _softmax_parts(ctx, x)
    return {0: ctx.emit(f"{e} / {s}", e.ctype, e.axes | s.axes)}


@reduction("aten._log_softmax.default", dims=_last_dim)
def _log_softmax(ctx, node, x):
    shifted, _, s = _softmax_parts(ctx, x)
    return {0: ctx.emit(f"{shifted} - tl.log({s})", shifted.ctype, shifted.axes | s.axes)}


def _ln_dims(node: Node) -> tuple[int, ...]:
    rank = node.args[0].tensor_type.rank
    return tuple(range(rank - len(node.args[1]), rank))


@reduction("aten.native_layer_norm.default", dims=_ln_dims)
def _layer_norm(ctx, node, x):
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = _arg(node, 4, "eps", 1e-5)
    x = cast(x, "tl.float32") if x.ctype != "tl.float64" else x
    mean = ctx.emit(f"{ctx.reduce(x, 'sum')} / {_count(ctx)}", x.ctype, {"x"})
    xc = ctx.emit(f"{x} - {mean}", x.ctype, x.axes | mean.axes)
    var = ctx.emit(
        f"{ctx.reduce(ctx.emit(f'{xc} * {xc}', x.ctype, xc.axes), 'sum')} / {_count(ctx)}",
        x.ctype,
        {"x"},
    )
    rstd = ctx.emit(f"tl.rsqrt({var} + {lit(float(eps))})", x.ctype, {"x"})
    y = ctx.emit(f"{xc} * {rstd}", x.ctype, xc.axes | rstd.axes)
    k = len(node.args[1])
    norm_index = ctx.domain.index[-k:]
    if isinstance(weight, Value):
        w = ctx.value(weight, norm_index)
        y = ctx.emit(f"{y} * {w}", x.ctype, y.axes | w.axes)
    if isinstance(bias, Value):
        b = ctx.value(bias, norm_index)
        y = ctx.emit(f"{y} + {b}", x.ctype, y.axes | b.axes)
    return {0: y, 1: mean, 2: rstd}


# --- the kernel -------------------------------------------------------------------------------
def row_index(domain: Domain, red_dims, v: Value):
    """The index at which a value of the reduction group is computed: the full tile index for
    full-shaped values, the row index for per-row (reduced) values."""
    shape = v.tensor_type.shape
    if shapes_equal(shape, domain.shape):
        return domain.index
    keep = tuple(1 if d in red_dims else s for d, s in enumerate(domain.shape))
    if shapes_equal(shape, keep):
        return tuple(sympy.Integer(0) if d in red_dims else i for d, i in enumerate(domain.index))
    squeezed = tuple(s for d, s in enumerate(domain.shape) if d not in red_dims)
    if shapes_equal(shape, squeezed):
        return tuple(i for d, i in enumerate(domain.index) if d not in red_dims)
    raise CodegenError(
        f"%{v.name} of shape {list(shape)} is neither a full tile nor a row of "
        f"the reduction domain {list(domain.shape)}"
    )


def value_class(domain_shape, red_dims, shape) -> str | None:
    """'full', 'row' or None: how a value of `shape` relates to a reduction domain."""
    if shapes_equal(shape, domain_shape):
        return "full"
    keep = tuple(1 if d in red_dims else s for d, s in enumerate(domain_shape))
    squeezed = tuple(s for d, s in enumerate(domain_shape) if d not in red_dims)
    if shapes_equal(shape, keep) or shapes_equal(shape, squeezed):
        return "row"
    return None


def emit_reduction(shape, red_dims, members, outputs: list[Value], layouts, hints) -> KernelSource:
    rank = len(shape)
    rows = tuple(d for d in range(rank) if d not in red_dims)
    domain = Domain(
        shape,
        [
            Axis("x", rows, "xindex", "xmask", "XBLOCK"),
            Axis("r", tuple(red_dims), "rindex", "rmask", "RBLOCK"),
        ],
        hints,
    )

    def lower(ctx: KernelContext, node: Node) -> None:
        rule = REDUCTIONS.get(node.op)
        x = ctx.value(rule.input(node), domain.index)
        for pos, var in rule.emit(ctx, node, x).items():
            v = node.outputs[pos]
            ctx.register(v, row_index(domain, red_dims, v), var)

    anchors = {n: lower for n in members if n.op in REDUCTIONS}
    ctx = KernelContext(domain, set(members), layouts, anchors)
    looped = is_looped(shape, red_dims, hints)
    if looped:
        ctx.loop_axis = "r"
    for v in outputs:
        idx = row_index(domain, red_dims, v)
        ctx.store(v, idx, ctx.value(v, idx))
    ctx.flush_loop()  # the last pass: full-tile consumers and their stores
    syms = sorted_symbols(ctx)
    params = (
        io_params(ctx)
        + ["xnumel", "rnumel"]
        + [s.name for s in syms]
        + ["XBLOCK: tl.constexpr", "RBLOCK: tl.constexpr"]
    )
    body = [
        "xoffset = tl.program_id(0) * XBLOCK",
        "xindex = xoffset + tl.arange(0, XBLOCK)[:, None]",
        "xmask = xindex < xnumel",
    ]
    if looped:
        body += [*domain.unravel(only=("x",)), *ctx.lines]
    else:
        body += [
            "rindex = tl.arange(0, RBLOCK)[None, :]",
            "rmask = rindex < rnumel",
            *domain.unravel(),
            *ctx.lines,
        ]
    sizes = {"xnumel": sympy.expand(domain.numel("x")), "rnumel": sympy.expand(domain.numel("r"))}
    return KernelSource(
        "reduction",
        params,
        body,
        list(ctx.inputs),
        list(ctx.outputs),
        syms,
        sizes,
        extra={"looped": looped},
    )
