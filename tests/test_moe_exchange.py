"""The variable-split row exchange and moe.experts_ep on real gloo ranks (CPU, 2 ranks).

  * moe_exchange.all_to_all_rows forward and backward, against where every row should land
    and where its gradient comes from (with empty splits);
  * moe.experts_ep on 2 ranks (half the tokens, half the experts each) against moe.experts on
    one process: outputs and every gradient, with skewed routing (one expert is every token's
    first choice) and a capacity factor (applied per rank's tokens, drops counted).

The whole-model runs (meshweave run --mesh ep=...) are in test_moe_parallel.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from meshweave.ir.ops.moe import moe_experts
from meshweave.runtime.distributed.launch import launch

os.environ.setdefault("OMP_NUM_THREADS", "1")
TOL = 1e-5


def _init(world_size: int) -> None:
    from meshweave.runtime.distributed.groups import init_groups

    init_groups(world_size, [list(range(world_size))])


# ------------------------------------------------------------------ the row exchange
def _exchange_rank(rank, world_size, sends):
    from meshweave.runtime.distributed.moe_exchange import all_to_all_rows, exchange_counts

    _init(world_size)
    send = sends[rank]
    counts = exchange_counts(torch.tensor(send, dtype=torch.int64), range(world_size))
    recv = counts.tolist()
    x = (torch.arange(sum(send) * 3, dtype=torch.float32).reshape(-1, 3) + 100 * rank)
    x.requires_grad_(True)
    y = all_to_all_rows(x, send, recv, range(world_size))
    scale = torch.arange(1, y.shape[0] + 1, dtype=torch.float32)[:, None] * (rank + 1)
    (y * scale).sum().backward()
    return recv, y.detach(), x.grad


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sends", [[[2, 3], [1, 0]], [[0, 0], [4, 1]]], ids=["mixed", "empty"])
def test_row_exchange_forward_and_backward(sends):
    """Rank r sends send[r][i] rows to rank i; counts go first; the gradient of each sent row
    is the weight its receiver gave it."""
    got = launch(_exchange_rank, 2, (sends,), timeout_s=40)
    xs = [torch.arange(sum(s) * 3, dtype=torch.float32).reshape(-1, 3) + 100 * r
          for r, s in enumerate(sends)]
    for dst in range(2):
        recv, y, _ = got[dst]
        assert recv == [sends[src][dst] for src in range(2)]
        want = torch.cat([xs[src][sum(sends[src][:dst]):sum(sends[src][:dst + 1])]
                          for src in range(2)])
        assert torch.equal(y, want)
    for src in range(2):
        grad = got[src][2]
        for dst in range(2):
            lo = sum(sends[src][:dst])
            n = sends[src][dst]
            before = sum(sends[s][dst] for s in range(src))  # rows of earlier sources
            scale = torch.arange(before + 1, before + n + 1, dtype=torch.float32) * (dst + 1)
            assert torch.equal(grad[lo:lo + n], scale[:, None].expand(n, 3))


# ------------------------------------------------------------------ moe.experts_ep vs one process
E, D, F, T, K = 4, 6, 8, 10, 2


def _moe_inputs(skew: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew:  # every token's first choice is expert 3, which lives on rank 1
        logits[:, 3] += 100.0
    probs, ids = logits.softmax(-1).topk(K, -1)
    w_in, w_gate = torch.randn(E, D, F, generator=g), torch.randn(E, D, F, generator=g)
    w_out = torch.randn(E, F, D, generator=g)
    return x, probs, ids, w_in, w_gate, w_out


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    y, dropped = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    (y * torch.randn(y.shape, generator=g)[: y.shape[0]]).sum().backward()
    return y.detach(), dropped, [t.grad for t in leaves]


def _ep_rank(rank, world_size, skew, cap):
    from meshweave.runtime.distributed.moe_exchange import experts_ep

    _init(world_size)
    x, probs, ids, w_in, w_gate, w_out = _moe_inputs(skew)
    tok = slice(rank * T // 2, (rank + 1) * T // 2)
    ex = slice(rank * E // 2, (rank + 1) * E // 2)
    mine = [x[tok], probs[tok], ids[tok], w_in[ex], w_gate[ex], w_out[ex]]

    def run(x, p, i, a, b, c):
        return experts_ep(x, p, i, a, b, c, group=[0, 1], num_experts=E, capacity_factor=cap)

    return _grads(run, mine)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("skew,cap", [(False, None), (True, None), (True, 1.0)],
                         ids=["balanced", "skewed-dropless", "skewed-capacity"])
def test_experts_ep_matches_one_process(skew, cap):
    """Two ranks, each half the tokens and half the experts, compute moe.experts' outputs
    and every gradient. With a capacity factor, capacity is per rank's own tokens: the
    reference applies it to each half."""
    got = launch(_ep_rank, 2, (skew, cap), timeout_s=40)
    x, probs, ids, w_in, w_gate, w_out = _moe_inputs(skew)
    ys, dropped, gx, gw = [], 0, [], [torch.zeros_like(w) for w in (w_in, w_gate, w_out)]
    for r in range(2):
        tok = slice(r * T // 2, (r + 1) * T // 2)
        # the reference's loss weights are drawn for the half's rows, as each rank's are
        y, d, grads = _grads(lambda *a: moe_experts(*a, capacity_factor=cap),
                             [x[tok], probs[tok], ids[tok], w_in, w_gate, w_out])
        ys.append(y)
        dropped += int(d)
        gx.append(grads[:2])
        for acc, gr in zip(gw, grads[3:]):
            acc += gr
    for r in range(2):
        y, d, grads = got[r]
        assert torch.allclose(y, ys[r], atol=TOL), f"rank {r} y: {(y - ys[r]).abs().max()}"
        assert torch.allclose(grads[0], gx[r][0], atol=TOL) and torch.allclose(
            grads[1], gx[r][1], atol=TOL)
        ex = slice(r * E // 2, (r + 1) * E // 2)
        for name, g, want in zip(("w_in", "w_gate", "w_out"), grads[3:], gw):
            assert g is not None, f"rank {r}: {name} got no gradient"
            assert torch.allclose(g, want[ex], atol=1e-4), f"rank {r} {name}"
    assert sum(int(got[r][1]) for r in range(2)) == dropped
    if cap is not None:
        assert dropped > 0  # expert 3 overflowed: the counter says so
    else:
        assert dropped == 0
