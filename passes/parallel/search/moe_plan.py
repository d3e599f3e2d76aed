"""What a plan does with the MoE layers: its expert-parallel degree and its all-to-alls.

`ep_info` reads, from a strategy assignment, on which mesh axes `moe.experts` runs the ep
strategy (tokens and experts split on dim 0: an axis named "ep", or EP over a whole "dp"
axis), the resulting ep degree, the experts each device holds and the per-device bytes of one
dispatch; plan_build.py stores it as `plan.search["ep"]` (in the JSON) and Plan.summary()
prints it (plan.py's `ep_line`). `ep_records` lists the dispatch and combine exchanges as
`all_to_all` collective records, with how often they run per step (cost/moe_cost.py prices
them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meshweave.ir.graph import Node
from meshweave.ir.ops.moe import MOE_EXPERTS
from ..cost.moe_cost import ep_axes_of, forward_exchange
from ..plan import CollectiveRecord
from .context import GraphContext, Key
from ..strategies.moe_rules import num_experts


def _moe_nodes(ctx: GraphContext, assign: Mapping[Key, Any]) -> list[Node]:
    return [n for n in ctx.nodes if n.op == MOE_EXPERTS and n in assign]


def _exchange(model, n: Node, s) -> tuple[float, int, float]:
    x, ids = n.args[0], n.args[2]
    return forward_exchange(s.tags, model._local_of(x, s.ins[0]), model._local_of(ids, s.ins[2]),
                            model.mesh.shape, model.comm.links)


def ep_info(ctx: GraphContext, model, assign: Mapping[Key, Any]) -> dict[str, Any] | None:
    """The plan's expert parallelism (None for a graph without moe.experts): degree 1 means
    the experts are replicated (or only sliced by tp) and no all-to-all runs."""
    nodes = _moe_nodes(ctx, assign)
    if not nodes:
        return None
    n = nodes[0]
    s = assign[n]
    axes = ep_axes_of(s.tags, model.mesh.shape)
    degree = math.prod(model.mesh.shape[a] for a in axes)
    experts = num_experts(n, ctx.types)
    fwd, _, nbytes = _exchange(model, n, s)
    count = sum(ctx.layers.repeats if ctx.segment.get(m) == "rep" else 1 for m in nodes)
    return {
        "degree": degree,
        "axes": [model.mesh.names[a] for a in axes],
        "experts": experts,
        "experts_per_device": experts // degree if degree else experts,
        "moe_layers": count,
        "exchange_bytes": int(nbytes),  # per device, one dispatch (or combine), one layer
        # dispatch + combine of one layer and micro-batch, forward (+ backward in training)
        "all_to_all_seconds": fwd * (2.0 if model.training else 1.0),
        "routing": "uniform",  # the estimate assumes k * T / E pairs per expert
    }


def ep_records(
    ctx: GraphContext, model, assign: Mapping[Key, Any], b: int, counts: Mapping[str, int]
) -> list[CollectiveRecord]:
    """One all_to_all record per moe.experts node under ep (dispatch + combine, forward and
    in training backward: 2 or 4 exchanges per micro-batch) in the segments of `counts`."""
    out = []
    for n in _moe_nodes(ctx, assign):
        per_layer = counts.get(ctx.segment.get(n), 0)
        s = assign[n]
        axes = ep_axes_of(s.tags, model.mesh.shape)
        if not per_layer or not axes:
            continue
        _, _, nbytes = _exchange(model, n, s)
        per_mb = 4 if model.training else 2
        out.append(CollectiveRecord("all_to_all", n.outputs[0].name,
                                    ",".join(model.mesh.names[a] for a in axes), int(nbytes),
                                    per_mb * b * per_layer))
    return out


__all__ = ["ep_info", "ep_records"]
