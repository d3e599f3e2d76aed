"""The rematerialization problem, read off AOTAutograd's joint forward+backward graph.

    problem = build_problem(joint_module, num_fwd_outputs, spec)

Every node the forward output needs is a candidate (nodes neither the forward's outputs need
nor a tangent reaches run in the backward, as torch's default partition places them). The
backward reads some of them directly (`needed`): each of those is either saved or recomputed,
and a recomputed node needs each of its forward inputs saved or recomputed in turn. Parameters
and the call's inputs are alive anyway: reading them costs nothing. Per candidate:

  nbytes     bytes kept if saved (a view of a parameter or input, or a forward output: 0).
             A view of an activation names in `base` the candidate owning its storage: saving
             the view would keep that whole storage, so the base is saved instead and the view
             recomputed from it (for free), as torch's min-cut partitioner does; the bytes
             count once at the base
  cost       seconds to recompute it, from the registry's FLOP and byte rules and the
             hardware spec's roofline (meshweave's cost model)
  flops      FLOPs to recompute it (what the benchmark reports)
  recompute  False for random ops (recomputing would draw new numbers; a fused attention with
             dropout_p 0 draws nothing and may be recomputed), mutations, collectives and
             nodes torch tags must-be-in-forward: those are saved or not needed at all
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
# a rank's traced collectives (runtime/distributed/rank_joint.py)
_MESHWEAVE_COLLECTIVES = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}


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
    base: str | None = None  # the candidate owning this view's storage (its bytes count there)


@dataclasses.dataclass
class RematProblem:
    candidates: dict[str, Candidate]  # in the joint graph's order
    needed: list[str]  # candidates the backward reads directly
    free: list[str]  # parameters and call inputs the backward may read

    @property
    def full_bytes(self) -> float:
        """What saving everything the backward reads keeps: the budget's 100%."""
        return self.storage_bytes(self.needed)

    def storage_bytes(self, saved) -> float:
        """Bytes kept by saving `saved`: each storage once (a view's counts at its base)."""
        c = self.candidates
        return sum(c[n].nbytes for n in {c[v].base or v for v in saved})


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
        if t._schema.is_mutable:
            return False
        if torch.Tag.nondeterministic_seeded in t.tags and not _no_dropout(n):
            return False
        if t.namespace in _COLLECTIVE_NAMESPACES or (
                t.namespace == "meshweave" and _packet(n) in _MESHWEAVE_COLLECTIVES):
            return False
        return True
    return t is operator.getitem


def _no_dropout(n: fx.Node) -> bool:
    """A seeded op that draws nothing: its `dropout_p` argument is 0 (fused attention in
    eval, or a model without attention dropout), so a recomputation is exact."""
    for i, arg in enumerate(n.target._schema.arguments):
        if arg.name == "dropout_p":
            if arg.name in n.kwargs:
                p = n.kwargs[arg.name]
            elif i < len(n.args):
                p = n.args[i]
            else:
                p = arg.default_value
            return isinstance(p, (int, float)) and p == 0
    return False


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
    # Nodes no forward output needs and no tangent reaches (`t` of a weight, the pow of a
    # norm's rsqrt that its gradient formula reads) run in the backward, as torch's default
    # partition places them: computing them there is not a recomputation, and saving them
    # instead would count bytes the budget's 100% should not hold. Random or mutating ones
    # stay forward candidates, and so do getitems (a tuple cannot be saved: its items are).
    backward = set(info.required_bw_nodes) | {
        n for n in info.unclaimed_nodes if n.op == "call_function" and _recomputable(n)
        and n.target is not operator.getitem}
    primals = {n for n in joint.graph.nodes if _is_primal(n)}
    # the forward's own outputs exist after it whatever is saved: keeping one costs nothing
    out = next(n for n in joint.graph.nodes if n.op == "output")
    outputs = {a for a in fx.node.map_arg(out.args[0], lambda a: a)[:num_fwd_outputs]
               if isinstance(a, fx.Node)}
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
        owner = None
        if root in primals:
            nbytes = 0.0
        elif root is not n and root.name in cands and cands[root.name].tensor:
            nbytes, owner = 0.0, root.name
            cands[root.name].nbytes = max(cands[root.name].nbytes, _nbytes(val))
        else:
            nbytes = _nbytes(val)
        seconds, flops = _cost(n, spec)
        sym = isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool))
        cands[n.name] = Candidate(
            name=n.name, nbytes=nbytes, cost=seconds, flops=flops,
            recompute=_recomputable(n),
            inputs=[a.name for a in n.all_input_nodes if a.name in cands],
            tensor=isinstance(val, torch.Tensor) or sym,
            sym=sym, source=_source(n), base=owner)
    for o in outputs:  # an output's storage (or its view's base) is held by the caller
        r = base.get(o, o)
        if r.name in cands:
            cands[r.name].nbytes = 0.0
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
