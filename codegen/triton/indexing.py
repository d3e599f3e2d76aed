"""Index arithmetic: sympy index expressions, their Triton printing, and view index rules.

A fused kernel reads a tensor at an *index*: a tuple of sympy expressions over the kernel's
iteration variables (x0, x1, ... / r0, ...), the graph's shape symbols (kernel arguments) and
indirect-index variables (values loaded from an index tensor, e.g. embedding ids). Views never
copy: `VIEW_INDEX` maps an index into a view's output to an index into its input, so a chain
view -> permute -> slice collapses into one offset expression on the underlying buffer.

FloorDiv and ModIndex are our own sympy functions (not sympy's floor/Mod) so that printing is
exact integer arithmetic and so that we can simplify them with the known ranges of iteration
variables (sympy cannot: it does not know that x0 < 64).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import sympy

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable
from meshweave.ir.types import Dim, ScalarType

Index = tuple  # tuple[sympy.Expr, ...], one entry per tensor dimension


class FloorDiv(sympy.Function):
    """Integer floor division of non-negative index expressions."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        if a == 0:
            return sympy.Integer(0)
        return None


class ModIndex(sympy.Function):
    """Integer modulus of a non-negative index expression."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1 or a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) % int(b))
        return None


def index_var(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


def to_expr(d: Dim) -> sympy.Expr:
    return sympy.Integer(d) if isinstance(d, int) else d


def contiguous_strides(shape: Sequence[Dim]) -> tuple[sympy.Expr, ...]:
    strides: list[sympy.Expr] = []
    acc: sympy.Expr = sympy.Integer(1)
    for d in reversed(shape):
        strides.append(acc)
        acc = acc * to_expr(d)
    return tuple(reversed(strides))


def numel(shape: Sequence[Dim]) -> sympy.Expr:
    n: sympy.Expr = sympy.Integer(1)
    for d in shape:
        n = n * to_expr(d)
    return sympy.expand(n)


def dims_equal(a: Dim, b: Dim) -> bool:
    return sympy.expand(to_expr(a) - to_expr(b)) == 0


def shapes_equal(a: Sequence[Dim], b: Sequence[Dim]) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


# --- simplification with variable ranges -------------------------------------------------------
@dataclasses.dataclass
class IndexEnv:
    """What simplification may assume: iteration-variable bounds and shape-symbol hints."""

    ranges: dict = dataclasses.field(default_factory=dict)  # variable -> exclusive upper bound
    hints: Mapping[sympy.Symbol, int] = dataclasses.field(default_factory=dict)


Ranges = IndexEnv


def max_value(e: sympy.Expr, ranges: Ranges) -> int | None:
    """An upper bound of a non-negative index expression, or None when unknown."""
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        hi = ranges.ranges.get(e)
        return int(hi) - 1 if hi is not None and hi.is_Integer else None
    if e.is_Add:
        total = 0
        for t in e.args:
            m = max_value(t, ranges)
            if m is None:
                return None
            total += m
        return total
    if e.is_Mul:
        coeff, rest = e.as_coeff_Mul()
        m = max_value(rest, ranges)
        if m is None or not coeff.is_Integer or coeff < 0:
            return None
        return int(coeff) * m
    if isinstance(e, ModIndex) and e.args[1].is_Integer:
        return int(e.args[1]) - 1
    if isinstance(e, FloorDiv) and e.args[1].is_Integer:
        m = max_value(e.args[0], ranges)
        return None if m is None else m // int(e.args[1])
    return None


def _divides(term: sympy.Expr, d: sympy.Expr) -> bool:
    q = sympy.cancel(term / d)
    return q.as_numer_denom()[1] == 1 and q.is_polynomial()


def floordiv(e: sympy.Expr, d: Dim, ranges: Ranges) -> sympy.Expr:
    d = to_expr(d)
    if d == 1:
        return e
    terms = sympy.Add.make_args(sympy.expand(e))
    whole = [t for t in terms if _divides(t, d)]
    rest = [t for t in terms if not _divides(t, d)]
    rest_sum = sympy.Add(*rest)
    if not rest:
        return sympy.expand(sympy.Add(*whole) / d)
    m = max_value(rest_sum, ranges)
    if m is not None and d.is_Integer and m < int(d):
        return sympy.expand(sympy.Add(*whole) / d)
    return FloorDiv(sympy.expand(e), d)


def modindex(e: sympy.Expr, n: Dim, ranges: Ranges) -> sympy.Expr:
    n = to_expr(n)
    if n == 1:
        return sympy.Integer(0)
    terms = [t for t in sympy.Add.make_args(sympy.expand(e)) if not _divides(t, n)]
    rest = sympy.Add(*terms)
    m = max_value(rest, ranges)
    if m is not None and n.is_Integer and m < int(n):
        return rest
    return ModIndex(rest, n)


# --- printing ---------------------------------------------------------------------------------
class IndexPrinter(sympy.printing.str.StrPrinter):
    """Prints index expressions as Python/Triton integer arithmetic."""

    def _print_FloorDiv(self, e):
        return f"(({self._print(e.args[0])}) // ({self._print(e.args[1])}))"

    def _print_ModIndex(self, e):
        return f"(({self._print(e.args[0])}) % ({self._print(e.args[1])}))"

    def _print_Symbol(self, e):
        return e.name

    def _print_Pow(self, e, rational=False):
        base, exp = e.args
        if exp.is_Integer and int(exp) > 0:
            return "*".join([self.parenthesize(base, 100)] * int(exp))
        raise ValueError(f"cannot print index expression {e}")

    def _print_Rational(self, e):
        raise ValueError(f"non-integer index expression {e}")

    def _nested(self, fn: str, e) -> str:
        """fn(fn(a, b), c) ...: Python's and Triton's min/max both take two arguments here."""
        args = [self._print(a) for a in e.args]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out

    def _print_Min(self, e):
        return self._nested("min", e)

    def _print_Max(self, e):
        return self._nested("max", e)


_PRINTER = IndexPrinter()


def pexpr(e) -> str:
    """An index or size expression as source text (Triton kernel body or Python wrapper)."""
    if isinstance(e, int):
        return str(e)
    return _PRINTER.doprint(e)


# --- view index rules -------------------------------------------------------------------------
# A rule maps (node, output position, index into that output, ranges) to
# (the input Value it reads, the index into that input). Registered per op, like every rule.
ViewIndexRule = Callable[[Node, int, Index, Ranges], "tuple[Value, Index]"]
VIEW_INDEX = RuleTable("triton_view_index")


def scalar_arg(x) -> Dim:
    """A size argument: a Python int or a SymInt Value with a known expression."""
    if isinstance(x, Value):
        t = x.type
        if isinstance(t, ScalarType) and t.expr is not None:
            return t.expr
        raise ValueError(f"size argument %{x.name} has no known value")
    return int(x)


def _in_shape(node: Node, pos: int = 0):
    return node.args[pos].tensor_type.shape


@VIEW_INDEX.register("aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default")
def _identity(node, pos, index, ranges):
    return node.args[0], index


@VIEW_INDEX.register("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _view(node, pos, index, ranges):
    x = node.args[0]
    return x, reshape_index(x.tensor_type.shape, node.outputs[0].tensor_type.shape, index, ranges)


@VIEW_INDEX.register("aten.permute.default")
def _permute(node, pos, index, ranges):
    x = node.args[0]
    rank = x.tensor_type.rank
    out = [None] * rank
    for i, d in enumerate(node.args[1]):
        out[d % rank] = index[i]
    return x, tuple(out)


@VIEW_INDEX.register("aten.transpose.int")
def _transpose(node, pos, index, ranges):
    x = node.args[0]
    rank = x.tensor_type.rank
    a, b = node.args[1] % rank, node.args[2] % rank
    out = list(index)
    out[a], out[b] = out[b], out[a]
    return x, tuple(out)


@VIEW_INDEX.register("aten.t.default")
def _t(node, pos, index, ranges):
    return node.args[0], tuple(reversed(index))


@VIEW_INDEX.register("aten.expand.default")
def _expand(node, pos, index, ranges):
    x = node.args[0]
    shape = x.tensor_type.shape
    out_shape = node.outputs[0].tensor_type.shape
    lead = len(out_shape) - len(shape)
    out = []
    for j, d in enumerate(shape):
        o = out_shape[j + lead]
        out.append(
            sympy.Integer(0) if dims_equal(d, 1) and not dims_equal(o, 1) else index[j + lead]
        )
    return x, tuple(out)


@VIEW_INDEX.register("aten.unsqueeze.default")
def _unsqueeze(node, pos, index, ranges):
    rank = len(index)
    d = node.args[1] % rank
    return node.args[0], tuple(i for k, i in enumerate(index) if k != d)


@VIEW_INDEX.register("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(node, pos, index, ranges):
    x = node.args[0]
    shape = x.tensor_type.shape
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        dims = [i for i, s in enumerate(shape) if dims_equal(s, 1)]
    if isinstance(dims, int):
        dims = [dims]
    dims = {d % max(len(shape), 1) for d in dims}
    it = iter(index)
    out = tuple(
        sympy.Integer(0) if (k in dims and dims_equal(s, 1)) else next(it)
        for k, s in enumerate(shape)
    )
    return x, out


def _norm_start(start, size) -> sympy.Expr:
    if start is None:
        return sympy.Integer(0)
    s = to_expr(scalar_arg(start))
    if s.is_Integer and int(s) < 0:
        s = to_expr(size) + s
    return s


@VIEW_INDEX.register("aten.slice.Tensor")
def _slice(node, pos, index, ranges):
    x = node.args[0]
    rank = x.tensor_type.rank
    args = list(node.args[1:]) + [None] * 4
    dim = (args[0] if args[0] is not None else 0) % rank
    start = _norm_start(args[1], x.tensor_type.shape[dim])
    step = args[3] if args[3] is not None else 1
    out = list(index)
    out[dim] = start + index[dim] * step
    return x, tuple(out)


@VIEW_INDEX.register("aten.select.int")
def _select(node, pos, index, ranges):
    x = node.args[0]
    rank = x.tensor_type.rank
    dim = node.args[1] % rank
    i = _norm_start(node.args[2], x.tensor_type.shape[dim])
    out = list(index)
    out.insert(dim, i)
    return x, tuple(out)


@VIEW_INDEX.register("aten.split_with_sizes.default")
def _split(node, pos, index, ranges):
    x = node.args[0]
    rank = x.tensor_type.rank
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
    offset = sum((to_expr(scalar_arg(s)) for s in node.args[1][:pos]), sympy.Integer(0))
    out = list(index)
    out[dim] = index[dim] + offset
    return x, tuple(out)


def reshape_index(
    in_shape: Sequence[Dim], out_shape: Sequence[Dim], index: Index, ranges: Ranges
) -> Index:
    """Index into `in_shape` of the element at `index` of its row-major reshape `out_shape`.

    Dimensions are matched in chunks of equal size (a split, a merge or an identity), so a
    split becomes linear arithmetic and only a merge needs // and %.
    """
    ins = [(k, to_expr(d)) for k, d in enumerate(in_shape) if not dims_equal(d, 1)]
    outs = [(k, to_expr(d)) for k, d in enumerate(out_shape) if not dims_equal(d, 1)]
    result = [sympy.Integer(0)] * len(in_shape)
    i = j = 0
    while i < len(ins) or j < len(outs):
        ci, cj = [ins[i]] if i < len(ins) else [], [outs[j]] if j < len(outs) else []
        i, j = i + len(ci), j + len(cj)
        while not dims_equal(numel([d for _, d in ci]), numel([d for _, d in cj])):
            pi, pj = numel([d for _, d in ci]), numel([d for _, d in cj])
            grow_in = j >= len(outs) or (i < len(ins) and _smaller(pi, pj, ranges))
            if grow_in and i < len(ins):
                ci.append(ins[i])
                i += 1
            elif j < len(outs):
                cj.append(outs[j])
                j += 1
            else:
                raise ValueError(f"cannot reshape {list(in_shape)} to {list(out_shape)}")
        flat = sympy.Integer(0)
        for (k, _), st in zip(cj, contiguous_strides([d for _, d in cj])):
            flat = flat + index[k] * st
        for n, ((k, d), st) in enumerate(zip(ci, contiguous_strides([d for _, d in ci]))):
            e = floordiv(flat, st, ranges)
            result[k] = e if n == 0 else modindex(e, d, ranges)
    return tuple(result)


def _smaller(a: sympy.Expr, b: sympy.Expr, ranges: Ranges) -> bool:
    """Is size a < size b? Shape symbols are compared by their hints."""
    av, bv = sympy.sympify(a).subs(ranges.hints), sympy.sympify(b).subs(ranges.hints)
    if av.is_number and bv.is_number:
        return bool(av < bv)
    return False


def broadcast_index(index: Index, out_shape: Sequence[Dim], in_shape: Sequence[Dim]) -> Index:
    """Index into a broadcast operand of shape `in_shape` (right-aligned to `out_shape`)."""
    lead = len(out_shape) - len(in_shape)
    out = []
    for j, d in enumerate(in_shape):
        if dims_equal(d, 1) and not dims_equal(out_shape[j + lead], 1):
            out.append(sympy.Integer(0))
        else:
            out.append(index[j + lead])
    return tuple(out)
