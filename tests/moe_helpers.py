"""Shared by tests/test_moe_kernel.py and tests/test_moe_lowering.py: random expert weights
and routing, the fp64 per-expert loop the grouped kernel is checked against, and a hand-built
graph holding one moe.experts node. Imports no triton (the tests settle the mode first)."""

from __future__ import annotations

import torch

from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.ops.moe import ACTIVATIONS
from meshweave.ir.types import TensorType

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2)}


def expert_weights(e, d, f, layout, gate, dtype, seed=0):
    """(w_in, w_gate, w_out) for gate in "fused" | "separate" | "none"."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / shape[-2 if layout == "kn" else -1] ** 0.5
                ).to(DEVICE, dtype)

    width = 2 * f if gate == "fused" else f
    w_in = rnd(e, d, width) if layout == "kn" else rnd(e, width, d)
    w_gate = (rnd(e, d, f) if layout == "kn" else rnd(e, f, d)) if gate == "separate" else None
    w_out = rnd(e, f, d) if layout == "kn" else rnd(e, d, f)
    return w_in, w_gate, w_out


def loop_reference(x, weights, ids, w_in, w_gate, w_out, act, layout, gate, cap=None):
    """The HF way, in fp64: for each expert, its tokens (in token order, the first `cap` kept),
    through its MLP, scaled by the routing weight and added to the token's row."""
    fn = ACTIVATIONS[act]
    xd, y = x.double(), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    dropped = 0
    for e in range(w_in.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if cap is not None:
            dropped += max(0, tok.numel() - cap)
            tok, slot = tok[:cap], slot[:cap]
        if tok.numel() == 0:
            continue

        def proj(h, w):
            w = w.double()
            return h @ w if layout == "kn" else h @ w.t()

        up = proj(xd[tok], w_in[e])
        if gate == "fused":
            g, up = up.chunk(2, dim=-1)
            inner = fn(g) * up
        elif gate == "separate":
            inner = fn(proj(xd[tok], w_gate[e])) * up
        else:
            inner = fn(up)
        y.index_add_(0, tok, proj(inner, w_out[e]) * weights[tok, slot, None].double())
    return y, dropped


def routing(t, e, k, seed=0, skew=None):
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(t, e, generator=g)
    if skew is not None:  # every token's top expert is `skew`
        logits[:, skew] += 100.0
    w, ids = logits.softmax(-1).topk(k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def moe_graph(t, d, f, e, k, layout, gate, dtype, capacity_factor=None):
    """x, weights, ids (user) -> moe.experts -> y + x, dropped; expert weights as params."""
    def tensor(name, shape, dt=dtype, kind="user"):
        return Value(name, TensorType(tuple(shape), dt, DEVICE), kind=kind, target=name)

    x, w, ids = tensor("x", (t, d)), tensor("w", (t, k), torch.float32), \
        tensor("ids", (t, k), torch.int64)
    mats = expert_weights(e, d, f, layout, gate, dtype, seed=5)
    params = {n: m for n, m in zip(("w_in", "w_gate", "w_out"), mats) if m is not None}
    pv = {n: tensor(n, m.shape, kind="param") for n, m in params.items()}
    kwargs = {"act": "silu", "layout": layout, "fused_gate_up": gate == "fused",
              "capacity_factor": capacity_factor}
    moe = Node("moe.experts", (x, w, ids, pv["w_in"], pv.get("w_gate"), pv["w_out"]), kwargs,
               (), multi_output=True)
    moe.outputs = (Value("y", TensorType((t, d), dtype, DEVICE), moe),
                   Value("dropped", TensorType((), torch.int64, DEVICE), moe))
    add = Node("aten.add.Tensor", (moe.outputs[0], x), {}, ())
    add.outputs = (Value("out", TensorType((t, d), dtype, DEVICE), add),)
    return Graph([x, w, ids, *pv.values()], [moe, add], [add.outputs[0], moe.outputs[1]],
                 tensors=params, name="moe_block")

