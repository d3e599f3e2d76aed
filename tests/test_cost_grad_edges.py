"""The cost model charges backward collectives only where a gradient flows (issue 21).

The rotary cos/sin tables of llama are computed from buffers: no trainable parameter is
upstream, so a tensor-parallel consumer reading them replicated needs no gradient all-reduce,
while an activation read the same way does."""

from __future__ import annotations

import torch

import meshweave
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Replicate
from meshweave.models import build_model
from meshweave.passes.parallel.cost.cost_model import (
    ACTIVATION, NO_GRAD, PARAM, CommTable, grad_free_values,
)
from meshweave.passes.parallel.cost.hardware import get_spec


def _graph():
    model, inputs = build_model("llama-tiny", batch=2, seq=8)
    return meshweave.compile(model, inputs).graph


def test_rotary_tables_are_grad_free_and_activations_are_not():
    g = _graph()
    free = grad_free_values(g)
    params = [v for v in g.inputs if v.kind == "param"]
    assert params and not any(v in free for v in params)
    # every linear's output depends on a parameter: it carries a gradient
    linears = [n for n in g.nodes if n.op == "aten.linear.default"]
    assert linears and not any(n.outputs[0] in free for n in linears)
    # the rotary tables (buffers, folded to constants) and the token ids carry none
    user = g.user_inputs[0]
    assert user in free
    tables = [v for v in g.state_inputs if v.kind != "param" and v.type.dtype.is_floating_point]
    assert tables, "expected the rotary tables as buffers or folded constants"
    assert all(v in free for v in tables)


def test_no_backward_all_reduce_for_grad_free_edges():
    mesh = DeviceMesh((2,), ("tp",))
    table = CommTable(mesh, get_spec("h100"), training=True)
    rep = (Replicate(),)
    split = (True,)  # the consumer's work is split over tp, the input replicated
    act = table.transition_terms(rep, rep, split, 1e6, ACTIVATION)
    free = table.transition_terms(rep, rep, split, 1e6, NO_GRAD)
    par = table.transition_terms(rep, rep, split, 1e6, PARAM)
    assert act[0] > 0.0  # the Megatron "f" all-reduce of the gradient, every micro-batch
    assert free == (0.0, 0.0, 0.0)
    assert par[0] == 0.0 and par[2] > 0.0  # a parameter's gradient: reduced once per step
    assert torch.isfinite(torch.tensor(act[0]))
