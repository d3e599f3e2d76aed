"""Emits one Python module per graph: the Triton kernels plus a call() wrapper.

call(inputs, state, rt) binds the shape symbols from the input tensors' sizes, allocates each
kernel's output buffers, launches the kernels in schedule order, runs views that a cuBLAS /
attention / fallback consumer needs as real tensors through torch (strided views, no copies),
runs uncompiled nodes through the reference executor (rt.run_node), and returns the graph
outputs. Each launch is preceded by a comment naming the IR nodes and user source lines it
covers, so the module can be read next to the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import sympy
import torch

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.types import ScalarType, TensorType
from .kernels.flash_attention import FLASH_ATTENTION_SOURCE, parse_sdpa
from .kernels.flash_attention_bwd import ATTENTION_TRAINING, FLASH_ATTENTION_BWD_SOURCE
from .indexing import contiguous_strides, pexpr, to_expr
from .kernels.pointwise import KernelSource, emit_pointwise, interpreter_loops
from .kernels.reduction import emit_reduction
from .kernels.matmul import MATMULS, bias_only, emit_matmul, is_bare
from .kernels.quant_matmul import QUANT_MATMULS, quant_kernel_source
from .kernels.grouped_gemm import kernel_source as moe_kernel_source
from .kernels.moe_dispatch import MOE_KERNELS
from .memory_plan import plan_reuse
from .schedule import Group, Schedule, kernel_name, schedule
from .tvalues import CodegenError

INDENT = "    "
# view op -> (Tensor method, positional argument count) where the two take the same arguments
_VIEW_METHODS = {
    "aten.reshape.default": ("reshape", 2),
    "aten.permute.default": ("permute", 2),
    "aten.split_with_sizes.default": ("split_with_sizes", 3),
    "aten.transpose.int": ("transpose", 3),
    "aten.unsqueeze.default": ("unsqueeze", 2),
    "aten.squeeze.dims": ("squeeze", 2),
    "aten.squeeze.dim": ("squeeze", 2),
    "aten.expand.default": ("expand", 2),
    "aten.select.int": ("select", 3),
    "aten.t.default": ("t", 1),
}
_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")


@dataclasses.dataclass
class KernelRecord:
    """One launch site: the kernel it runs and the IR nodes it covers."""

    name: str
    kind: str
    nodes: list[int]  # covered nodes, by position in graph.nodes (names vary by process)
    text: str  # source of the kernel function(s) launched


@dataclasses.dataclass
class GeneratedModule:
    source: str
    kernels: list[KernelRecord]
    fallbacks: list[dict]  # {"node": position in graph.nodes, "reason"}


def node_label(n: Node) -> str:
    return n.outputs[0].name if n.outputs else n.op


def _layouts(graph: Graph, sched: Schedule) -> dict[Value, tuple]:
    """Strides (sympy) of every buffer a kernel may load from: inputs and group outputs."""
    out: dict[Value, tuple] = {}
    for v in graph.inputs:
        if isinstance(v.type, TensorType):
            out[v] = contiguous_strides(v.type.shape)
    for g in sched.groups:
        for v in g.outputs:
            if not isinstance(v.type, TensorType):
                continue
            shape = v.type.shape
            if g.kind == "attention":  # stored [B, Sq, H, D], seen as [B, H, Sq, D]
                b, h, s, d = contiguous_strides((shape[0], shape[2], shape[1], shape[3]))
                out[v] = (b, s, h, d)
            else:
                out[v] = contiguous_strides(shape)
    return out


def _emit_kernels(graph: Graph, sched: Schedule, layouts) -> dict[int, tuple]:
    """KernelSource(s) per kernel group id; raises CodegenError naming the failing group."""
    hints = graph.hints()
    kernels: dict[int, tuple] = {}
    for g in sched.groups:
        try:
            if g.kind == "pointwise":
                kernels[g.id] = (emit_pointwise(g.shape, g.nodes, g.outputs, layouts, hints),)
            elif g.kind == "reduction":
                kernels[g.id] = (
                    emit_reduction(g.shape, g.red_dims, g.nodes, g.outputs, layouts, hints),
                )
            elif g.kind == "matmul":
                kernels[g.id] = emit_matmul(
                    g.anchor, g.nodes, g.outputs, layouts, hints, shape=g.shape
                )
        except (CodegenError, ValueError, KeyError, TypeError) as e:
            raise _GroupError(g, f"{type(e).__name__}: {e}") from e
    return kernels


class _GroupError(Exception):
    def __init__(self, group: Group, message: str):
        self.group = group
        super().__init__(message)


def generate_module(
    graph: Graph,
    interpret: bool,
    fuse: bool = True,
    key: str = "",
    forced: dict[Node, str] | None = None,
) -> GeneratedModule:
    """Schedule, emit kernels and the wrapper. A group that fails to emit is retried with its
    nodes on the reference executor (the reason is kept), so codegen never half-fails."""
    forced = dict(forced or {})
    for _ in range(len(graph.nodes) + 1):
        sched = schedule(graph, interpret, forced, fuse)
        layouts = _layouts(graph, sched)
        try:
            kernels = _emit_kernels(graph, sched, layouts)
            return _Wrapper(graph, sched, kernels, interpret, key).generate()
        except _GroupError as e:
            for n in e.group.nodes:
                forced[n] = f"codegen failed for its kernel: {e}"
        except CodegenError as e:  # not about one group: run the whole graph by reference
            if len(forced) == len(graph.nodes):
                raise
            forced = {n: f"codegen failed for the graph: {e}" for n in graph.nodes}
    raise CodegenError("codegen did not converge")  # pragma: no cover


class _Wrapper:
    def __init__(
        self, graph: Graph, sched: Schedule, kernels: dict[int, tuple], interpret: bool, key: str
    ):
        self.graph = graph
        self.sched = sched
        self.kernels = kernels
        self.interpret = interpret
        self.key = key
        self.lines: list[str] = []
        self.names: dict[Value, str] = {}
        self.defs: list[str] = []  # kernel function texts, deduplicated
        self.dedup: dict[tuple, tuple[str, ...]] = {}
        self.records: list[KernelRecord] = []
        self.bound: set[sympy.Symbol] = set()
        self.node_index = {n: i for i, n in enumerate(graph.nodes)}
        self.loaded = {v for ks in kernels.values() for k in ks for v in k.inputs}
        self.uses_attention = any(g.kind == "attention" or g.kind == "attention_train"
                                  and g.anchor.op == "meshweave.attention.default"
                                  for g in sched.groups)
        self.uses_attention_bwd = any(g.kind == "attention_train"
                                      and g.anchor.op != "meshweave.attention.default"
                                      for g in sched.groups)
        self.uses_quant = any(g.kind == "quant" for g in sched.groups)
        self.uses_moe = any(g.kind == "moe" for g in sched.groups)
        self.reuse = plan_reuse(graph, sched)

    # --- names and expressions -----------------------------------------------------------------
    def emit(self, line: str) -> None:
        self.lines.append(INDENT + line)

    def size(self, e) -> str:
        e = to_expr(e)
        missing = [s for s in e.free_symbols if s not in self.bound]
        if missing:
            raise CodegenError(f"size {e} uses symbols {missing} that no input dimension binds")
        return pexpr(e)

    def shape(self, shape) -> str:
        items = [self.size(d) for d in shape]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

    def pyarg(self, a) -> str:
        if isinstance(a, Value):
            return self.real(a)
        if isinstance(a, list):
            return "[" + ", ".join(self.pyarg(x) for x in a) + "]"
        if isinstance(a, tuple):
            return "(" + "".join(self.pyarg(x) + ", " for x in a) + ")"
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, (torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, torch.device):
            return f"torch.device({str(a)!r})"
        if isinstance(a, float) and not math.isfinite(a):
            return f"float({str(a)!r})"
        return repr(a)

    def real(self, v: Value) -> str:
        """A Python expression for v as a real value, running views through torch if needed."""
        if v in self.names:
            return self.names[v]
        n = v.producer
        if n is None or self.sched.kinds.get(n) != "view":
            raise CodegenError(f"%{v.name} is used before it is computed")
        op = "aten.reshape.default" if n.op in _RESHAPES else n.op
        args = [self.pyarg(a) for a in n.args]
        outs = [f"buf_{o.name}" for o in n.outputs]
        target = ", ".join(outs) + ("," if n.multi_output and len(outs) == 1 else "")
        method = _VIEW_METHODS.get(op)
        if method is not None and not n.kwargs and len(args) == method[1]:
            # a Tensor method: the same view, without the op overload's Python dispatch
            call = f"{args[0]}.{method[0]}({', '.join(args[1:])})"
        else:
            args += [f"{k}={self.pyarg(a)}" for k, a in n.kwargs.items()]
            call = f"{op}({', '.join(args)})"
        self.emit(f"{target} = {call}  # view, no copy")
        for o, name in zip(n.outputs, outs):
            self.names[o] = name
        return self.names[v]

    # --- the module ----------------------------------------------------------------------------
    def generate(self) -> GeneratedModule:
        self.bind_inputs()
        for g in self.sched.groups:
            try:
                getattr(self, f"group_{g.kind}")(g)
            except CodegenError as e:
                if not g.is_kernel:
                    raise
                raise _GroupError(g, f"CodegenError: {e}") from e
        outs = [self.real(v) for v in self.graph.outputs]
        self.emit("return [" + ", ".join(outs) + "]")
        fallbacks = [
            {"node": self.node_index[n], "reason": r} for n, r in self.sched.reasons.items()
        ]
        return GeneratedModule(self.module_text(), self.records, fallbacks)

    def module_text(self) -> str:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        summary = ", ".join(f"{c} {k}" for k, c in sorted(counts.items())) or "none"
        head = [
            f'"""meshweave generated kernels for graph {self.graph.name}.',
            "",
            f"cache key: {self.key}",
            (
                f"launch sites: {len(self.records)} ({summary}); "
                f"{len(self.sched.reasons)} nodes through the reference executor"
            ),
            "Regenerated automatically; do not edit.",
            '"""',
            "import torch",
            "import triton",
            "import triton.language as tl",
            "",
            "aten = torch.ops.aten",
            "",
        ]
        if self.uses_attention:
            self.defs.insert(0, self.mode_text(FLASH_ATTENTION_SOURCE))
        if self.uses_attention_bwd:
            self.defs.insert(0, self.mode_text(FLASH_ATTENTION_BWD_SOURCE))
        if self.uses_quant:
            self.defs.insert(0, quant_kernel_source(self.interpret))
        if self.uses_moe:
            self.defs.insert(0, moe_kernel_source(self.interpret))
        body = ["", "def call(inputs, state, rt):"] + self.lines
        return "\n".join(head) + "\n\n" + "\n\n".join(self.defs) + "\n" + "\n".join(body) + "\n"

    def bind_inputs(self) -> None:
        users = self.graph.user_inputs
        states = self.graph.state_inputs
        for v in users + states:
            self.names[v] = f"arg_{v.name}"
        if users:
            self.emit("(" + "".join(f"arg_{v.name}, " for v in users) + ") = inputs")
        if states:
            self.emit("(" + "".join(f"arg_{v.name}, " for v in states) + ") = state")
        for v in users:  # kernels index inputs as contiguous (state: checked by the runner)
            if isinstance(v.type, TensorType):
                self.emit(f"arg_{v.name} = rt.contiguous(arg_{v.name})")
        tensors = [v for v in users + states if isinstance(v.type, TensorType)]
        self.emit(
            f"device = arg_{tensors[0].name}.device" if tensors else "device = torch.device('cpu')"
        )
        for v in users:
            t = v.type
            if isinstance(t, ScalarType) and isinstance(t.expr, sympy.Symbol):
                self.bind(t.expr, f"arg_{v.name}")
            if isinstance(t, TensorType):
                for i, d in enumerate(t.shape):
                    if isinstance(d, sympy.Symbol):
                        self.bind(d, f"arg_{v.name}.shape[{i}]")

    def bind(self, sym: sympy.Symbol, text: str) -> None:
        if sym not in self.bound:
            self.bound.add(sym)
            self.emit(f"{sym.name} = {text}")

    # --- one block per group -------------------------------------------------------------------
    def comment(self, g: Group, title: str) -> None:
        self.emit("")
        self.emit(f"# {title}: " + ", ".join(f"%{node_label(n)} ({n.op})" for n in g.nodes))
        seen = []
        for n in g.nodes:
            if n.source and n.source not in seen:
                seen.append(n.source)
        for s in seen:
            self.emit(f"#   {s}")

    def kernel_def(self, g: Group, sources: tuple[KernelSource, ...]) -> tuple[str, ...]:
        key = tuple(s.dedup_key() for s in sources)
        if key in self.dedup:
            return self.dedup[key]
        base = kernel_name(g, len(self.dedup))
        names = (base,) if len(sources) == 1 else (base, base.replace("_mm_", "_mm_epi_", 1))
        header = [
            f"{node_label(n)} = {n.op}" + (f"  ({n.source})" if n.source else "") for n in g.nodes
        ]
        for src, name in zip(sources, names):
            src.header = ["IR nodes (of the first group using this kernel):"] + [
                "  " + h for h in header
            ]
            self.defs.append(self.mode_text(src.text(name)))
        self.dedup[key] = names
        return names

    def record(self, g: Group, name: str, text: str) -> None:
        self.records.append(KernelRecord(name, g.kind, [self.node_index[n] for n in g.nodes], text))

    def kernel_args(self, ks: KernelSource) -> list[str]:
        for s in ks.symbols:
            if s not in self.bound:
                raise CodegenError(f"kernel needs symbol {s} that no input binds")
        return [self.names[v] for v in ks.inputs] + [self.names[v] for v in ks.outputs]

    def allocate(self, g: Group) -> None:
        for v in g.outputs:
            t = v.tensor_type
            self.names[v] = f"buf_{v.name}"
            dead = self.reuse.get(v)
            if dead is not None:
                self.emit(f"buf_{v.name} = {self.names[dead]}  # reuse: nothing reads it later")
                continue
            self.emit(
                f"buf_{v.name} = torch.empty({self.shape(t.shape)}, dtype={t.dtype}, device=device)"
            )

    def group_pointwise(self, g: Group) -> None:
        (ks,) = self.kernels[g.id]
        (name,) = self.kernel_def(g, (ks,))
        self.comment(g, name)
        self.allocate(g)
        args = self.kernel_args(ks) + [self.size(ks.sizes["xnumel"])]
        args += [s.name for s in ks.symbols]
        self.emit(f"XBLOCK, warps = rt.pointwise_config({self.size(ks.sizes['xnumel'])})")
        self.emit(
            f"{name}[(rt.cdiv({args[len(ks.inputs) + len(ks.outputs)]}, XBLOCK),)]("
            f"{', '.join(args)}, XBLOCK=XBLOCK, num_warps=warps)"
        )
        self.record(g, name, self.defs_text(name))

    def group_reduction(self, g: Group) -> None:
        (ks,) = self.kernels[g.id]
        (name,) = self.kernel_def(g, (ks,))
        self.comment(g, name)
        self.allocate(g)
        x, r = self.size(ks.sizes["xnumel"]), self.size(ks.sizes["rnumel"])
        args = self.kernel_args(ks) + [x, r] + [s.name for s in ks.symbols]
        looped = ", looped=True" if ks.extra.get("looped") else ""
        self.emit(f"XBLOCK, RBLOCK, warps = rt.reduction_config({x}, {r}{looped})")
        self.emit(
            f"{name}[(rt.cdiv({x}, XBLOCK),)]({', '.join(args)}, XBLOCK=XBLOCK, "
            f"RBLOCK=RBLOCK, num_warps=warps)"
        )
        self.record(g, name, self.defs_text(name))

    def group_matmul(self, g: Group) -> None:
        template, epi = self.kernels[g.id]
        names = self.kernel_def(g, (template, epi))
        self.comment(g, names[0])
        ops = MATMULS.get(g.anchor.op).operands(g.anchor)
        sizes = {k: self.size(v) for k, v in template.sizes.items()}
        self.allocate(g)
        a, b = self.real(ops.a), self.real(ops.b)
        if not ops.batched:
            a = f"{a}.reshape({sizes['M']}, {sizes['K']})" if ops.a.tensor_type.rank != 2 else a
            b = f"{b}.t()" if ops.b_is_nk else b
        direct, bias = "None", ""
        if is_bare(g.nodes, g.anchor, g.outputs) and g.outputs == [g.anchor.outputs[0]]:
            direct = self.names[g.outputs[0]]
        elif (vec := bias_only(g.nodes, g.anchor, g.outputs)) is not None:
            direct, bias = self.names[g.outputs[0]], f", bias={self.real(vec)}"
        io = self.kernel_args(template)
        syms = "".join(s.name + ", " for s in template.symbols)
        tag = hashlib.sha256("\n".join(template.body).encode()).hexdigest()[:12]
        self.emit(
            f"rt.matmul({names[0]}, {names[1]}, {tag!r}, {a}, {b}, "
            f"({''.join(x + ', ' for x in io)}), {sizes['M']}, {sizes['N']}, "
            f"{sizes['K']}, ({syms}), batch={sizes['batch']}, direct_out={direct}{bias})"
        )
        self.record(g, names[0], self.defs_text(names[0]) + "\n" + self.defs_text(names[1]))

    def group_attention(self, g: Group) -> None:
        a = parse_sdpa(g.anchor)
        self.comment(g, "triton_flash_attention")
        out = g.anchor.outputs[0]
        mask = self.real(a.mask) if a.mask is not None else "None"
        self.names[out] = f"buf_{out.name}"
        self.emit(
            f"buf_{out.name} = rt.attention(triton_flash_attention, {self.real(a.q)}, "
            f"{self.real(a.k)}, {self.real(a.v)}, {mask}, is_causal={a.is_causal}, "
            f"scale={a.scale!r}, enable_gqa={a.enable_gqa})"
        )
        self.record(g, "triton_flash_attention", self.mode_text(FLASH_ATTENTION_SOURCE))

    def group_attention_train(self, g: Group) -> None:
        """The training step's meshweave.attention pair (ir/ops/attention.py): contiguous
        outputs, (out, lse) from the forward kernel, (dq, dk, dv) from the backward's two."""
        n = g.anchor
        rule = ATTENTION_TRAINING.get(n.op)
        a = rule.parse(n)
        mask = self.real(a.mask) if a.mask is not None else "None"
        qkv = f"{self.real(a.q)}, {self.real(a.k)}, {self.real(a.v)}"
        flags = f"is_causal={a.is_causal}, scale={a.scale!r}, enable_gqa={a.enable_gqa}"
        outs = [f"buf_{o.name}" for o in n.outputs]
        if rule.backward:
            dout, out, lse = (self.real(n.args[i]) for i in (0, 4, 5))
            self.comment(g, "triton_flash_attention_bwd")
            self.emit(f"{', '.join(outs)}, = rt.attention_backward("
                      f"triton_flash_attention_bwd_dkdv, triton_flash_attention_bwd_dq, {dout}, "
                      f"{qkv}, {out}, {lse}, {mask}, {flags})")
            self.record(g, "triton_flash_attention_bwd",
                        self.mode_text(FLASH_ATTENTION_BWD_SOURCE))
        else:
            self.comment(g, "triton_flash_attention")
            self.emit(f"{', '.join(outs)}, = rt.attention_with_lse(triton_flash_attention, "
                      f"{qkv}, {mask}, {flags})")
            self.record(g, "triton_flash_attention", self.mode_text(FLASH_ATTENTION_SOURCE))
        for o, name in zip(n.outputs, outs):
            self.names[o] = name

    def group_quant(self, g: Group) -> None:
        self.comment(g, "triton_quant_matmul")
        n, out = g.anchor, g.anchor.outputs[0]
        args = ", ".join("None" if v is None else self.real(v)
                         for v in QUANT_MATMULS.get(n.op).operands(n))
        self.names[out] = f"buf_{out.name}"
        self.emit(
            f"buf_{out.name} = rt.quant_linear((triton_quant_matmul, triton_quant_splitk_reduce), "
            f"{args}, bits={n.kwargs['bits']!r}, group_size={n.kwargs['group_size']!r})"
        )
        self.record(g, "triton_quant_matmul", quant_kernel_source(self.interpret))

    def group_moe(self, g: Group) -> None:
        """moe.experts: rt.moe_experts sorts the pairs, runs two grouped-GEMM launches and the
        combine, and returns (y, dropped) as the op's eager rule does."""
        self.comment(g, "triton_moe_grouped_gemm")
        n = g.anchor
        rule = MOE_KERNELS.get(n.op)
        args = ", ".join("None" if v is None else self.real(v) for v in rule.operands(n))
        attrs = ", ".join(f"{k}={v!r}" for k, v in rule.attrs(n).items())
        outs = [f"buf_{o.name}" for o in n.outputs]
        self.emit(f"{', '.join(outs)}, = rt.moe_experts(triton_moe_grouped_gemm, {args}, {attrs})")
        for o, name in zip(n.outputs, outs):
            self.names[o] = name
        self.record(g, "triton_moe_grouped_gemm", moe_kernel_source(self.interpret))

    def group_host(self, g: Group) -> None:
        n = g.anchor
        outs = [f"buf_{o.name}" for o in n.outputs]
        exprs = [o.type.expr if isinstance(o.type, ScalarType) else None for o in n.outputs]
        if n.op.startswith(("sym.", "aten.sym_")) and all(
            e is not None and to_expr(e).free_symbols <= self.bound for e in exprs
        ):
            for o, name, e in zip(n.outputs, outs, exprs):
                self.emit(f"{name} = {pexpr(to_expr(e))}  # %{o.name} = {n.op}")
                self.names[o] = name
            return
        self.run_reference(g, n, "host op")

    def group_fallback(self, g: Group) -> None:
        self.comment(g, "reference executor")
        for n in g.nodes:
            self.emit(f"# not compiled: {self.sched.reasons.get(n, g.reason)}")
            self.run_reference(g, n, "fallback")

    def run_reference(self, g: Group, n: Node, why: str) -> None:
        args = ", ".join(self.real(v) for v in n.inputs)
        outs = [f"buf_{o.name}" for o in n.outputs]
        self.emit(
            f"({''.join(o + ', ' for o in outs)}) = rt.run_node("
            f"{self.node_index[n]}, [{args}])  # {n.op} ({why})"
        )
        for o, name in zip(n.outputs, outs):
            self.names[o] = name
            if o in self.loaded:  # kernels index it as a contiguous buffer
                self.emit(f"{name} = rt.contiguous({name})")

    def mode_text(self, text: str) -> str:
        if not self.interpret:
            return text
        return "\n".join(interpreter_loops(text.splitlines())) + "\n"

    def defs_text(self, name: str) -> str:
        for d in self.defs:
            if f"def {name}(" in d:
                return d
        return ""
