"""The rematerialization problem, read off AOTAutograd's joint forward+backward graph.

    problem = build_problem(joint_module, num_fwd_outputs, spec)

Every node the forward can compute (it does not depend on a tangent) is a candidate. The
backward reads some of them directly (`needed`): each of those is either saved or recomputed,
and a recomputed node needs each of its forward inputs saved or recomputed in turn. Parameters
and the call's inputs are alive anyway: reading them costs nothing. Per candidate:

  nbytes     bytes kept if saved (a view of a parameter or input: 0; a view of an activation:
             its base's bytes, since saving the view keeps the base's storage)
  cost       seconds to recompute it, from the registry's FLOP and byte rules and the
             hardware spec's roofline (meshweave's cost model)
  flops      FLOPs to recompute it (what the benchmark reports)
  recompute  False for random ops (recomputing would draw new numbers), mutations, collectives
             and nodes torch tags must-be-in-forward: those are saved or not needed at all
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from ...ir.registry import lookup
from ...ir.types import TensorType

_VIEW_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice",
             "select", "unsqueeze", "squeeze", "alias", "as_strided", "detach", "split",
             "unbind", "view_as", "_reshape_alias", "split_with_sizes", "chunk", "unflatten"}
_COLLECTIVE_NAMESPACES = {"_c10d_functional", "c10d_functional", "c10d"}


@dataclasses.dataclass
class Candidate:
    name: str
    nbytes: float
    cost: float
    flops: float
    recompute: bool
    inputs: list[str]  # forward candidates this one reads (parameters and inputs left out)
    tensor: bool  # a tuple-valued node (read through getitem) cannot be saved itself
    sym: bool = False  # a SymInt: saved beside the tensors, for free
    source: str = ""


@dataclasses.dataclass
class RematProblem:
    candidates: dict[str, Candidate]  # in the joint graph's order
    needed: list[str]  # candidates the backward reads directly
    free: list[str]  # parameters and call inputs the backward may read

    @property
    def full_bytes(self) -> float:
        """What saving everything the backward reads keeps: the budget's 100%."""
        return sum(self.candidates[n].nbytes for n in self.needed)


def _is_primal(n: fx.Node) -> bool:
    return n.op == "placeholder" and "tangents" not in str(n.target)


def _val_type(v):
    if isinstance(v, torch.Tensor):
        return TensorType(tuple(int(s) for s in v.shape), v.dtype, v.device.type)
    return v


def _nbytes(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.numel() * v.element_size())
    return 0.0


def _op_name(n: fx.Node) -> str:
    return str(n.target) if isinstance(n.target, torch._ops.OpOverload) else ""


def _packet(n: fx.Node) -> str:
    t = n.target
    return t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else ""


def _recomputable(n: fx.Node) -> bool:
    t = n.target
    if n.meta.get("partitioner_tag") == "must_be_in_forward":
        return False
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in t.tags or t._schema.is_mutable:
            return False
        if t.namespace in _COLLECTIVE_NAMESPACES:
            return False
        return True
    return t is operator.getitem


def _cost(n: fx.Node, spec) -> tuple[float, float]:
    """(seconds, FLOPs) of one recomputation of `n`."""
    if n.target is operator.getitem or _packet(n) in _VIEW_OPS:
        return 0.0, 0.0
    info = lookup(_op_name(n))

    def meta(x):
        return _val_type(x.meta.get("val")) if isinstance(x, fx.Node) else x

    val = n.meta.get("val")
    outs = [_val_type(o) for o in (val if isinstance(val, (tuple, list)) else [val])]
    outs = [o for o in outs if isinstance(o, TensorType)]
    moved = sum(o.nbytes() for o in outs)
    flops = 0.0
    if info is not None:
        args, kwargs = fx.node.map_aggregate((n.args, n.kwargs), meta)
        try:
            if info.flops:
                flops = float(info.flops(args, kwargs, outs))
            if info.bytes is not None:
                moved = float(info.bytes(args, kwargs, outs))
            else:
                moved += sum(_nbytes(a.meta.get("val")) for a in n.all_input_nodes)
        except Exception:  # a rule that cannot read these arguments: count traffic only
            flops = 0.0
    else:
        moved += sum(_nbytes(a.meta.get("val")) for a in n.all_input_nodes)
    dtype = outs[0].dtype if outs else torch.float32
    if not dtype.is_floating_point:  # integer ops: memory-bound, no math mode to look up
        flops_t = 0.0
        dtype = torch.float32
    else:
        flops_t = flops
    return spec.compute_time(flops_t, moved, dtype), flops


def build_problem(joint: fx.GraphModule, num_fwd_outputs: int, spec) -> RematProblem:
    from torch._functorch.partitioners import classify_nodes

    info = classify_nodes(joint, [], num_fwd_outputs)
    backward = info.required_bw_nodes
    primals = {n for n in joint.graph.nodes if _is_primal(n)}
    # what each node's storage belongs to: a view's base (a parameter's views cost nothing)
    base: dict[fx.Node, fx.Node] = {}
    cands: dict[str, Candidate] = {}
    for n in joint.graph.nodes:
        if n.op != "call_function" or n in backward:
            continue
        val = n.meta.get("val")
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if (_packet(n) in _VIEW_OPS or n.target is operator.getitem and _packet(src) in
                _VIEW_OPS) and src is not None:
            base[n] = base.get(src, src)
        root = base.get(n, n)
        if root in primals:
            nbytes = 0.0
        elif root is not n:
            rv = root.meta.get("val")
            nbytes = max(_nbytes(rv), _nbytes(val)) if isinstance(rv, torch.Tensor) \
                else _nbytes(val)
        else:
            nbytes = _nbytes(val)
        seconds, flops = _cost(n, spec)
        sym = isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool))
        cands[n.name] = Candidate(
            name=n.name, nbytes=nbytes, cost=seconds, flops=flops,
            recompute=_recomputable(n),
            inputs=[a.name for a in n.all_input_nodes if a.name in cands],
            tensor=isinstance(val, torch.Tensor) or sym,
            sym=sym, source=_source(n))
    needed, free = [], []
    for n in joint.graph.nodes:
        if n in backward or n.op == "output":
            continue
        if any(u in backward for u in n.users):
            if n.name in cands:
                needed.append(n.name)
            elif n in primals:
                free.append(n.name)
    return RematProblem(cands, needed, free)


def _source(n: fx.Node) -> str:
    trace = n.meta.get("stack_trace") or ""
    lines = [s.strip() for s in trace.strip().splitlines() if s.strip().startswith("File")]
    return lines[-1] if lines else ""
