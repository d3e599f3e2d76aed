"""The expert-parallel MoE op of per-rank programs, `moe.experts_ep`.

passes/parallel/lower/ emits it for a `moe.experts` node planned with the ep strategy
(passes/parallel/strategies/moe_rules.py): this rank holds a slice of the tokens and E / ep
whole experts. Keyword arguments (the contract with the distributed runtime, as the dist.* ops
of collectives.py):

  moe.experts_ep(x[T_l, d], weights[T_l, k], ids: i64[T_l, k], w_in, w_gate | None, w_out, *,
                 axis=, group=, num_experts=, act=, layout=, fused_gate_up=,
                 capacity_factor=) -> (y[T_l, d], dropped: i64[])

  axis         the mesh axis name the experts are split over ("dp,ep": several axes, the
               experts split over their flattened sub-mesh, the first axis outermost)
  group        the global ranks of this rank's group over it, in mesh-coordinate order
               (ascending ranks): group[i] holds global experts [i * E_l, (i + 1) * E_l),
               E_l = w_in.shape[0]
  num_experts  E, the global expert count (ids index it): E == E_l * len(group)
  act, layout, fused_gate_up, capacity_factor   as moe.experts (ir/ops/moe.py); the weights
               are this rank's E_l experts (split on f too under expert slicing: y is then a
               partial sum, as moe.experts' is)

Semantics: y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for this rank's tokens, with
the experts wherever they live; `dropped` counts this rank's pairs over capacity. Capacity
(with `capacity_factor`) is applied to this rank's tokens before they leave it, per global
expert, with T_l tokens (DeepSpeed's per-rank rule); dropless by default. The eager rule is
meshweave.runtime.distributed.moe_exchange.experts_ep (imported lazily: nothing here needs
torch.distributed unless a program runs): token counts are exchanged first, then the token
rows with all_to_all_single, the local experts run on their rows sorted by expert, and the
results travel back for the weighted combine. It is differentiable (the exchanges' backward is
the reverse exchange).
"""

from __future__ import annotations

import torch

from ..registry import register_op
from ..types import TensorType
from .moe import _bytes as _moe_bytes
from .moe import _flops as _moe_flops
from .moe import check_args

MOE_EXPERTS_EP = "moe.experts_ep"


def moe_experts_ep(x, weights, ids, w_in, w_gate, w_out, *, axis=None, group, num_experts,
                   act="silu", layout="kn", fused_gate_up=False, capacity_factor=None):
    from meshweave.runtime.distributed.moe_exchange import experts_ep

    return experts_ep(x, weights, ids, w_in, w_gate, w_out, group=group,
                      num_experts=num_experts, act=act, layout=layout,
                      fused_gate_up=fused_gate_up, capacity_factor=capacity_factor)


def check_ep_args(w_in, group, num_experts) -> None:
    """The local expert count times the group size must be the global count."""
    local = w_in.shape[0]
    if local * len(group) != num_experts:
        raise ValueError(
            f"moe.experts_ep: {local} local experts x {len(group)} ranks in group "
            f"{list(group)} != num_experts={num_experts}"
        )


def _shape(x, weights, ids, w_in, w_gate, w_out, *, axis=None, group, num_experts, act="silu",
           layout="kn", fused_gate_up=False, capacity_factor=None):
    check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up)
    check_ep_args(w_in, group, num_experts)
    return [x, TensorType((), torch.int64, x.device)]


def _flops(args, kwargs, outs):
    """The local experts' work on this rank's own pairs (balanced routing: as many pairs
    arrive as leave)."""
    return _moe_flops(args, kwargs, outs)


def _bytes(args, kwargs, outs):
    """moe.experts' bytes plus the rows sent and received twice (dispatch and combine)."""
    x, ids = args[0], args[2]
    rows = ids.shape[0] * ids.shape[1] * x.shape[1] * x.itemsize
    return _moe_bytes(args, kwargs, outs) + 4 * rows


register_op(MOE_EXPERTS_EP, moe_experts_ep, shape=_shape, flops=_flops, bytes=_bytes,
            category="matmul",
            doc="expert-parallel moe.experts: all_to_all dispatch, local experts, combine")
