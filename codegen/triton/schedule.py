"""Scheduling: which IR nodes become which kernel (fusion), in what order.

Every node is classified by the rule tables (no op-name if-chains): VIEW_INDEX -> a view
(index arithmetic, never a kernel of its own), REDUCTIONS -> reduction, MATMULS -> matmul,
ATTENTION -> flash attention, ATTENTION_TRAINING -> attention_train (the training step's
meshweave.attention pair: flash attention with its logsumexp, and its backward), QUANT_MATMULS -> quant (the weight-only quantized GEMM),
MOE_KERNELS -> moe (moe.experts on the grouped GEMM),
LOWERINGS -> pointwise; SymInt arithmetic runs in the wrapper ("host"); anything else, or
anything in a dtype the backend does not support, runs through the reference executor
("fallback", with the reason).

Nodes are then placed greedily in program order:
  * a pointwise node joins the group of one of its direct producers when the shapes fit:
    a pointwise group of the same shape, a reduction group as a full-tile or per-row consumer,
    or a matmul group as epilogue (also through a contiguous reshape of the matmul output, e.g.
    addmm [b*s, n] -> view [b, s, n] -> gelu: the epilogue then iterates the viewed shape,
    see _Scheduler.matmul_domain) -- except that a pointwise node that (through more pointwise
    nodes of its shape) feeds a reduction is kept out of matmul epilogues so the reduction can
    take it as a producer: that makes "residual add + LayerNorm" one kernel whether the matmul
    before it runs as the Triton template or as cuBLAS (chosen later, per shape);
  * a reduction turns the pointwise group that produces its input into a reduction group (or
    joins a reduction group over the same rows), else starts one;
  * matmul, attention, quant.linear and moe.experts nodes start their own groups.
A join is refused if it would make the group graph cyclic (a group may not need, through
another group, a value it produces itself).
"""

from __future__ import annotations

import dataclasses
import heapq

import sympy
import torch

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.registry import lookup
from meshweave.ir.types import ScalarType, TensorType, dtype_short
from .kernels.flash_attention import ATTENTION
from .kernels.flash_attention_bwd import ATTENTION_TRAINING
from .indexing import VIEW_INDEX, numel, shapes_equal, to_expr
from .kernels.reduction import REDUCTIONS, value_class
from .lowering import LOWERINGS, Pointwise
from .kernels.matmul import MATMULS, domain_index, epilogue_domain
from .kernels.quant_matmul import QUANT_MATMULS
from .kernels.moe_dispatch import MOE_KERNELS

KERNEL_KINDS = ("pointwise", "reduction", "matmul", "attention", "quant", "moe")
BASE_DTYPES = {
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}
GPU_ONLY_DTYPES = {torch.bfloat16}  # numpy (the interpreter) has no bfloat16


@dataclasses.dataclass(eq=False)
class Group:
    id: int
    kind: str  # pointwise | reduction | matmul | attention | quant | moe | host | fallback
    nodes: list[Node]
    shape: tuple = ()
    red_dims: tuple[int, ...] = ()
    anchor: Node | None = None
    deps: set = dataclasses.field(default_factory=set)  # ids of groups this one reads from
    outputs: list[Value] = dataclasses.field(default_factory=list)
    reason: str = ""

    @property
    def is_kernel(self) -> bool:
        return self.kind in KERNEL_KINDS


@dataclasses.dataclass
class Schedule:
    groups: list[Group]  # in execution order
    group_of: dict[Node, Group]
    kinds: dict[Node, str]
    reasons: dict[Node, str]  # fallback node -> why it is not compiled


def supported_dtypes(interpret: bool) -> set:
    return BASE_DTYPES if interpret else BASE_DTYPES | GPU_ONLY_DTYPES


def classify(n: Node, hints, interpret: bool, forced: dict[Node, str]) -> tuple[str, str]:
    if n in forced:
        return "fallback", forced[n]
    info = lookup(n.op)
    outs = [o.type for o in n.outputs]
    all_tensors = all(isinstance(t, TensorType) for t in outs)
    if info is None or n.attrs.get("fallback"):
        # No registry entry: compile it anyway when a lowering exists (the traced types are
        # known), else the reference executor runs it.
        if not (n.op in LOWERINGS and all_tensors and len(outs) == 1):
            return "fallback", "no registry entry (the frontend marked it for eager fallback)"
    elif info.category in ("sym", "constant") or not all_tensors:
        return "host", ""
    types = outs + [v.type for v in n.inputs if isinstance(v.type, TensorType)]
    ok = supported_dtypes(interpret)
    bad = [t.dtype for t in types if t.dtype not in ok]
    if bad:
        where = " under the Triton interpreter" if interpret and bad[0] in GPU_ONLY_DTYPES else ""
        why = f"dtype {dtype_short(bad[0])} is not supported by the Triton backend{where}"
        return "fallback", why
    if n.op in VIEW_INDEX:
        return "view", ""
    for v in n.inputs:
        if isinstance(v.type, ScalarType) and v.type.expr is None:
            return "fallback", f"scalar operand %{v.name} has no symbolic value"
    for table, kind in (
        (REDUCTIONS, "reduction"),
        (MATMULS, "matmul"),
        (ATTENTION, "attention"),
        (ATTENTION_TRAINING, "attention_train"),
        (QUANT_MATMULS, "quant"),
        (MOE_KERNELS, "moe"),
        (LOWERINGS, "pointwise"),
    ):
        rule = table.get(n.op)
        if rule is None:
            continue
        reason = (
            rule.supports(n, hints)
            if kind == "reduction"
            else (rule.supports(n) if rule.supports is not None else None)
        )
        return (kind, "") if not reason else ("fallback", reason)
    if info is not None and info.category == "view":
        return "fallback", f"view op {n.op} has no index rule (runs as a torch view)"
    return "fallback", f"no Triton lowering for {n.op}"


class _Scheduler:
    def __init__(self, graph: Graph, interpret: bool, forced: dict[Node, str], fuse: bool):
        self.graph = graph
        self.fuse = fuse
        self.users = graph.users()
        hints = graph.hints()
        self.hints = hints
        self.kinds: dict[Node, str] = {}
        self.reasons: dict[Node, str] = {}
        for n in graph.nodes:
            kind, reason = classify(n, hints, interpret, forced)
            self.kinds[n] = kind
            if reason:
                self.reasons[n] = reason
        self.groups: list[Group] = []
        self.group_of: dict[Node, Group] = {}
        self.graph_outputs = set(graph.outputs)

    # --- dependencies --------------------------------------------------------------------------
    def roots(self, v: Value) -> list[Node]:
        """Non-view producers behind a value (through any chain of views)."""
        n = v.producer
        if n is None:
            return []
        if self.kinds.get(n) != "view":
            return [n]
        out = []
        for u in n.inputs:
            out += self.roots(u)
        return out

    def input_groups(self, n: Node) -> set[int]:
        ids = set()
        for v in n.inputs:
            for r in self.roots(v):
                if r in self.group_of:
                    ids.add(self.group_of[r].id)
        return ids

    def reaches(self, start: int, target: int) -> bool:
        """Does group `start` depend (transitively) on group `target`?"""
        seen, stack = set(), [start]
        while stack:
            g = stack.pop()
            if g == target:
                return True
            if g not in seen:
                seen.add(g)
                stack.extend(self.groups[g].deps)
        return False

    def can_join(self, g: Group, n: Node) -> bool:
        return not any(self.reaches(h, g.id) for h in self.input_groups(n) if h != g.id)

    def add(self, g: Group, n: Node) -> None:
        g.nodes.append(n)
        self.group_of[n] = g
        g.deps |= self.input_groups(n) - {g.id}

    def new_group(self, kind: str, n: Node, **kw) -> Group:
        g = Group(len(self.groups), kind, [], **kw)
        self.groups.append(g)
        self.add(g, n)
        return g

    # --- placement -----------------------------------------------------------------------------
    def direct_groups(self, n: Node) -> list[Group]:
        """Kernel groups n reads directly, and matmul groups it reads through views (a matmul
        epilogue can follow a reshape of its output, see matmul_domain)."""
        gs = {
            self.group_of[v.producer].id
            for v in n.inputs
            if v.producer in self.group_of and self.group_of[v.producer].is_kernel
        }
        for v in n.inputs:
            if v.producer is not None and self.kinds.get(v.producer) == "view":
                for r in self.roots(v):
                    g = self.group_of.get(r)
                    if g is not None and g.kind == "matmul":
                        gs.add(g.id)
        return [self.groups[i] for i in sorted(gs, reverse=True)]

    def matmul_domain(self, g: Group, n: Node) -> tuple | None:
        """The epilogue shape with which pointwise n can join matmul group g, or None.

        The rule: the epilogue iterates the (m, n) tile over a domain shape -- the matmul's
        output shape or a row-major reshape of it keeping N last (matmul_template.
        epilogue_domain). n joins if, over the group's current domain or over n's own shape,
        every member of the domain's size (n included) reads the group's values at exactly
        the index the group computes them: directly at the same shape, or through views whose
        index maps compose to the identity on the flat index (a contiguous reshape such as
        addmm [b*s, n] -> view [b, s, n] -> gelu). Transposes, slices and broadcasts through
        views do not, so they stay out.
        """
        shape = n.outputs[0].tensor_type.shape
        for cand in (g.shape, shape):
            domain = epilogue_domain(g.anchor, cand, self.hints)
            if domain is None or sympy.expand(numel(shape) - numel(cand)) != 0:
                continue  # n itself must be tiled: stored at the domain position it computes
            if self.epilogue_reads_exact(g, n, domain):
                return tuple(cand)
        return None

    def epilogue_reads_exact(self, g: Group, n: Node, domain) -> bool:
        members = set(g.nodes) | {n}
        size = numel(domain.shape)
        env = domain.env

        def tiled(v: Value) -> bool:  # evaluated at the domain position, not recomputed
            return sympy.expand(numel(v.tensor_type.shape) - size) == 0

        for m in [*g.nodes, n]:
            if m is g.anchor or not tiled(m.outputs[0]):
                continue
            idx = domain_index(domain, m.outputs[0])
            for v in m.inputs:
                if not isinstance(v.type, TensorType) or v.producer is None:
                    continue
                if not any(r in members for r in self.roots(v)):
                    continue
                if v.producer in members:
                    if not shapes_equal(v.tensor_type.shape, m.outputs[0].tensor_type.shape):
                        return False
                    continue
                if not shapes_equal(v.tensor_type.shape, m.outputs[0].tensor_type.shape):
                    return False
                cur, ix = v, idx
                while cur.producer not in members:
                    p = cur.producer
                    if p is None or self.kinds.get(p) != "view":
                        return False
                    try:
                        cur, ix = VIEW_INDEX.get(p.op)(p, p.outputs.index(cur), ix, env)
                    except (ValueError, TypeError, KeyError):
                        return False
                if not tiled(cur):
                    return False
                want = domain_index(domain, cur)
                if len(want) != len(ix) or any(
                    sympy.expand(to_expr(a) - to_expr(b)) != 0 for a, b in zip(ix, want)
                ):
                    return False
        return True

    def via_view_from(self, n: Node, g: Group) -> bool:
        """Does n read a value of group g through a view (not at g's own index)?"""
        return any(
            v.producer is not None
            and self.kinds.get(v.producer) == "view"
            and any(self.group_of.get(r) is g for r in self.roots(v))
            for v in n.inputs
        )

    def fits(self, g: Group, n: Node) -> bool:
        shape = n.outputs[0].tensor_type.shape
        internal = [v for v in n.inputs if v.producer in g.nodes]
        if self.via_view_from(n, g):
            return False
        if g.kind in ("pointwise", "matmul"):
            return shapes_equal(g.shape, shape) and all(
                shapes_equal(v.tensor_type.shape, shape) for v in internal
            )
        if g.kind == "reduction":
            if internal and not isinstance(LOWERINGS.get(n.op), Pointwise):
                # an indexed op (flip, cat, pad, gather) reads its input elsewhere in the row,
                # where this kernel does not hold the value: it starts its own kernel
                return False
            cls = value_class(g.shape, g.red_dims, shape)
            if cls is None:
                return False
            ok = ("full", "row") if cls == "full" else ("row",)
            return all(
                value_class(g.shape, g.red_dims, v.tensor_type.shape) in ok for v in internal
            )
        return False

    def feeds_reduction(self, n: Node, depth: int = 6) -> bool:
        shape = n.outputs[0].tensor_type.shape
        frontier = [n]
        for _ in range(depth):
            nxt = []
            for m in frontier:
                for u in self.users.get(m.outputs[0], []):
                    kind = self.kinds.get(u)
                    if kind == "reduction" and REDUCTIONS.get(u.op).input(u) is m.outputs[0]:
                        if shapes_equal(u.args[0].tensor_type.shape, shape):
                            return True
                    elif kind == "pointwise" and shapes_equal(
                        u.outputs[0].tensor_type.shape, shape
                    ):
                        nxt.append(u)
            frontier = nxt
        return False

    def place_pointwise(self, n: Node) -> None:
        shape = n.outputs[0].tensor_type.shape
        if self.fuse:
            to_reduction = None
            for g in self.direct_groups(n):
                if g.kind == "matmul":
                    if to_reduction is None:
                        to_reduction = self.feeds_reduction(n)
                    if to_reduction:
                        continue
                if g.kind == "matmul":
                    epilogue = self.matmul_domain(g, n)
                    if epilogue is not None and self.can_join(g, n):
                        g.shape = epilogue
                        self.add(g, n)
                        self.inline_producers(g, n)
                        return
                    continue
                if self.fits(g, n) and self.can_join(g, n):
                    self.add(g, n)
                    self.inline_producers(g, n)
                    return
        self.inline_producers(self.new_group("pointwise", n, shape=shape), n)

    def inline_producers(self, g: Group, n: Node) -> None:
        """Pull in a pointwise group whose only consumer is n (directly or through views),
        whatever its shape: its values are recomputed at the index n reads them (a position
        embedding broadcast over the batch, a copy before a reshape), saving a kernel and a
        buffer round trip."""
        if not self.fuse:
            return
        for v in n.inputs:
            for root in self.roots(v):
                q = self.group_of.get(root)
                if q is not None and q is not g and q.kind == "pointwise" and self.only_feeds(q, n):
                    for m in q.nodes:
                        self.group_of[m] = g
                    g.nodes = q.nodes + g.nodes
                    g.deps = (g.deps | q.deps) - {q.id, g.id}
                    q.kind, q.nodes, q.deps = "dead", [], set()

    def only_feeds(self, q: Group, n: Node) -> bool:
        """Is every value q produces consumed inside q or by n (possibly through views)?"""
        stack = [o for m in q.nodes for o in m.outputs]
        while stack:
            o = stack.pop()
            if o in self.graph_outputs:
                return False
            for u in self.users.get(o, []):
                if u is n or u in q.nodes:
                    continue
                if self.kinds.get(u) != "view":
                    return False
                stack.extend(u.outputs)
        return True

    def place_reduction(self, n: Node) -> None:
        rule = REDUCTIONS.get(n.op)
        x, dims = rule.input(n), rule.dims(n)
        shape = x.tensor_type.shape
        g = self.group_of.get(x.producer) if self.fuse else None
        if g is not None and shapes_equal(g.shape, shape) and self.can_join(g, n):
            if g.kind == "pointwise":
                g.kind, g.red_dims, g.anchor = "reduction", dims, n
                self.add(g, n)
                self.inline_producers(g, n)
                return
            if g.kind == "reduction" and g.red_dims == dims:
                self.add(g, n)
                self.inline_producers(g, n)
                return
        g = self.new_group("reduction", n, shape=shape, red_dims=dims, anchor=n)
        self.inline_producers(g, n)

    def run(self) -> Schedule:
        for n in self.graph.nodes:
            kind = self.kinds[n]
            if kind == "view":
                continue
            if kind == "pointwise":
                self.place_pointwise(n)
            elif kind == "reduction":
                self.place_reduction(n)
            elif kind == "matmul":
                self.new_group("matmul", n, shape=n.outputs[0].tensor_type.shape, anchor=n)
            else:
                g = self.new_group(kind, n, anchor=n)
                g.reason = self.reasons.get(n, "")
        for g in self.groups:
            g.outputs = self.stored_values(g)
        return Schedule(self.ordered(), self.group_of, self.kinds, self.reasons)

    def stored_values(self, g: Group) -> list[Value]:
        """Values of g needed outside it: graph outputs, or read (maybe via views) elsewhere."""
        if not g.is_kernel:
            return [o for n in g.nodes for o in n.outputs]
        members = set(g.nodes)

        def escapes(v: Value) -> bool:
            if v in self.graph_outputs:
                return True
            for u in self.users.get(v, []):
                if u in members:
                    continue
                if self.kinds.get(u) != "view" or any(escapes(o) for o in u.outputs):
                    return True
            return False

        return [o for n in g.nodes for o in n.outputs if escapes(o)]

    def ordered(self) -> list[Group]:
        live = [g for g in self.groups if g.kind != "dead"]
        indeg = {g.id: len(g.deps) for g in live}
        dependents: dict[int, list[int]] = {g.id: [] for g in live}
        for g in live:
            for d in g.deps:
                dependents[d].append(g.id)
        ready = [i for i, k in indeg.items() if k == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(self.groups[i])
            for j in dependents[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(live):
            raise RuntimeError("kernel groups form a cycle (scheduler bug)")
        return order


def schedule(
    graph: Graph, interpret: bool, forced: dict[Node, str] | None = None, fuse: bool = True
) -> Schedule:
    """Group `graph`'s nodes into kernels; `forced` nodes run through the reference executor."""
    return _Scheduler(graph, interpret, forced or {}, fuse).run()


def kernel_name(g: Group, index: int) -> str:
    prefix = {"pointwise": "poi", "reduction": "red", "matmul": "mm", "attention": "fa",
              "quant": "qmm", "moe": "moe"}[g.kind]
    names: list[str] = []
    for n in g.nodes:
        short = n.op.split(".")[1].lstrip("_") if "." in n.op else n.op
        if short not in names:
            names.append(short)
    tail = "_".join(names[:5]) + ("_etc" if len(names) > 5 else "")
    return f"triton_{prefix}_{tail}_{index}"
