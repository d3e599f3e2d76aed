"""The mixture-of-experts op, `moe.experts`: dispatch, the expert MLPs and the combine in one node.

    moe.experts(x[T, d], weights[T, k], ids: i64[T, k], w_in, w_gate | None, w_out, *,
                act="silu", layout="kn", fused_gate_up=False, capacity_factor=None)
        -> (y[T, d], dropped: i64[])

Token t goes to experts ids[t, 0..k-1]; y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]),
in x's dtype. An expert is a gated MLP, down(act(gate(x)) * up(x)), when it has a gate (w_gate,
or w_in holding [gate; up] with `fused_gate_up`), else down(act(up(x))). `layout` says how the
stacked expert weights are stored:

  "kn"  x @ w:           w_in/w_gate [E, d, f] ([E, d, 2f] fused), w_out [E, f, d]
  "nk"  F.linear(x, w):  w_in/w_gate [E, f, d] ([E, 2f, d] fused), w_out [E, d, f]

Routing is dropless by default: every (token, expert) pair is computed, however skewed the
routing. With `capacity_factor` c, expert e keeps at most ceil(c * T * k / E) pairs, in token
order (the GShard/DeepSpeed rule); the rest contribute zero and are counted in `dropped`.

The eager rule is the reference semantics, and it is sparse: pairs are sorted by expert and each
expert multiplies only its own tokens, so FLOPs are k/E of running every expert on every token
(which is what the dense traced form of moe-tiny does). passes/moe/ rewrites recognised MoE
blocks into this op; the Triton lowering runs the sorted tokens through one grouped GEMM; the
sharding rules (expert parallelism over the leading E dim, expert slicing over f) are in
passes/parallel/strategies/.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register_op
from ..types import TensorType

MOE_EXPERTS = "moe.experts"
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}
LAYOUTS = ("kn", "nk")


def capacity(tokens: int, top_k: int, num_experts: int,
             capacity_factor: float | None) -> int | None:
    """Pairs an expert keeps under `capacity_factor` (None: dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs routed to each expert, int64 [E]. A scatter-add, not torch.bincount: bincount
    reads its maximum back to the host, a sync that CUDA graphs cannot capture."""
    flat = ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(ids: torch.Tensor, num_experts: int, cap: int | None = None):
    """Flattened (token, slot) pairs sorted by expert, stably (token order within an expert).

    Returns (order, counts, kept): `order` indexes ids.flatten(); `counts[e]` is how many pairs
    expert e computes after capacity; `kept` masks `order`'s pairs that survive capacity."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    if cap is None:
        return order, counts, torch.ones_like(order, dtype=torch.bool)
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    rank_in_expert = torch.arange(order.numel(), device=ids.device) - starts[sorted_e]
    kept = rank_in_expert < cap
    return order, counts.clamp(max=cap), kept


def expert_mlp(h: torch.Tensor, e: int, w_in, w_gate, w_out, *, act: str, layout: str,
               fused_gate_up: bool) -> torch.Tensor:
    """Expert e on its tokens h [n, d] -> [n, d]."""
    def proj(x, w):
        return x @ w if layout == "kn" else F.linear(x, w)

    up = proj(h, w_in[e])
    fn = ACTIVATIONS[act]
    if fused_gate_up:
        gate, up = up.chunk(2, dim=-1)
        inner = fn(gate) * up
    elif w_gate is not None:
        inner = fn(proj(h, w_gate[e])) * up
    else:
        inner = fn(up)
    return proj(inner, w_out[e])


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_in: torch.Tensor,
                w_gate: torch.Tensor | None, w_out: torch.Tensor, *, act: str = "silu",
                layout: str = "kn", fused_gate_up: bool = False,
                capacity_factor: float | None = None):
    check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up)
    t, k = ids.shape
    num_experts = w_in.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"moe.experts: ids hold experts {int(ids.min())}..{int(ids.max())}; "
                         f"expected 0..{num_experts - 1} (w_in has E={num_experts})")
    cap = capacity(t, k, num_experts, capacity_factor)
    order, counts, kept = sort_by_expert(ids, num_experts, cap)
    order = order[kept]
    token = order // k
    h = x[token]
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(expert_mlp(h[start:start + n], e, w_in, w_gate, w_out, act=act,
                                   layout=layout, fused_gate_up=fused_gate_up))
        start += n
    y_sorted = torch.cat(outs) if outs else h.new_zeros((0, x.shape[-1]))
    w = weights.reshape(-1)[order].to(y_sorted.dtype)
    y = torch.zeros_like(x).index_add(0, token, (y_sorted * w[:, None]).to(x.dtype))
    dropped = torch.tensor(t * k - order.numel(), dtype=torch.int64, device=x.device)
    return y, dropped


def check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up) -> None:
    """Shape/attribute validation shared by the eager rule and the shape rule (types or
    tensors); raises ValueError naming the argument, what it is and what is expected."""
    def shape(v):
        return tuple(v.shape)

    if act not in ACTIVATIONS:
        raise ValueError(f"moe.experts: act={act!r}; expected one of {sorted(ACTIVATIONS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"moe.experts: layout={layout!r}; expected 'kn' or 'nk'")
    if len(shape(x)) != 2 or len(shape(ids)) != 2 or shape(weights) != shape(ids):
        raise ValueError(f"moe.experts: expected x [T, d], weights and ids [T, k]; got x "
                         f"{shape(x)}, weights {shape(weights)}, ids {shape(ids)}")
    if len(shape(w_in)) != 3 or len(shape(w_out)) != 3 or shape(w_in)[0] != shape(w_out)[0]:
        raise ValueError(f"moe.experts: expected stacked weights [E, ., .] with one E; got "
                         f"w_in {shape(w_in)}, w_out {shape(w_out)}")
    if w_gate is not None and fused_gate_up:
        raise ValueError("moe.experts: give w_gate or fused_gate_up=True, not both")
    if w_gate is not None and shape(w_gate) != shape(w_in):
        raise ValueError(f"moe.experts: w_gate {shape(w_gate)} must match w_in {shape(w_in)}")


def _shape(x, weights, ids, w_in, w_gate, w_out, *, act="silu", layout="kn",
           fused_gate_up=False, capacity_factor=None):
    check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up)
    return [x, TensorType((), torch.int64, x.device)]


def _ffn(w_in, w_gate, fused, layout) -> tuple:
    """(d, f, matmuls per token): f is the inner width; 3 matmuls when gated, else 2."""
    e, a, b = w_in.shape
    d, f = (a, b) if layout == "kn" else (b, a)
    if fused:
        return d, f // 2, 3
    return d, f, 3 if w_gate is not None else 2


def _flops(args, kwargs, outs):
    ids, w_in = args[2], args[3]
    w_gate = args[4] if len(args) > 4 else None
    d, f, mms = _ffn(w_in, w_gate, kwargs.get("fused_gate_up", False), kwargs.get("layout", "kn"))
    pairs = ids.shape[0] * ids.shape[1]
    return 2 * pairs * d * f * mms


def _bytes(args, kwargs, outs):
    total = outs[0].nbytes()
    for a in args:
        if isinstance(a, TensorType):
            total = total + a.nbytes()
    # each (token, expert) pair's row is read, and its result written, once more
    x, ids = args[0], args[2]
    return total + 2 * ids.shape[0] * ids.shape[1] * x.shape[1] * x.itemsize


register_op(MOE_EXPERTS, moe_experts, shape=_shape, flops=_flops, bytes=_bytes,
            category="matmul",
            doc="mixture-of-experts dispatch + expert MLPs + weighted combine (sparse, dropless)")
