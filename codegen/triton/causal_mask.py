"""Codegen pre-pass: an attention mask that is a constant causal pattern becomes is_causal.

Hugging Face models build their causal mask outside SDPA and pass it as `attn_mask`;
torch.export folds that mask into a constant (a bool [B, 1, S, S] tensor for GPT-2), or
traces the few index ops that build it from `arange`. Run as written, every attention call
then reads a mask tensor, and SDPA converts a boolean mask per call. The flash-attention
kernel with `is_causal=True` instead skips the key blocks above the diagonal (half the work
at long sequences) and reads no mask. This pass evaluates each mask whose inputs are all
constants (never user inputs or parameters), and when it is exactly the causal pattern of a
square attention (key j visible to query i iff j <= i, for every batch and head; for an
additive float mask 0 there and -inf, or at most half the dtype's lowest value, elsewhere),
rewrites

    sdpa(q, k, v, attn_mask=M)  ->  sdpa(q, k, v, is_causal=True)

and dead-code elimination drops what only built M. A pure function on a copy of the graph,
applied only for the Triton backend; the result is the same computation (for float masks,
masked scores are exactly zero weight either way).
"""

from __future__ import annotations

import torch

from meshweave.ir.graph import Graph, Node, Value
from meshweave.runtime.reference import run_node
from .kernels.flash_attention import parse_sdpa
from ..folding import SDPA, drop_folded

FOLDED = "constant causal mask folded into is_causal attention"


def _constant_value(graph: Graph, v: Value, by_output: dict[Value, Node]) -> torch.Tensor | None:
    """The value of v when it depends on constants only (evaluated by the reference
    executor), else None."""
    cone: list[Node] = []
    leaves: set[Value] = set()
    stack, seen = [v], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        node = by_output.get(x)
        if node is None:
            if x.kind != "constant" or x.name not in graph.tensors:
                return None  # a user input, parameter or buffer: not a compile-time constant
            leaves.add(x)
            continue
        cone.append(node)
        stack.extend(node.inputs)
    env = {x: graph.tensors[x.name] for x in leaves}
    if any(t.is_meta for t in env.values()):
        return None
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    try:
        for node in sorted(cone, key=lambda n: order[id(n)]):
            run_node(node, env)
    except Exception:  # noqa: BLE001  an op the executor cannot run here: leave the mask alone
        return None
    return env[v] if isinstance(env.get(v), torch.Tensor) else None


def is_causal_mask(mask: torch.Tensor, q_shape: tuple, k_shape: tuple) -> bool:
    """mask (broadcast to [B, H, SQ, SK]) is exactly the square causal pattern."""
    b, h, sq = q_shape[0], q_shape[1], q_shape[2]
    sk = k_shape[2]
    if sq != sk or mask.dim() > 4:
        return False
    try:
        m = mask.expand(b, h, sq, sk)
    except RuntimeError:
        return False
    keep = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
    if m.dtype == torch.bool:
        return bool((m == keep).all())
    if not m.dtype.is_floating_point:
        return False
    lowest = torch.finfo(m.dtype).min / 2
    return bool(((m == 0) == keep).all() and (m[..., ~keep] <= lowest).all())


def fold_causal_masks(graph: Graph) -> Graph:
    """The graph with constant causal masks turned into is_causal=True (see module doc)."""
    candidates = [n for n in graph.nodes if n.op == SDPA and parse_sdpa(n).mask is not None]
    if not candidates:
        return graph
    g = graph.copy()
    by_output = {o: n for n in g.nodes for o in n.outputs}
    values: dict[Value, bool] = {}
    changed = False
    for n in g.nodes:
        if n.op != SDPA:
            continue
        a = parse_sdpa(n)
        if a.mask is None or a.is_causal:
            continue
        shapes = [t.tensor_type.shape for t in (a.q, a.k)]
        if not all(isinstance(d, int) for s in shapes for d in s):
            continue  # symbolic sizes: the mask's shape is not known here
        if a.mask not in values:
            m = _constant_value(g, a.mask, by_output)
            values[a.mask] = m is not None and is_causal_mask(m, shapes[0], shapes[1])
        if values[a.mask]:
            names = ["q", "k", "v", "attn_mask", "dropout_p", "is_causal"]
            kwargs = {**dict(zip(names[3:], n.args[3:])), **n.kwargs}
            kwargs.pop("attn_mask", None)
            kwargs["is_causal"] = True
            n.args = tuple(n.args[:3])
            n.kwargs = kwargs
            n.attrs["causal_mask_folded"] = a.mask.name
            changed = True
    if not changed:
        return graph
    # the masks themselves are recorded too: a constant mask is an input, which dce keeps
    masks = tuple(n.attrs["causal_mask_folded"] for n in g.nodes if "causal_mask_folded" in n.attrs)
    return drop_folded(graph, g, FOLDED, masks)
