"""moe.experts on the grouped GEMM (grouped_gemm.py), and its rule table MOE_KERNELS.

    sort (token, expert) pairs by expert, stably (the order of ir/ops/moe.py sort_by_expert)
    h     = act(gate(x)) * up(x)     one grouped launch, x gathered by pair, gate fused
    y_p   = w_pair * down(h)         one grouped launch, the routing weight in its epilogue,
                                     each row stored at its pair's (token, slot) position
    y     = y_p.view(T, k, d).sum(1) fp32, in slot order, then x's dtype

Both launches share one tile table. Nothing here waits for the device: the pair count is
T*k whatever the routing, the grid an upper bound (grouped_gemm.tile_table), and the counts a
scatter_add (ir/ops/moe.py expert_counts, shared with sort_by_expert).
So the block can be captured in a CUDA graph. With a capacity factor every expert's segment
keeps its first `cap` pairs in token order (the GShard rule, as in sort_by_expert): only those
rows are computed, and the dropped pairs' rows stay zero. The results are those of
ir/ops/moe.py's eager rule, (y [T, d] in x's dtype, dropped i64[]), up to rounding: here
gate/up, down and the combine accumulate in fp32.

The combine is a sum over each token's k rows in slot order, not a scatter-add: the same
bits on every run and device (index_add_ and in-kernel atomics on CUDA add in whatever order
the threads arrive), and no atomics. The second launch's scattered store puts the rows there.
"""

from __future__ import annotations

import dataclasses

import torch

from meshweave.ir.graph import Node, Value
from meshweave.ir.ops.moe import capacity, check_args, expert_counts
from meshweave.ir.registry import RuleTable

from .grouped_gemm import DTYPES, GroupedGemmError, GroupedTile, choose_tile, grouped_gemm, \
    tile_table

MOE_KERNELS = RuleTable("triton_moe_experts")


def _check_dtypes(x, weights, ids, w_in, w_gate, w_out) -> None:
    where = "moe_experts (grouped GEMM)"
    mats = {"w_in": w_in, "w_gate": w_gate, "w_out": w_out}
    bad = {k: v.dtype for k, v in mats.items() if v is not None and v.dtype != x.dtype}
    if x.dtype not in DTYPES or bad:
        raise GroupedGemmError(f"{where}: x is {x.dtype}, {bad or 'weights match'}; expected "
                               f"x and the expert weights in one dtype among {DTYPES}")
    if ids.dtype not in (torch.int64, torch.int32) or not weights.dtype.is_floating_point:
        raise GroupedGemmError(f"{where}: ids {ids.dtype}, weights {weights.dtype}; expected "
                               f"integer ids and floating routing weights")
    if not ids.is_cuda and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w_in.shape[0]):
        raise GroupedGemmError(f"{where}: ids hold experts {int(ids.min())}..{int(ids.max())}; "
                               f"expected 0..{w_in.shape[0] - 1} (w_in has E={w_in.shape[0]})")


def sort_pairs(ids: torch.Tensor, num_experts: int, cap: int | None):
    """(order, segment, kept): the flattened (token, slot) pairs sorted by expert, stably;
    segment[e] pairs routed to expert e (its rows in `order`), kept[e] <= segment[e] the ones
    it computes under capacity `cap`. The order and kept counts are sort_by_expert's."""
    order = torch.argsort(ids.reshape(-1).to(torch.int64), stable=True)
    segment = expert_counts(ids, num_experts)
    return order, segment, segment if cap is None else segment.clamp(max=cap)


def moe_experts_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        w_in: torch.Tensor, w_gate: torch.Tensor | None, w_out: torch.Tensor, *,
                        act: str = "silu", layout: str = "kn", fused_gate_up: bool = False,
                        capacity_factor: float | None = None, kernel=None,
                        interpret: bool | None = None, allow_tf32: bool = False,
                        tile: GroupedTile | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.experts (ir/ops/moe.py) as two grouped-GEMM launches and a sum over slots."""
    check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up)
    _check_dtypes(x, weights, ids, w_in, w_gate, w_out)
    t, k = ids.shape
    e, pairs = w_in.shape[0], ids.numel()
    cap = capacity(t, k, e, capacity_factor)
    order, segment, kept = sort_pairs(ids, e, cap)
    dropped = pairs - kept.sum()
    if pairs == 0:
        return torch.zeros_like(x), dropped
    token = order // k
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(segment, 0)
    pair_weight = weights.reshape(-1)[order].to(torch.float32)
    if interpret is None:
        from ..mode import ensure_triton_mode

        interpret = ensure_triton_mode(x.is_cuda)
    d = x.shape[1]
    f = w_out.shape[1] if layout == "kn" else w_out.shape[2]
    gated = fused_gate_up or w_gate is not None
    # one tile table for both launches: BLOCK_M depends on the rows per expert alone
    up = tile or choose_tile(pairs, e, f, d, interpret, x.element_size(), gated)
    down = tile or dataclasses.replace(choose_tile(pairs, e, d, f, interpret, x.element_size()),
                                       block_m=up.block_m)
    counts = kept if cap is not None else None  # None: every row of each segment
    common = dict(counts=counts, layout=layout, kernel=kernel, interpret=interpret,
                  allow_tf32=allow_tf32, tiles=tile_table(offsets, up.block_m, pairs, counts))
    h = grouped_gemm(x, w_in, offsets, rows=token.to(torch.int32), w_gate=w_gate,
                     fused_gate_up=fused_gate_up, act=act, tile=up, **common)
    y_pairs = grouped_gemm(h, w_out, offsets, scale=pair_weight, out_dtype=torch.float32,
                           out_rows=order, tile=down, **common)  # in (token, slot) order
    return y_pairs.view(t, k, -1).sum(1).to(x.dtype), dropped


@dataclasses.dataclass(frozen=True)
class MoeExpertsRule:
    """moe.experts(x, weights, ids, w_in, w_gate, w_out, act=, layout=, fused_gate_up=,
    capacity_factor=) as moe_experts_grouped."""

    def operands(self, node: Node) -> tuple[Value | None, ...]:
        return tuple((tuple(node.args) + (None,) * 6)[:6])

    def attrs(self, node: Node) -> dict:
        kw = node.kwargs
        return {"act": kw.get("act", "silu"), "layout": kw.get("layout", "kn"),
                "fused_gate_up": kw.get("fused_gate_up", False),
                "capacity_factor": kw.get("capacity_factor")}

    def supports(self, node: Node) -> str | None:
        x, _, _, w_in, w_gate, w_out = self.operands(node)
        mats = [v for v in (w_in, w_gate, w_out) if v is not None]
        dtypes = {v.tensor_type.dtype for v in [x, *mats]}
        if len(dtypes) != 1 or x.tensor_type.dtype not in DTYPES:
            return (f"moe.experts with x/expert weights in {sorted(map(str, dtypes))}: the "
                    f"grouped GEMM takes one dtype among {DTYPES}")
        return None


MOE_KERNELS.register("moe.experts")(MoeExpertsRule())
