"""Expert-parallel MoE on one rank: the eager rule of `moe.experts_ep` (ir/ops/moe_ep.py).

    experts_ep(x, weights, ids, w_in, w_gate, w_out, group=, num_experts=, ...) -> (y, dropped)

The rank holds T_l tokens and the E_l = E / len(group) experts [i * E_l, (i + 1) * E_l) of its
position i in `group`. One call:

  1. routes its (token, slot) pairs: sorted by global expert, stably (ir/ops/moe.py's
     sort_by_expert; with `capacity_factor`, each expert keeps ceil(c * T_l * k / E) of this
     rank's pairs, the rest are dropped here and counted), so the pairs for each destination
     rank are one contiguous block, ordered by expert inside it;
  2. exchanges the per-expert pair counts FIRST (an all_to_all_single of E int64 counts):
     each rank learns how many rows every source sends to each of its local experts;
  3. sends the token rows with all_to_all_single and those split sizes (gloo has only the
     single-tensor form); the rows arrive source by source, by local expert inside each;
  4. regroups them by local expert and runs each local expert once on its rows
     (expert_mlp; dropless: every row that arrived is computed);
  5. sends the results back the way they came (the reverse split sizes);
  6. combines: y[t] += weights[t, j] * row, in this rank's pair order.

Only token rows travel: each side derives the expert of every row from the counts. The row
exchanges are `all_to_all_rows`, a torch.autograd.Function whose backward is the reverse
exchange of the gradient (its exact adjoint), so training differentiates through dispatch and
combine; the count exchange carries integers and needs none. Every local expert runs, on zero
rows if none arrived, so its weights always get a (zero) gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from meshweave.ir.ops.moe import capacity, expert_mlp, sort_by_expert
from .errors import DistributedError
from .groups import get_group


def _ranks(group: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(r) for r in group)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], ranks) -> torch.Tensor:
    """Rows [sum(send), ...] out, rows [sum(recv), ...] in: send[i] rows to ranks[i]."""
    if len(send) != len(ranks) or len(recv) != len(ranks) or sum(send) != x.shape[0]:
        raise DistributedError(
            f"all_to_all_rows: split sizes send {send} / recv {recv} for {x.shape[0]} rows "
            f"over ranks {list(ranks)}"
        )
    if len(ranks) == 1:
        return x.detach().clone()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.detach().contiguous(), output_split_sizes=list(recv),
                           input_split_sizes=list(send), group=get_group(list(ranks)))
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, ranks):
        ctx.splits = (send, recv, ranks)
        return _exchange(x, send, recv, ranks)

    @staticmethod
    def backward(ctx, g):
        send, recv, ranks = ctx.splits
        return _exchange(g.contiguous(), recv, send, ranks), None, None, None


def all_to_all_rows(x: torch.Tensor, send: Sequence[int], recv: Sequence[int],
                    group: Sequence[int]) -> torch.Tensor:
    """Variable-split all-to-all of the rows of `x` over `group` (global ranks in group
    order): the first send[0] rows go to group[0], the next send[1] to group[1], ...; the
    result holds recv[i] rows from group[i], in group order. Differentiable: the backward
    exchanges the gradient with the split sizes swapped."""
    return _AllToAllRows.apply(x, [int(s) for s in send], [int(r) for r in recv], _ranks(group))


def exchange_counts(counts: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """counts [len(group) * m] (m per destination, in group order) -> [len(group) * m]: the m
    counts every rank of the group addressed to this rank, source by source."""
    ranks = _ranks(group)
    if len(ranks) == 1:
        return counts.clone()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=get_group(list(ranks)))
    return out


def experts_ep(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_in: torch.Tensor,
               w_gate: torch.Tensor | None, w_out: torch.Tensor, *, group: Sequence[int],
               num_experts: int, act: str = "silu", layout: str = "kn",
               fused_gate_up: bool = False, capacity_factor: float | None = None):
    """This rank's (y, dropped) of an expert-parallel moe.experts (the module docstring)."""
    n, e_local = len(group), w_in.shape[0]
    if e_local * n != num_experts:
        raise DistributedError(
            f"moe.experts_ep: {e_local} local experts x {n} ranks of group {list(group)} != "
            f"num_experts={num_experts}"
        )
    t, k = ids.shape
    cap = capacity(t, k, num_experts, capacity_factor)
    order, counts, kept = sort_by_expert(ids, num_experts, cap)
    order = order[kept]
    token = order // k
    recv_counts = exchange_counts(counts, group)  # [source, local expert], flattened
    send = counts.view(n, e_local).sum(1).tolist()
    recv_matrix = recv_counts.view(n, e_local)
    recv = recv_matrix.sum(1).tolist()
    rows = all_to_all_rows(x[token], send, recv, group)
    local = torch.arange(e_local, device=ids.device).repeat(n)
    by_expert = torch.argsort(torch.repeat_interleave(local, recv_counts), stable=True)
    h = rows[by_expert]
    outs, start = [], 0
    for e, m in enumerate(recv_matrix.sum(0).tolist()):
        outs.append(expert_mlp(h[start:start + m], e, w_in, w_gate, w_out, act=act,
                               layout=layout, fused_gate_up=fused_gate_up))
        start += m
    done = torch.cat(outs)[torch.argsort(by_expert)]  # back in arrival order
    back = all_to_all_rows(done, recv, send, group)
    w = weights.reshape(-1)[order].to(back.dtype)
    y = torch.zeros_like(x).index_add(0, token, (back * w[:, None]).to(x.dtype))
    dropped = torch.tensor(t * k - order.numel(), dtype=torch.int64, device=x.device)
    return y, dropped
