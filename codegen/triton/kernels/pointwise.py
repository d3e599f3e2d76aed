"""Pointwise kernels: a fused chain of elementwise ops over one output shape.

One program handles XBLOCK consecutive elements of the (row-major) domain; every fused op is
evaluated at the same position, inputs are loaded through index arithmetic (views, broadcasts,
gathers), and every value the rest of the program needs is stored once.
"""

from __future__ import annotations

import dataclasses
import re

import sympy

from meshweave.ir.graph import Value
from ..emitter import Axis, Domain, KernelContext

INDENT = "    "


@dataclasses.dataclass
class KernelSource:
    """One kernel's text plus what the wrapper needs to launch it.

    `params`/`body` are canonical (no IR names), so identical kernels from different layers
    dedupe to one function; `header` holds the IR-specific comments of the first group.
    """

    kind: str  # pointwise | reduction | matmul
    params: list[str]
    body: list[str]
    inputs: list[Value]  # in_ptr0.. in order
    outputs: list[Value]  # out_ptr0.. in order
    symbols: list[sympy.Symbol]  # shape symbols passed after the size arguments
    sizes: dict[str, sympy.Expr]  # size argument name -> expression (xnumel, rnumel, M, ...)
    header: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def dedup_key(self) -> tuple:
        return (self.kind, tuple(self.params), tuple(self.body))

    def text(self, name: str, decorator: str = "@triton.jit") -> str:
        lines = [decorator, f"def {name}({', '.join(self.params)}):"]
        lines += [INDENT + "# " + h for h in self.header]
        lines += [INDENT + b if b else "" for b in self.body]
        return "\n".join(lines) + "\n"


_FOR = re.compile(r"^(\s*)for (\w+) in range\(0, (\w+), (\w+)\):$")


def interpreter_loops(lines: list[str]) -> list[str]:
    """Rewrite `for i in range(0, n, step):` as a while loop.

    Triton's interpreter (3.6, with numpy 2.x) cannot take a kernel argument as a range bound
    (it converts a 1-element array with int()); a while loop only needs bool(), which works.
    On the GPU we keep `for`, which Triton software-pipelines (num_stages).
    """
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _FOR.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        ind, var, bound, step = m.groups()
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].startswith(ind + " ")):
            j += 1
        body = interpreter_loops(lines[i + 1 : j])
        out += [f"{ind}{var} = 0", f"{ind}while {var} < {bound}:", *body]
        out.append(f"{body[0][: len(body[0]) - len(body[0].lstrip())]}{var} += {step}")
        i = j
    return out


def io_params(ctx: KernelContext) -> list[str]:
    return list(ctx.inputs.values()) + list(ctx.outputs.values())


def sorted_symbols(ctx: KernelContext) -> list[sympy.Symbol]:
    return sorted(ctx.symbols, key=lambda s: s.name)


def emit_pointwise(shape, members, outputs: list[Value], layouts, hints) -> KernelSource:
    rank = len(shape)
    domain = Domain(shape, [Axis("x", tuple(range(rank)), "xindex", "xmask", "XBLOCK")], hints)
    ctx = KernelContext(domain, set(members), layouts)
    for v in outputs:
        ctx.store(v, domain.index, ctx.value(v, domain.index))
    syms = sorted_symbols(ctx)
    params = io_params(ctx) + ["xnumel"] + [s.name for s in syms] + ["XBLOCK: tl.constexpr"]
    body = [
        "xoffset = tl.program_id(0) * XBLOCK",
        "xindex = xoffset + tl.arange(0, XBLOCK)",
        "xmask = xindex < xnumel",
        *domain.unravel(),
        *ctx.lines,
    ]
    return KernelSource(
        "pointwise",
        params,
        body,
        list(ctx.inputs),
        list(ctx.outputs),
        syms,
        {"xnumel": sympy.expand(domain.numel("x"))},
    )
