"""This rank's training step as two meshweave IR graphs: its forward and its backward.

    joint = build_rank_joint(program.graph, tensors, optimize=..., make_runner=...)
    joint.forward, joint.backward     # IR with dist.* collectives, printed and verified
    outs = joint.fn(*user_args)       # differentiable; backward runs the backward IR

Single-device training differentiates the traced model (frontend/joint.py). Under a mesh the
rank runs its lowered program (the planner's `lower_for_rank`: the stage's shards plus
`dist.*` collectives), and that program is what must be differentiated. The method is the same
AOTAutograd joint trace, of the program itself: it is run once under AOTAutograd's tracer
with each collective called as a traceable torch op (`meshweave::all_reduce`, ...; fake
implementations give the output shapes, so tracing communicates nothing), whose autograd
formula is the collective's exact adjoint (autograd_collectives.py's convention):

    all_reduce sum -> all_reduce sum      all_gather(d) -> reduce_scatter(d)
    all_reduce max -> no gradient         reduce_scatter(d) -> all_gather(d)
    all_to_all(d -> c) -> all_to_all(c -> d)

The partitioned forward and backward are converted to IR, the traced collectives turned back
into the IR's `dist.*` nodes, shape-propagated and verified, and run by the backend (the
reference executor, whose dist.* implementations talk to the plan's process groups, or the
Triton backend's generated modules, in which the collectives run through torch). The
pipeline's CSE and DCE are not run on them: a collective one rank drops or merges would leave
the others waiting. Each node keeps the source line of the program node it came from.

Programs with stage-to-stage transfers inside (`dist.send`/`dist.recv` from a pipeline's
lowering), with ops that communicate inside (moe.experts_ep's all-to-alls), with a collective
whose result the rank never reads, or that AOTAutograd cannot trace (data-dependent shapes)
keep torch autograd over the forward program (RankModule's fallback; `backward_kind` says
which ran, and why).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx

from ...ir.errors import MeshweaveError
from ...ir.graph import Graph
from ...ir.ops import collectives as C
from ...frontend.joint import attention_args
from ...runtime.reference import run_node
from .errors import DistributedError


class JointTraceError(DistributedError):
    """AOTAutograd could not trace the rank's program (the caller falls back to autograd)."""


# ------------------------------------------------------------------ traceable collectives
@torch.library.custom_op("meshweave::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: list[int], reduce: str, axis: str) -> torch.Tensor:
    return C.all_reduce(x.contiguous(), axis=axis or None, group=group, reduce=reduce)


@all_reduce.register_fake
def _(x, group, reduce, axis):
    return x.new_empty(x.shape)


@torch.library.custom_op("meshweave::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group: list[int], axis: str) -> torch.Tensor:
    return C.all_gather(x.contiguous(), axis=axis or None, group=group, dim=dim)


def _resized(x: torch.Tensor, grown: int | None, shrunk: int | None, n: int) -> torch.Tensor:
    """An empty tensor shaped like x with dim `grown` times n and dim `shrunk` over n."""
    shape = list(x.shape)
    if grown is not None:
        shape[grown] *= n
    if shrunk is not None:
        shape[shrunk] //= n
    return x.new_empty(shape)


@all_gather.register_fake
def _(x, dim, group, axis):
    return _resized(x, dim, None, len(group))


@torch.library.custom_op("meshweave::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, dim: int, group: list[int], axis: str) -> torch.Tensor:
    return C.reduce_scatter(x.contiguous(), axis=axis or None, group=group, dim=dim)


@reduce_scatter.register_fake
def _(x, dim, group, axis):
    return _resized(x, None, dim, len(group))


@torch.library.custom_op("meshweave::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, dim: int, concat_dim: int, group: list[int],
               axis: str) -> torch.Tensor:
    return C.all_to_all(x.contiguous(), axis=axis or None, group=group, dim=dim,
                        concat_dim=concat_dim).contiguous()


@all_to_all.register_fake
def _(x, dim, concat_dim, group, axis):
    return _resized(x, concat_dim, dim, len(group))


def _keep_inputs(ctx, inputs, output):
    ctx.args = inputs[1:]


def _all_reduce_adjoint(ctx, g):
    group, reduce, axis = ctx.args
    if reduce == "max":  # the row max of a vocab-parallel softmax is used without a gradient
        return None, None, None, None
    return torch.ops.meshweave.all_reduce(g, group, "sum", axis), None, None, None


def _all_gather_adjoint(ctx, g):
    dim, group, axis = ctx.args
    return torch.ops.meshweave.reduce_scatter(g, dim, group, axis), None, None, None


def _reduce_scatter_adjoint(ctx, g):
    dim, group, axis = ctx.args
    return torch.ops.meshweave.all_gather(g, dim, group, axis), None, None, None


def _all_to_all_adjoint(ctx, g):
    dim, concat_dim, group, axis = ctx.args
    return torch.ops.meshweave.all_to_all(g, concat_dim, dim, group, axis), None, None, None, None


all_reduce.register_autograd(_all_reduce_adjoint, setup_context=_keep_inputs)
all_gather.register_autograd(_all_gather_adjoint, setup_context=_keep_inputs)
reduce_scatter.register_autograd(_reduce_scatter_adjoint, setup_context=_keep_inputs)
all_to_all.register_autograd(_all_to_all_adjoint, setup_context=_keep_inputs)


def _call_all_reduce(x, kw):
    reduce = kw.get("reduce", "sum")
    if reduce not in ("sum", "max"):
        raise DistributedError(f"dist.all_reduce: reduce must be 'sum' or 'max', got {reduce!r}")
    return torch.ops.meshweave.all_reduce(x, list(kw["group"]), reduce, kw.get("axis") or "")


def _call_reduce_scatter(x, kw):
    if kw.get("reduce", "sum") != "sum":
        raise DistributedError(f"dist.reduce_scatter: only 'sum', got {kw['reduce']!r}")
    return torch.ops.meshweave.reduce_scatter(x, kw["dim"], list(kw["group"]),
                                              kw.get("axis") or "")


# IR collective -> how the traced program calls it (the tensor, the node's keywords)
TRACED: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "dist.all_reduce": _call_all_reduce,
    "dist.all_gather": lambda x, kw: torch.ops.meshweave.all_gather(
        x, kw["dim"], list(kw["group"]), kw.get("axis") or ""),
    "dist.reduce_scatter": _call_reduce_scatter,
    "dist.all_to_all": lambda x, kw: torch.ops.meshweave.all_to_all(
        x, kw["dim"], kw["concat_dim"], list(kw["group"]), kw.get("axis") or ""),
}

_TRANSFERS = ("dist.recv", "dist.send")  # made the traced program's inputs and outputs

# traced torch op (as the converter names it) -> (IR op, keyword names after the tensor)
_BACK_TO_IR: dict[str, tuple[str, tuple[str, ...]]] = {
    "meshweave.all_reduce.default": ("dist.all_reduce", ("group", "reduce", "axis")),
    "meshweave.all_gather.default": ("dist.all_gather", ("dim", "group", "axis")),
    "meshweave.reduce_scatter.default": ("dist.reduce_scatter", ("dim", "group", "axis")),
    "meshweave.all_to_all.default": ("dist.all_to_all", ("dim", "concat_dim", "group", "axis")),
}


def untraceable(graph: Graph) -> str | None:
    """Why `graph` keeps torch autograd (None: it can be differentiated as IR)."""
    from .executor import DIST_OPS

    used = {v for n in graph.nodes for v in n.inputs} | set(graph.outputs)
    ops = [n.op for n in graph.nodes]
    if "dist.recv" in ops and "dist.send" in ops and \
            len(ops) - ops[::-1].index("dist.recv") > ops.index("dist.send"):
        return "it receives a value after sending one (a transfer inside its stage)"
    for n in graph.nodes:
        if (n.op in DIST_OPS or "group" in n.kwargs) and n.op not in (*TRACED, *_TRANSFERS):
            return f"{n.op} communicates and has no traceable form"
        if n.op in TRACED and n.outputs[0] not in used:
            return f"the result of collective %{n.outputs[0].name} is never read on this rank"
    return None


# ------------------------------------------------------------------ the joint program
@dataclasses.dataclass
class RankJoint:
    graphs: dict[str, Graph]
    fn: Callable[..., Any]  # (*user inputs, *received) -> outputs, then sent values
    recvs: list[dict] = dataclasses.field(default_factory=list)  # dist.recv keywords, in order
    sends: list[dict] = dataclasses.field(default_factory=list)  # dist.send keywords, in order

    @property
    def forward(self) -> Graph:
        return self.graphs["forward"]

    @property
    def backward(self) -> Graph:
        return self.graphs["backward"]


def _meta_node(source: str) -> fx.Node:
    """An fx node whose stack trace is an IR source line ("file:line in fn: code"), so the
    traced ops the line's node performs carry it into both graphs."""
    node = _META_GRAPH.placeholder("src")
    where, _, code = source.partition(": ")
    path, _, rest = where.partition(":")
    line, _, fn = rest.partition(" in ")
    node.meta["stack_trace"] = f'  File "{path}", line {line}, in {fn}\n    {code}\n'
    return node


_META_GRAPH = fx.Graph()


def transfers_outside(graph: Graph) -> tuple[Graph, list[dict], list[dict]]:
    """`graph` with its stage transfers outside: each dist.recv's value a trailing user input
    (the caller receives it first), each dist.send's input a trailing output (the caller sends
    it after), so a pipeline stage's program is traced like any other. Safe when every receive
    precedes every send (`untraceable` checks): the order of the transfers is unchanged."""
    g = graph.copy()
    recvs, sends, nodes = [], [], []
    for n in g.nodes:
        if n.op == "dist.recv":
            v = n.outputs[0]
            v.producer, v.kind, v.target = None, "user", v.name
            g.inputs.append(v)
            recvs.append(dict(n.kwargs))
        elif n.op == "dist.send":
            g.outputs.append(n.args[0])
            sends.append(dict(n.kwargs))
        else:
            nodes.append(n)
    g.nodes = nodes
    return g, recvs, sends


def _program_fn(graph: Graph) -> Callable[..., tuple]:
    """The program as a torch function of (state tensors..., user inputs...): compute nodes
    through the registry's implementations, collectives as the traceable torch ops."""
    state, users = graph.state_inputs, graph.user_inputs
    sources = {n.source: None for n in graph.nodes if n.source}

    def step(*leaves):
        env = dict(zip(list(state) + list(users), leaves))
        for n in graph.nodes:
            if n.source and sources[n.source] is None:
                sources[n.source] = _meta_node(n.source)
            where = (fx_traceback.set_current_meta(sources[n.source]) if n.source
                     else contextlib.nullcontext())
            with where:
                call = TRACED.get(n.op)
                if call is not None:
                    env[n.outputs[0]] = call(env[n.args[0]], n.kwargs)
                elif n.op != _SDPA or not _as_attention(n, env):
                    run_node(n, env)
        return tuple(env[v] for v in graph.outputs)

    return step


_SDPA = "aten.scaled_dot_product_attention.default"


def _as_attention(n, env) -> bool:
    """SDPA traced as meshweave.attention, as the single-device joint routes it
    (frontend/joint.py): one forward/backward pair on every device, which the Triton backend
    runs as its flash-attention kernels. False where it must stay SDPA (dropout)."""
    from ...ir.graph import map_values
    from ...ir.ops.attention import ATTENTION_OP

    args, kwargs = map_values(n.args, env.__getitem__), map_values(n.kwargs, env.__getitem__)
    routed = attention_args(args, kwargs, args[0].dim(), lambda f: False)
    if routed is None:
        return False
    env[n.outputs[0]] = ATTENTION_OP(*routed)[0]
    return True


def _as_collectives(g: Graph) -> Graph:
    """The converted graph with each traced collective back as its dist.* node."""
    for n in g.nodes:
        spec = _BACK_TO_IR.get(n.op)
        if spec is None:
            continue
        op, names = spec
        kw = dict(zip(names, n.args[1:]))
        kw["group"] = [int(r) for r in kw["group"]]
        kw["axis"] = kw.get("axis") or None
        n.op, n.args, n.kwargs = op, (n.args[0],), kw
        n.attrs.pop("fallback", None)
    return g


def build_rank_joint(
    graph: Graph,
    tensors: dict[str, torch.Tensor],
    *,
    optimize: Callable[[Graph], Graph],
    make_runner: Callable[[Graph], Callable[[list[Any]], list[Any]]],
    partition: Callable | None = None,
    recomputed: Callable[[], list[str]] | None = None,
) -> RankJoint:
    """The joint of this rank's program `graph`, its state read from `tensors` (the rank's
    shards: gradients flow into them). Tracing happens at the first call, with that call's
    shapes; `optimize` runs on each converted graph. `partition` and `recomputed` as
    frontend.joint.build_joint's (passes/remat/ under a memory budget: the rank's own)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import default_partition

    from ...frontend.joint import BACKWARD_DECOMPOSITIONS, JointCompilers, backward_with_forward

    graph, recvs, sends = transfers_outside(graph)
    state = graph.state_inputs
    inputs = list(state) + list(graph.user_inputs)
    rename = {f"primals_{i + 1}": v.name for i, v in enumerate(inputs)}
    compilers = JointCompilers(graph.name, [v.target or v.name for v in inputs], rename,
                               eager_fallback=True, optimize=optimize, make_runner=make_runner,
                               recomputed=recomputed, rewrite=_as_collectives)
    graphs = compilers.graphs
    traced = aot_function(_program_fn(graph), fw_compiler=compilers.forward,
                          bw_compiler=compilers.backward,
                          partition_fn=partition or default_partition,
                          decompositions=BACKWARD_DECOMPOSITIONS)
    eager_backward = not isinstance(backward_with_forward(), contextlib.nullcontext)

    def fn(*user_args):
        try:
            with fx_traceback.preserve_node_meta(), backward_with_forward():
                return traced(*[tensors[v.name] for v in state], *user_args)
        except MeshweaveError:
            raise
        except Exception as e:
            if "backward" in graphs or ("forward" in graphs and not eager_backward):
                raise  # traced already: a failure of the step itself
            raise JointTraceError(f"AOTAutograd could not trace {graph.name}: "
                                  f"{type(e).__name__}: {str(e)[:300]}") from e

    return RankJoint(graphs, fn, recvs, sends)
