"""Which `moe.experts` call a region may be: the expert-weight roles, layout and activation.

The stacked parameters say, by their shapes, which roles they can play: with x [T, d],
  layout "kn": w_in/w_gate [E, d, f] ([E, d, 2f] fused gate-up), w_out [E, f, d]
  layout "nk": w_in/w_gate [E, f, d] ([E, 2f, d] fused gate-up), w_out [E, d, f]
Three parameters are in, gate and out; two are in and out, the in one either fused
gate-first or ungated. The activation is guessed from the region's ops first (a sigmoid times
its input is SiLU, a gelu node says which gelu), then the others are tried. Every candidate
that fits the shapes is returned, most likely first; validate.py keeps the first that computes
what the region computes.
"""

from __future__ import annotations

import dataclasses
import itertools

from meshweave.ir.graph import Node, Value
from meshweave.ir.ops.moe import ACTIVATIONS, LAYOUTS, check_args


@dataclasses.dataclass(frozen=True)
class ExpertsCall:
    """The non-routing arguments of one moe.experts node."""

    w_in: Value
    w_gate: Value | None
    w_out: Value
    act: str
    layout: str
    fused_gate_up: bool

    def kwargs(self) -> dict:
        return {"act": self.act, "layout": self.layout, "fused_gate_up": self.fused_gate_up,
                "capacity_factor": None}

    def describe(self) -> str:
        gate = ("fused gate-up" if self.fused_gate_up else
                "separate gate" if self.w_gate is not None else "ungated")
        return f"layout {self.layout}, {gate}, act {self.act}"


def activation_guesses(nodes: list[Node]) -> list[str]:
    """Activations in the order the region's ops suggest them."""
    ops = {n.op for n in nodes}
    guess = []
    if "aten.silu.default" in ops or "aten.sigmoid.default" in ops:
        guess.append("silu")
    for n in nodes:
        if n.op == "aten.gelu.default":
            tanh = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
            guess.append("gelu_tanh" if tanh == "tanh" else "gelu")
    if "aten.relu.default" in ops:
        guess.append("relu")
    rest = [a for a in ACTIVATIONS if a not in guess]
    return list(dict.fromkeys(guess)) + rest


def _fits(x: Value, call: ExpertsCall) -> bool:
    w_in, w_out = call.w_in.type.shape, call.w_out.type.shape
    d = x.type.shape[1]
    try:
        check_args(x.type, x.type, x.type, call.w_in.type,
                   call.w_gate.type if call.w_gate is not None else None, call.w_out.type,
                   call.act, call.layout, call.fused_gate_up)
    except ValueError:
        return False
    inner = w_in[2] if call.layout == "kn" else w_in[1]
    d_in = w_in[1] if call.layout == "kn" else w_in[2]
    f, d_out = (w_out[1], w_out[2]) if call.layout == "kn" else (w_out[2], w_out[1])
    if call.fused_gate_up:
        if inner % 2:
            return False
        inner //= 2
    return d_in == d and d_out == d and inner == f


def candidate_calls(x: Value, params: list[Value], nodes: list[Node]) -> list[ExpertsCall]:
    acts = activation_guesses(nodes)
    structures = []
    if len(params) == 3:
        for w_in, w_gate, w_out in itertools.permutations(params):
            structures.append((w_in, w_gate, w_out, False))
    elif len(params) == 2:
        for w_in, w_out in itertools.permutations(params):
            structures += [(w_in, None, w_out, True), (w_in, None, w_out, False)]
    out = []
    for act in acts:
        for w_in, w_gate, w_out, fused in structures:
            for layout in LAYOUTS:
                call = ExpertsCall(w_in, w_gate, w_out, act, layout, fused)
                if _fits(x, call):
                    out.append(call)
    return out
