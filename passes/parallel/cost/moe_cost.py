"""The all-to-all of expert parallelism, priced for the cost model (cost_model.node_costs).

Under the `ep` strategy of `moe.experts` (strategies/moe_rules.py: tokens AND stacked expert
weights split on dim 0 over one or more mesh axes) every device sends each of its (token,
expert) pairs to the device owning that expert (dispatch) and gets the results back (combine),
as `moe.experts_ep` does at run time (one `all_to_all_single` each way over the group of the
ep axes). Per device and per direction the buffer is T_local * k * d * itemsize bytes, of
which the fraction (n-1)/n leaves the device; collectives.all_to_all prices exactly that:

    one exchange = (n-1) * alpha + (n-1)/n * T_local * k * d * itemsize / beta

over the group's link (the slowest link of the ep axes: inter-node as soon as one of them
leaves the node). Forward = dispatch + combine; a training step adds the same two again in
the backward (the gradients of the dispatched rows and of the combined outputs travel the
reverse way). The token counts exchanged first are k int64 per expert: latency only, counted
in alpha.

Expert compute needs no term here: on the node's local shapes the FLOP rule of moe.experts
(ir/ops/moe.py) counts T_local * k pairs on E/ep local experts, and T_local * k = k * T_global
/ ep on average: the uniform-routing assumption (every expert gets k * T / E pairs; skew makes
the busiest device slower, which no static cost model sees).

`exchange_time` returns the value to ADD to the node's forward time: cost_model's caller
(search/context.py) multiplies forward times by 3 in training (forward + a backward of twice
the FLOPs), while the exchange's backward costs as much as its forward, not twice; so in
training the forward exchange is scaled by 2/3, and x3 gives forward + backward exactly.
(With recomputation the caller multiplies by 4: the recomputed forward's exchange is then
counted as 2/3 of one instead of one, an underestimate of 1/3 of the forward exchange.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshweave.ir.ops.moe import MOE_EXPERTS
from meshweave.ir.types import TensorType
from .collectives import collective_time
from .hardware import LinkSpec
from ..strategies.moe_rules import EP_TAG

# time added to the forward per unit of (dispatch + combine): 1 in inference, 2/3 in training
TRAIN_SCALE = 2.0 / 3.0


def ep_axes_of(tags: Sequence[str], mesh_shape: Sequence[int]) -> list[int]:
    """Mesh axes (of size > 1) on which a moe.experts strategy is expert-parallel."""
    return [a for a, t in enumerate(tags) if t == EP_TAG and mesh_shape[a] > 1]


def group_link(axes: Sequence[int], links: Sequence[LinkSpec]) -> LinkSpec:
    """The link an exchange over `axes` runs at: the one of lowest all-to-all bandwidth."""
    return min((links[a] for a in axes), key=lambda lk: lk.bandwidth_for("all_to_all"))


def exchange_bytes(x_local: TensorType, ids_local: TensorType) -> float:
    """Per-device buffer of one dispatch (or combine): T_local * k rows of d elements."""
    t, d = x_local.shape
    k = ids_local.shape[1]
    return float(t * k * d * x_local.itemsize)


def forward_exchange(
    n_tags: Sequence[str], x_local, ids_local, mesh_shape: Sequence[int],
    links: Sequence[LinkSpec],
) -> tuple[float, int, float]:
    """(seconds of dispatch + combine in the forward, ep group size, bytes per exchange)."""
    axes = ep_axes_of(n_tags, mesh_shape)
    if not axes or not isinstance(x_local, TensorType) or not isinstance(ids_local, TensorType):
        return 0.0, 1, 0.0
    group = math.prod(mesh_shape[a] for a in axes)
    nbytes = exchange_bytes(x_local, ids_local)
    one = collective_time("all_to_all", nbytes, group, group_link(axes, links))
    return 2.0 * one, group, nbytes


def exchange_time(node, strategy, local_of, mesh_shape: Sequence[int],
                  links: Sequence[LinkSpec], training: bool) -> float:
    """Seconds to add to `node`'s forward time under `strategy` (0 unless it is a moe.experts
    node with the ep strategy on some axis); `local_of(value, placements)` gives a value's
    local type. See the module doc for the training scale."""
    if node.op != MOE_EXPERTS or EP_TAG not in strategy.tags:
        return 0.0
    x, ids = node.args[0], node.args[2]
    fwd, _, _ = forward_exchange(strategy.tags, local_of(x, strategy.ins[0]),
                                 local_of(ids, strategy.ins[2]), mesh_shape, links)
    return fwd * (TRAIN_SCALE if training else 1.0)


__all__ = ["TRAIN_SCALE", "ep_axes_of", "exchange_bytes", "exchange_time", "forward_exchange"]
