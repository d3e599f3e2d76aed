"""Expert-parallel dispatch and combine over one process group, with all_to_all_single.

    y = ep_moe(x, weights, ids, owner, experts, pg, act=..., layout=...)

`pg` is a torch.distributed ProcessGroup object (the elastic runtime builds raw gloo groups per
generation, so it calls the group's own `alltoall_base`, the single-tensor all-to-all that gloo
has). Per MoE layer and rank:

  1. every (token, slot) pair is sorted by the rank that owns its expert (stably, so pairs keep
     token order), and the per-rank pair counts are exchanged first, so each rank knows how many
     rows it receives;
  2. the token rows and their expert ids are exchanged;
  3. the rank runs its local experts on the received rows: `sort_by_expert` groups them by
     expert and `expert_mlp` (ir/ops/moe.py, the eager rule's own helpers) runs each expert;
  4. the results go back along the reverse splits, and the source rank combines them with the
     router weights (index_add over tokens), as the eager rule does.

Dropless: every pair is computed. `experts` maps expert id -> (w_in, w_gate | None, w_out), the
rank's own experts only; a row for an expert this rank does not hold means the placement and
the weights disagree, a DistributedError naming the expert.
"""

from __future__ import annotations

import datetime

import torch

from ....ir.ops.moe import expert_mlp, sort_by_expert
from ..errors import DistributedError


def all_to_all_single(pg, inp: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                      timeout_s: float) -> torch.Tensor:
    """Rows of `inp` split by send_counts to each rank; returns the rows received."""
    out = inp.new_empty((sum(recv_counts),) + tuple(inp.shape[1:]))
    work = pg.alltoall_base(out, inp.contiguous(), list(recv_counts), list(send_counts))
    work.wait(datetime.timedelta(seconds=timeout_s))
    return out


def ep_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, owner: torch.Tensor,
           experts: dict, pg, *, act: str = "silu", layout: str = "kn",
           timeout_s: float = 10.0) -> torch.Tensor:
    """Dropless expert-parallel moe.experts on this rank's tokens x [T, d] -> y [T, d]."""
    world = pg.size()
    num_experts = owner.numel()
    t, k = ids.shape
    flat = ids.reshape(-1)
    dest = owner[flat]
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = all_to_all_single(pg, send_counts, [1] * world, [1] * world, timeout_s)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    token = order // k
    rows = all_to_all_single(pg, x[token], send, recv, timeout_s)
    row_expert = all_to_all_single(pg, flat[order], send, recv, timeout_s)

    out = run_local_experts(rows, row_expert, experts, num_experts, act=act, layout=layout)
    back = all_to_all_single(pg, out, recv, send, timeout_s)
    w = weights.reshape(-1)[order].to(back.dtype)
    return torch.zeros_like(x).index_add(0, token, (back * w[:, None]).to(x.dtype))


def run_local_experts(rows: torch.Tensor, row_expert: torch.Tensor, experts: dict,
                      num_experts: int, *, act: str, layout: str) -> torch.Tensor:
    """Each received row through its expert; results in the rows' order."""
    order, counts, _ = sort_by_expert(row_expert[:, None], num_experts)
    h = rows[order]
    out = torch.empty_like(rows)
    w_in = {e: w[0] for e, w in experts.items()}
    w_gate = {e: w[1] for e, w in experts.items()}
    w_out = {e: w[2] for e, w in experts.items()}
    gated = all(g is not None for g in w_gate.values())
    start = 0
    for e, n in enumerate(counts.tolist()):
        if not n:
            continue
        if e not in experts:
            raise DistributedError(
                f"expert-parallel MoE: received {n} rows for expert {e}, which this rank does "
                f"not hold (it holds {sorted(experts)}); placement and weights disagree"
            )
        sel = order[start:start + n]
        out[sel] = expert_mlp(h[start:start + n], e, w_in, w_gate if gated else None, w_out,
                              act=act, layout=layout, fused_gate_up=False)
        start += n
    return out
