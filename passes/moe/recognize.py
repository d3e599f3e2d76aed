"""The MoE recognition pass: each recognised block's dispatch, experts and combine become one
`moe.experts` node; the router stays as ordinary ops and feeds it its top-k scores and ids.

For every router (router.py), the candidates for the combine output are tried in program
order (region.py); the first whose region is closed and computes what some `moe.experts` call
computes (patterns.py, validate.py) is replaced. A block that is not recognised, or whose
region fails validation, stays dense and correct; its reason goes into graph.meta["moe"]
(report.py), which cm.explain() prints.

Training: compile(training=True) rewrites its inference graph (cm.graph) only. In the joint
forward and backward graphs (frontend/joint.py) the parameters are user inputs that carry
gradients, so there are no stacked expert weights to find and both graphs pass unchanged; were
one found, the forward's values saved for the backward would leave the region open, and it
would stay dense.
"""

from __future__ import annotations

import torch

from meshweave.ir.graph import Graph, NameGen, Node, Value
from meshweave.ir.ops.moe import MOE_EXPERTS
from meshweave.ir.types import TensorType
from ..dce import dce
from .graph_walk import Inputs, ancestors, users_of
from .patterns import ExpertsCall, candidate_calls
from .region import NoMatch, Region, Scope, combine_candidates, expert_params, match_region
from .report import MoEBlockReport, MoESummary
from .router import Router, find_routers
from .shared import find_shared_expert
from .validate import MAX_VALIDATION_FLOPS, ValidationFailed, validate_cached


def recognize_moe(graph: Graph, *, max_validation_flops: float = MAX_VALIDATION_FLOPS) -> Graph:
    """The pass (pure: works on a copy). Graphs without an MoE router come back unchanged."""
    if not _moe_routers(graph):
        return graph.copy()
    g = dce(graph)  # dead nodes (metadata asserts) would otherwise read region values
    routers = _moe_routers(g)
    names = NameGen(g)
    reports = []
    cache: dict = {}  # region program -> its validation: a model's layers validate once
    ins = Inputs()
    for router in routers:
        found, reason = _match_block(Scope(g, router, ins), max_validation_flops, cache)
        if found is None:
            reports.append(_report(router, reason=reason))
            continue
        region, call, scale = found
        node = _rewrite(g, region, call, names)
        shared = find_shared_expert(region.y, region.x, users_of(_after(g, node), ins))
        reports.append(_report(
            router, node=node.outputs[0].name, experts=call.describe()
            + (f"; validated at 1/{scale.factor} width" if scale.factor > 1 else ""),
            weights=tuple(w.target or w.name for w in (call.w_in, call.w_gate, call.w_out)
                          if w is not None),
            shared_expert=shared.describe() if shared else None))
    g.meta["moe"] = MoESummary(reports)
    return g


def _moe_routers(g: Graph) -> list[Router]:
    """Routers with stacked expert weights [E, ., .] in the graph: a top-k over a classifier's
    scores (no such weights) is not an MoE block and is not reported."""
    return [r for r in find_routers(g) if expert_params(g, r.num_experts)]


def _after(g: Graph, node: Node) -> list[Node]:
    return g.nodes[g.nodes.index(node):]


def _match_block(sc: Scope, max_flops: float, cache: dict):
    """((region, call, scale), None) for the first candidate that validates, else
    (None, reason)."""
    g, router = sc.graph, sc.router
    experts = expert_params(g, router.num_experts)
    # expert weights read before the router (an earlier layer's) are not this block's
    before = ancestors([router.topk.args[0]], sc.ins)
    experts = {p for p in experts if not any(u in before for u in sc.users.get(p, ()))}
    reasons = []
    for y, params in combine_candidates(sc, experts):
        try:
            region = match_region(sc, y, params)
            calls = candidate_calls(region.x, region.params, region.nodes)
            call, scale = validate_cached(region, calls, g.tensors, max_flops, cache)
        except (NoMatch, ValidationFailed) as e:
            reasons.append(f"at %{y.name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            # A matcher bug on an unforeseen graph must not fail the compile of a model that
            # runs fine dense: the block stays dense and explain() shows the error.
            reasons.append(f"at %{y.name}: the matcher raised {type(e).__name__}: {e} (a bug "
                           f"in passes/moe/: please report it with this model)")
            continue
        return (region, call, scale), None
    if not reasons:
        return None, (f"nothing after the top-k combines the routing with expert weights "
                      f"[{router.num_experts}, ., .] into a [T, d] value")
    return None, reasons[0]


def _rewrite(g: Graph, region: Region, call: ExpertsCall, names: NameGen) -> Node:
    y = region.y
    old = y.producer
    node = Node(MOE_EXPERTS,
                (region.x, region.weights, region.ids, call.w_in, call.w_gate, call.w_out),
                call.kwargs(), (), old.source, {}, True)
    dropped = Value(names(f"{y.name}_dropped"), TensorType((), torch.int64, region.x.type.device),
                    node)
    y.producer = node
    node.outputs = (y, dropped)
    members = set(region.nodes) - set(region.kept)  # routing values read outside stay
    g.nodes = [node if n is old else n for n in g.nodes if n is old or n not in members]
    return node


def _report(router: Router, **fields) -> MoEBlockReport:
    return MoEBlockReport(router.describe(), router.topk.source, router.num_experts,
                          router.top_k, **fields)
