"""Matmul: a tl.dot template with a fused epilogue, and the MATMULS rule table.

Each matmul group emits two kernels sharing one epilogue body:
  triton_mm_*      the template: tiled tl.dot over K (grouped tile order for L2 reuse), then
                   the epilogue on the fp32 accumulator tile (bias, activation, residual add,
                   any pointwise op of the output's shape), then stores;
  triton_mm_epi_*  the epilogue alone, reading the accumulator that torch.matmul (cuBLAS)
                   produced.
Which one runs is decided per shape at run time (runtime.MatmulChooser: measured on the GPU,
the template under the interpreter so that it is exercised) and cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable
from meshweave.ir.types import Dim
from ..emitter import Axis, Domain, KernelContext
from ..indexing import broadcast_index, numel, reshape_index, shapes_equal, to_expr
from .pointwise import KernelSource, io_params, sorted_symbols
from ..tvalues import CodegenError, TVar, lit

MATMULS = RuleTable("triton_matmul")
MATMUL_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


@dataclasses.dataclass(frozen=True)
class MatmulOperands:
    """How an op maps onto out[b] = alpha * a[b] @ b[b] (+ beta * bias)."""

    a: Value
    b: Value
    b_is_nk: bool  # b is stored [N, K] (a linear weight) and is transposed in the wrapper
    bias: Value | None = None
    alpha: float = 1.0
    beta: float = 1.0
    batched: bool = False

    def sizes(self) -> dict[str, Dim]:
        a, b = self.a.tensor_type.shape, self.b.tensor_type.shape
        if self.batched:
            return {"batch": a[0], "M": a[1], "K": a[2], "N": b[2]}
        n = b[0] if self.b_is_nk else b[1]
        return {"batch": 1, "M": numel(a[:-1]), "K": a[-1], "N": n}


@dataclasses.dataclass(frozen=True)
class MatmulRule:
    operands: Callable[[Node], MatmulOperands]

    def supports(self, node: Node) -> str | None:
        ops = self.operands(node)
        ta, tb = ops.a.tensor_type, ops.b.tensor_type
        if str(ta.dtype) not in MATMUL_DTYPES or ta.dtype != tb.dtype:
            return f"matmul of {ta.dtype} x {tb.dtype}"
        if ops.batched and (ta.rank != 3 or tb.rank != 3):
            return "bmm operands are not 3-d"
        if not ops.batched and (tb.rank != 2 or ta.rank < 1):
            return "matmul operand ranks"
        return None


def _arg(node: Node, pos: int, name: str, default=None):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


MATMULS.register("aten.linear.default")(
    MatmulRule(lambda n: MatmulOperands(n.args[0], n.args[1], True, _arg(n, 2, "bias")))
)
MATMULS.register("aten.mm.default")(
    MatmulRule(lambda n: MatmulOperands(n.args[0], n.args[1], False))
)
MATMULS.register("aten.addmm.default")(
    MatmulRule(
        lambda n: MatmulOperands(
            n.args[1],
            n.args[2],
            False,
            n.args[0],
            float(n.kwargs.get("alpha", 1)),
            float(n.kwargs.get("beta", 1)),
        )
    )
)
MATMULS.register("aten.bmm.default")(
    MatmulRule(lambda n: MatmulOperands(n.args[0], n.args[1], False, batched=True))
)


_TEMPLATE_HEAD = """\
pid = tl.program_id(0)
pid_b = tl.program_id(1)
num_pid_m = tl.cdiv(M, BLOCK_M)
num_pid_n = tl.cdiv(N, BLOCK_N)
num_pid_in_group = GROUP_M * num_pid_n
first_pid_m = (pid // num_pid_in_group) * GROUP_M
group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
pid_n = (pid % num_pid_in_group) // group_size_m
rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
rk = tl.arange(0, BLOCK_K)
a_ptrs = a_ptr + pid_b * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
b_ptrs = b_ptr + pid_b * stride_bb + rk[:, None] * stride_bk + rn[None, :] * stride_bn
acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
for k0 in range(0, K, BLOCK_K):
    k_left = K - k0
    a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
    b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
    if ALLOW_TF32:
        acc += tl.dot(a, b)
    else:
        acc += tl.dot(a, b, input_precision="ieee")
    a_ptrs += BLOCK_K * stride_ak
    b_ptrs += BLOCK_K * stride_bk"""

_EPILOGUE_HEAD = """\
pid_m = tl.program_id(0)
pid_n = tl.program_id(1)
pid_b = tl.program_id(2)
rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
acc_mask = (rm[:, None] < M) & (rn[None, :] < N)
acc = tl.load(acc_ptr + pid_b * M * N + rm[:, None] * N + rn[None, :], acc_mask,
              other=0.0).to(tl.float32)"""

_TILE = ["xm = rm[:, None]", "xn = rn[None, :]", "mmask = xm < M", "nmask = xn < N"]


def is_bare(members: list[Node], anchor: Node, outputs: list[Value]) -> bool:
    """A matmul with nothing fused and no bias: cuBLAS can write the output directly."""
    ops = MATMULS.get(anchor.op).operands(anchor)
    return members == [anchor] and ops.bias is None and ops.alpha == 1.0


def bias_only(members: list[Node], anchor: Node, outputs: list[Value]) -> Value | None:
    """The bias of a 2-D matmul whose only epilogue is its own vector bias (a linear layer
    with nothing fused): cuBLAS adds it in its own epilogue (torch.addmm), no extra kernel."""
    ops = MATMULS.get(anchor.op).operands(anchor)
    if (members != [anchor] or ops.batched or ops.bias is None or ops.alpha != 1.0
            or ops.beta != 1.0 or ops.bias.tensor_type.rank != 1
            or outputs != [anchor.outputs[0]]):
        return None
    return ops.bias


def epilogue_axes(ops: MatmulOperands, rank: int) -> list[Axis]:
    """The epilogue's tile axes over a domain of `rank` dims: m walks all but the last."""
    if ops.batched:
        return [
            Axis("b", (0,), "pid_b", None, None),
            Axis("m", (1,), "xm", "mmask", "BLOCK_M"),
            Axis("n", (2,), "xn", "nmask", "BLOCK_N"),
        ]
    return [
        Axis("m", tuple(range(rank - 1)), "xm", "mmask", "BLOCK_M"),
        Axis("n", (rank - 1,), "xn", "nmask", "BLOCK_N"),
    ]


def epilogue_domain(anchor: Node, shape, hints) -> Domain | None:
    """The epilogue iteration space over `shape`, or None when `shape` cannot be one.

    The epilogue walks the matmul's (m, n) tile. Its domain may be the matmul output's shape or
    any row-major reshape of it that keeps N as the last dim (e.g. [b*s, n] -> [b, s, n] of a
    Conv1D / addmm before its view): the flat (m, n) index is the same, only the names of the
    dims differ, so the m axis just unravels into more dims. Batched matmuls keep their shape.
    """
    ops: MatmulOperands = MATMULS.get(anchor.op).operands(anchor)
    out_shape = anchor.outputs[0].tensor_type.shape
    shape = tuple(shape)
    if ops.batched or len(out_shape) == 0 or len(shape) == 0:
        ok = shapes_equal(shape, out_shape)
    else:
        ok = shapes_equal(shape[-1:], out_shape[-1:]) and (
            sympy.expand(numel(shape[:-1]) - numel(out_shape[:-1])) == 0
        )
    if not ok:
        return None
    return Domain(shape, epilogue_axes(ops, len(shape)), hints)


def domain_index(domain: Domain, v: Value) -> tuple:
    """v's index at the epilogue's tile position (v has the domain's number of elements)."""
    shape = v.tensor_type.shape
    if shapes_equal(shape, domain.shape):
        return domain.index
    return reshape_index(shape, domain.shape, domain.index, domain.env)


def emit_matmul(
    anchor: Node, members: list[Node], outputs: list[Value], layouts, hints, shape=None
) -> tuple[KernelSource, KernelSource]:
    """`shape` is the epilogue's domain (the group's shape; default the matmul's output)."""
    ops: MatmulOperands = MATMULS.get(anchor.op).operands(anchor)
    out = anchor.outputs[0]
    out_shape = out.tensor_type.shape
    domain = epilogue_domain(anchor, out_shape if shape is None else shape, hints)
    if domain is None:
        raise CodegenError(f"epilogue shape {list(shape)} is not a reshape of {list(out_shape)}")
    ctx = KernelContext(domain, set(members), layouts)
    value = TVar("acc", "tl.float32", {"m", "n"})
    if ops.alpha != 1.0:
        value = ctx.emit(f"acc * {lit(ops.alpha)}", "tl.float32", value.axes)
    out_index = domain_index(domain, out)
    if ops.bias is not None:
        bias = ctx.value(
            ops.bias, broadcast_index(out_index, out_shape, ops.bias.tensor_type.shape)
        )
        scaled = bias if ops.beta == 1.0 else f"{bias} * {lit(ops.beta)}"
        value = ctx.emit(f"{value} + {scaled}", "tl.float32", value.axes | bias.axes)
    ctx.register(out, out_index, value)
    for v in outputs:
        index = domain_index(domain, v)
        ctx.store(v, index, ctx.value(v, index))
    syms = sorted_symbols(ctx)
    epilogue = _TILE + domain.unravel() + ctx.lines
    sizes = {k: sympy.expand(to_expr(d)) for k, d in ops.sizes().items()}
    sym_params = [s.name for s in syms]
    template = KernelSource(
        "matmul",
        [
            "a_ptr",
            "b_ptr",
            *io_params(ctx),
            "M",
            "N",
            "K",
            "stride_am",
            "stride_ak",
            "stride_bk",
            "stride_bn",
            "stride_ab",
            "stride_bb",
            *sym_params,
            "ALLOW_TF32: tl.constexpr",
            "BLOCK_M: tl.constexpr",
            "BLOCK_N: tl.constexpr",
            "BLOCK_K: tl.constexpr",
            "GROUP_M: tl.constexpr",
        ],
        _TEMPLATE_HEAD.splitlines() + epilogue,
        list(ctx.inputs),
        list(ctx.outputs),
        syms,
        sizes,
        extra={"operands": ops},
    )
    epi = KernelSource(
        "matmul_epilogue",
        [
            "acc_ptr",
            *io_params(ctx),
            "M",
            "N",
            *sym_params,
            "BLOCK_M: tl.constexpr",
            "BLOCK_N: tl.constexpr",
        ],
        _EPILOGUE_HEAD.splitlines() + epilogue,
        list(ctx.inputs),
        list(ctx.outputs),
        syms,
        sizes,
        extra={"operands": ops},
    )
    return template, epi
