"""The kernel body emitter shared by every fused-kernel template.

A kernel iterates over a *domain*: a tensor shape whose dimensions are split among tile axes
(pointwise: one axis x; reduction: rows x and reduced columns r; matmul epilogue: m and n).
KernelContext.value(v, index) returns the Triton expression of IR value v at an index by
following the IR backwards: a node fused into this kernel is lowered through its LOWERINGS rule
(its inputs evaluated at the broadcast index), a view is index arithmetic (VIEW_INDEX), and
anything else is a load from a materialized buffer. Results are memoized per (value, index) and
common subexpressions share one tmp variable, so the body reads like straight-line SSA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator, Sequence

import sympy

from meshweave.ir.graph import Node, Value
from meshweave.ir.types import Dim, ScalarType
from .indexing import (
    VIEW_INDEX,
    IndexEnv,
    contiguous_strides,
    dims_equal,
    index_var,
    pexpr,
    to_expr,
)
from .lowering import LOWERINGS
from .tvalues import TL_STORAGE, CodegenError, TVar, cast, compute_ctype, literal_value

_TMP = re.compile(r"\btmp\d+\b")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class Axis:
    """One tile axis: which domain dims it walks (row-major) and how its position is named."""

    name: str  # variable prefix: x, r, m, n, b
    dims: tuple[int, ...]
    var: str  # Triton expression of the position along this axis, e.g. "xindex"
    mask: str | None  # Triton mask expression, None when always in range
    block: str | None  # tile size name ("XBLOCK"), None for a scalar axis (a program id)


class Domain:
    """The iteration space of a kernel and the index (one sympy expr per dim) it stands for."""

    def __init__(self, shape: Sequence[Dim], axes: list[Axis], hints: dict):
        self.shape = tuple(shape)
        self.axes = axes
        self.env = IndexEnv({}, hints)
        self.var_axis: dict[sympy.Symbol, str] = {}
        index: list = [sympy.Integer(0)] * len(self.shape)
        for ax in axes:
            for k, d in enumerate(ax.dims):
                if not dims_equal(self.shape[d], 1):
                    sym = index_var(f"{ax.name}{k}")
                    index[d] = sym
                    self.env.ranges[sym] = to_expr(self.shape[d])
                    self.var_axis[sym] = ax.name
        self.index = tuple(index)

    def axis(self, name: str) -> Axis:
        return next(a for a in self.axes if a.name == name)

    def numel(self, name: str) -> sympy.Expr:
        n = sympy.Integer(1)
        for d in self.axis(name).dims:
            n = n * to_expr(self.shape[d])
        return n

    def unravel(self, only=None) -> list[str]:
        """Source lines that compute each dimension's index variable from its axis position
        (of the axes named in `only`, default all)."""
        lines = []
        for ax in self.axes:
            if only is not None and ax.name not in only:
                continue
            live = [(d, self.index[d]) for d in ax.dims if isinstance(self.index[d], sympy.Symbol)]
            stride: sympy.Expr = sympy.Integer(1)
            for n, (d, sym) in enumerate(reversed(live)):
                text = ax.var if stride == 1 else f"({ax.var} // ({pexpr(stride)}))"
                if n < len(live) - 1:
                    text = f"{text} % ({pexpr(self.shape[d])})"
                lines.append(f"{sym} = {text}")
                stride = stride * to_expr(self.shape[d])
        return lines

    def tile_shape(self, axes) -> str:
        blocks = [a.block if a.name in axes else "1" for a in self.axes if a.block is not None]
        return "[" + ", ".join(blocks) + "]"


class KernelContext:
    """Emits the body of one kernel. Templates add their own prologue and epilogue."""

    def __init__(
        self,
        domain: Domain,
        members: set[Node],
        layouts: dict[Value, tuple],
        anchors: dict[Node, Callable[[KernelContext, Node], None]] | None = None,
    ):
        self.domain = domain
        self.members = members
        self.layouts = layouts  # materialized buffers: Value -> strides (sympy)
        self.anchors = anchors or {}
        self.lines: list[str] = []
        self.cse: dict[str, TVar] = {}
        self.memo: dict = {}
        self.canonical: dict[Value, tuple] = {}
        self.inputs: dict[Value, str] = {}
        self.outputs: dict[Value, str] = {}
        self.extra_mask: TVar | None = None
        self.indirect_axes: dict[sympy.Symbol, frozenset] = {}
        self.symbols: set[sympy.Symbol] = set()
        self._tmp = itertools.count()
        # Looped (multi-pass) reductions: tile values along `loop_axis` are emitted into
        # `loop_body` and flushed as a `for` loop over RBLOCK chunks by each reduce(); values
        # without that axis stay straight-line in `lines`. None: persistent (one tile).
        self.loop_axis: str | None = None
        self.loop_body: list[str] = []
        self._acc = itertools.count()
        self.stale: dict[str, tuple[str, str, frozenset]] = {}  # out-of-scope tile tmp -> def

    # --- expressions -----------------------------------------------------------------------------
    def emit(self, text: str, ctype: str, axes=frozenset()) -> TVar:
        text = self._fresh(str(text))
        if text in self.cse:
            return self.cse[text]
        if _IDENT.match(text) or literal_value(text) is not None:
            return TVar(text, ctype, axes)
        name = f"tmp{next(self._tmp)}"
        self._target(axes).append(f"{name} = {text}")
        var = TVar(name, ctype, axes)
        self.cse[text] = var
        return var

    def sym_text(self, e) -> str:
        """Print an index/size expression, recording the shape symbols it needs as arguments."""
        if isinstance(e, sympy.Basic):
            for s in e.free_symbols:
                if s not in self.domain.var_axis and s not in self.indirect_axes:
                    self.symbols.add(s)
        return pexpr(e)

    def axes_of(self, e) -> frozenset:
        axes: set = set()
        for s in getattr(e, "free_symbols", ()):
            if s in self.domain.var_axis:
                axes.add(self.domain.var_axis[s])
            axes |= self.indirect_axes.get(s, frozenset())
        return frozenset(axes)

    def index_tvar(self, e) -> TVar:
        e = sympy.expand(to_expr(e))
        return self.emit(
            self.sym_text(e), "tl.int64" if self.indirect_axes else "tl.int32", self.axes_of(e)
        )

    def scalar(self, v: Value) -> TVar:
        t = v.type
        if not isinstance(t, ScalarType) or t.expr is None:
            raise CodegenError(f"scalar %{v.name} has no known value inside a kernel")
        return TVar(f"({self.sym_text(to_expr(t.expr))})", "tl.int64")

    def indirect(self, tv: TVar) -> sympy.Symbol:
        """Use a loaded integer tensor as an index (a gather)."""
        if not _IDENT.match(tv):
            tv = self.emit(f"({tv}) + 0", tv.ctype, tv.axes)
        sym = sympy.Symbol(str(tv), integer=True)
        self.indirect_axes[sym] = tv.axes
        return sym

    def condition(self, e, lo, hi) -> TVar:
        e = sympy.expand(to_expr(e))
        parts = []
        if to_expr(lo) != 0 or not e.is_nonnegative:  # x - 1 may be negative; x may not
            parts.append(f"({self.sym_text(e)} >= {self.sym_text(to_expr(lo))})")
        parts.append(f"({self.sym_text(e)} < {self.sym_text(to_expr(hi))})")
        return self.emit(" & ".join(parts), "tl.int1", self.axes_of(e))

    @contextlib.contextmanager
    def masked(self, cond: TVar) -> Iterator[None]:
        saved = self.extra_mask
        if saved is None:
            self.extra_mask = cond
        else:
            self.extra_mask = self.emit(f"{saved} & {cond}", "tl.int1", saved.axes | cond.axes)
        try:
            yield
        finally:
            self.extra_mask = saved

    def mask_text(self, axes) -> str:
        parts = [a.mask for a in self.domain.axes if a.name in axes and a.mask]
        if self.extra_mask is not None:
            parts.append(str(self.extra_mask))
        return " & ".join(parts)

    # --- values ----------------------------------------------------------------------------------
    def register(self, v: Value, index, var: TVar) -> None:
        """Record that `var` is v's value at `index` (reduction results, matmul accumulators)."""
        self.canonical[v] = (tuple(sympy.expand(to_expr(i)) for i in index), var)

    def value(self, v: Value, index) -> TVar:
        index = tuple(sympy.expand(to_expr(i)) for i in index)
        key = (v, index, self.extra_mask)
        if key in self.memo:
            return self.memo[key]
        node = v.producer
        if v not in self.canonical and node in self.anchors:
            self.anchors[node](self, node)
        if v in self.canonical:
            cidx, var = self.canonical[v]
            if not all(sympy.expand(a - b) == 0 for a, b in zip(cidx, index)):
                raise CodegenError(
                    f"%{v.name} is computed per row/tile in this kernel but read "
                    f"at index {index} (expected {cidx})"
                )
            return var
        if node is not None and node in self.members:
            rule = LOWERINGS.get(node.op)
            if rule is None:
                raise CodegenError(f"{node.op} has no Triton lowering")
            res = rule.lower(self, node, node.outputs.index(v), index)
        elif v in self.layouts:
            res = self.load(v, index)
        elif node is not None and node.op in VIEW_INDEX:
            src, idx = VIEW_INDEX.get(node.op)(node, node.outputs.index(v), index, self.domain.env)
            res = self.value(src, idx)
        else:
            raise CodegenError(f"%{v.name} is neither computed in this kernel nor materialized")
        self.memo[key] = res
        return res

    def offset(self, v: Value, index) -> sympy.Expr:
        strides = self.layouts.get(v)
        if strides is None:
            strides = contiguous_strides(v.tensor_type.shape)
        return sympy.expand(sum((to_expr(i) * s for i, s in zip(index, strides)), sympy.Integer(0)))

    def load(self, v: Value, index) -> TVar:
        off = self.offset(v, index)
        ptr = self.inputs.setdefault(v, f"in_ptr{len(self.inputs)}")
        axes = self.axes_of(off)
        mask = self.mask_text(axes)
        dtype = v.tensor_type.dtype
        other = "0.0" if dtype.is_floating_point else "0"
        text = f"tl.load({ptr} + ({self.sym_text(off)})"
        text += f", {mask}, other={other})" if mask else ")"
        ct = compute_ctype(dtype)
        if ct != TL_STORAGE[dtype]:
            text += f".to({ct})"
        return self.emit(text, ct, axes)

    def store(self, v: Value, index, var: TVar) -> None:
        off = self.offset(v, index)
        ptr = self.outputs.setdefault(v, f"out_ptr{len(self.outputs)}")
        axes = self.axes_of(off)
        extra = (var.axes - axes) if isinstance(var, TVar) else frozenset()
        for a in self.domain.axes:
            # A tile axis the address does not depend on is only allowed when its dims all
            # have size 1: its mask then keeps lane 0 alone (no racing duplicate stores).
            if (
                a.name in extra
                and a.block
                and not all(dims_equal(self.domain.shape[d], 1) for d in a.dims)
            ):
                raise CodegenError(
                    f"%{v.name} varies along {sorted(var.axes)} but is stored along {sorted(axes)}"
                )
        offset = self.sym_text(off)
        if extra:  # tl.store wants the pointer in the value's block shape
            offset += f" + tl.zeros({self.domain.tile_shape(axes | extra)}, tl.int32)"
        axes = axes | extra
        val = cast(var, TL_STORAGE[v.tensor_type.dtype])
        mask = self.mask_text(axes)
        self._target(axes).append(
            self._fresh(f"tl.store({ptr} + ({offset}), {val}" + (f", {mask})" if mask else ")"))
        )

    # --- looped reductions -----------------------------------------------------------------------
    def _target(self, axes) -> list[str]:
        if self.loop_axis is not None and self.loop_axis in axes:
            return self.loop_body
        return self.lines

    def flush_loop(self, carried: Sequence[tuple[str, str, str]] = ()) -> None:
        """Emit the pending loop body as one pass over the loop axis in RBLOCK chunks.
        `carried`: (accumulator name, its initializer, its update line) per loop-carried
        accumulator. Tile values of the pass go out of scope: they are forgotten."""
        if self.loop_axis is None or (not self.loop_body and not carried):
            return
        ax = self.domain.axis(self.loop_axis)
        for name, init, _ in carried:
            self.lines.append(f"{name} = {init}")
        self.lines.append(f"for roffset in range(0, rnumel, {ax.block}):")
        head = [
            f"{ax.var} = roffset + tl.arange(0, {ax.block})[None, :]",
            f"{ax.mask} = {ax.var} < rnumel",
            *self.domain.unravel(only=(self.loop_axis,)),
        ]
        body = head + self.loop_body + [u for _, _, update in carried for u in update.split("\n")]
        self.lines.extend("    " + line for line in body)
        self.loop_body = []
        tile = self.loop_axis
        for text, v in self.cse.items():
            if tile in v.axes:
                self.stale[str(v)] = (text, v.ctype, frozenset(v.axes))
        self.cse = {k: v for k, v in self.cse.items() if tile not in v.axes}
        self.memo = {
            k: v for k, v in self.memo.items() if not (isinstance(v, TVar) and tile in v.axes)
        }

    def _fresh(self, text: str) -> str:
        """Re-emit, in the current pass, the tile values of earlier passes that `text` names
        (they went out of scope with their loop): a tile value is recomputed per pass."""
        if not self.stale:
            return text
        return _TMP.sub(
            lambda m: (
                str(self.emit(*self.stale[m.group(0)])) if m.group(0) in self.stale else m.group(0)
            ),
            text,
        )

    def _tile_zeros(self, value: str, ctype: str) -> str:
        return f"tl.full({self.domain.tile_shape({a.name for a in self.domain.axes})}, {value}, {ctype})"

    def looped_reduce(self, var: TVar, kind: str, neutral: str, masked: str, ct: str) -> TVar:
        acc = f"acc{next(self._acc)}"
        combine = {
            "sum": f"{acc} + {masked}",
            "max": f"tl.maximum({acc}, {masked})",
            "min": f"tl.minimum({acc}, {masked})",
        }[kind]
        self.flush_loop([(acc, self._tile_zeros(neutral, ct), self._fresh(f"{acc} = {combine}"))])
        fn = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[kind]
        axes = {a.name for a in self.domain.axes if a.name != self.loop_axis and a.block}
        return self.emit(f"{fn}({acc}, 1, keep_dims=True)", ct, axes)

    def softmax_stats(self, x: TVar) -> tuple[TVar, TVar]:
        """Looped softmax statistics in one online pass: the row max and sum(exp(x - max)),
        the running sum rescaled whenever the running max grows (-inf rows stay finite)."""
        ct = x.ctype
        ax = self.domain.axis(self.loop_axis)
        k = next(self._acc)
        m_acc, s_acc, m_new, m_safe = f"macc{k}", f"sacc{k}", f"mnew{k}", f"msafe{k}"
        xv = self._fresh(f'tl.where({ax.mask}, {x}, float("-inf"))')
        update_m = f"{m_new} = tl.maximum({m_acc}, {xv})"
        update_s = "\n".join(
            [
                f'{m_safe} = tl.where({m_new} == float("-inf"), 0.0, {m_new})',
                f"{s_acc} = {s_acc} * tl.exp({m_acc} - {m_safe}) + tl.exp({xv} - {m_safe})",
                f"{m_acc} = {m_new}",
            ]
        )
        self.flush_loop(
            [
                (m_acc, self._tile_zeros('float("-inf")', ct), update_m),
                (s_acc, self._tile_zeros("0.0", ct), update_s),
            ]
        )
        axes = {a.name for a in self.domain.axes if a.name != self.loop_axis and a.block}
        m = self.emit(f"tl.max({m_acc}, 1, keep_dims=True)", ct, axes)
        safe = self.emit(f'tl.where({m} == float("-inf"), 0.0, {m})', ct, axes)
        s = self.emit(f"tl.sum({s_acc} * tl.exp({m_acc} - {safe}), 1, keep_dims=True)", ct, axes)
        return m, s

    # --- reductions ------------------------------------------------------------------------------
    def reduce(self, var, kind: str, axis_name: str = "r") -> TVar:
        """Reduce `var` over the r axis (tile dim 1), keeping dims: a per-row value."""
        ax = self.domain.axis(axis_name)
        if not isinstance(var, TVar):
            var = TVar(str(var), "tl.float32")
        ct = var.ctype
        if kind == "sum" and ct in ("tl.int1", "tl.int8", "tl.int16", "tl.int32", "tl.uint8"):
            var, ct = cast(var, "tl.int64"), "tl.int64"
        neutral = {
            "sum": "0" if not ct.startswith("tl.float") else "0.0",
            "max": 'float("-inf")' if ct.startswith("tl.float") else "-2**62",
            "min": 'float("inf")' if ct.startswith("tl.float") else "2**62",
        }[kind]
        fn = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[kind]
        masked = f"tl.where({ax.mask}, {var}, {neutral})" if ax.mask else str(var)
        if self.loop_axis == axis_name:
            return self.looped_reduce(var, kind, neutral, masked, ct)
        axes = (set(var.axes) - {axis_name}) | {
            a.name for a in self.domain.axes if a.name != axis_name and a.block
        }
        return self.emit(f"{fn}({masked}, 1, keep_dims=True)", ct, axes)
