"""compile(mesh=...): the plan is made by the same code as the CLI's, and without a process
group the model plans, reports and exports; calling it says how to start the ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
from meshweave.api import _check_local_plan
from meshweave.cli_parallel import plan_for_mesh
from meshweave.ir.errors import MeshweaveError
from meshweave.models import build_model

import meshweave

MESH = meshweave.DeviceMesh((2, 2), ("dp", "tp"))


@pytest.fixture(scope="module")
def planned():
    model, inputs = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model.eval(), inputs, options=meshweave.CompileOptions(mesh=MESH))
    return cm, inputs


def test_the_plan_is_the_clis_plan(planned):
    cm, _ = planned
    assert cm.plan.world_size == 4 and cm.plan.mesh.shape == (2, 2)
    cli = plan_for_mesh(cm.graph, "dp=2,tp=2", batch=2)
    assert cm.plan.placements == cli.placements and cm.plan.to_json() == cli.to_json()


def test_report_and_per_rank_export_without_a_process_group(planned, tmp_path):
    cm, inputs = planned
    path = cm.report(str(tmp_path / "plan.html"))
    assert "<svg" in open(path, encoding="utf-8").read()
    result = cm.export_onnx(str(tmp_path / "onnx"), list(inputs))  # checked in onnxruntime
    manifest = json.load(open(os.path.join(str(tmp_path / "onnx"), "manifest.json")))
    assert manifest["world_size"] == 4 and len(manifest["ranks"]) == 4
    assert result.max_error is not None and result.max_error < 1e-4


def test_calling_without_a_process_group_shows_the_torchrun_command(planned):
    cm, inputs = planned
    with pytest.raises(MeshweaveError, match=r"torchrun --nproc-per-node 4 script\.py"):
        cm(*inputs)


def test_a_process_group_of_the_wrong_size_is_named(planned):
    cm, inputs = planned
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(MeshweaveError, match="planned for 4 devices.*has 1 ranks"):
            cm(*inputs)
    finally:
        dist.destroy_process_group()


def test_a_device_count_goes_to_the_search():
    model, inputs = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model.eval(), inputs, options=meshweave.CompileOptions(mesh=2))
    assert cm.plan.world_size == 2 and "grid_best" in cm.plan.search  # the search ran


def test_bad_meshes_are_clear_errors():
    with pytest.raises(ValueError, match="duplicate axis names"):
        meshweave.DeviceMesh((2, 2), ("dp", "dp"))
    model, inputs = build_model("gpt-tiny", batch=2, seq=8)
    with pytest.raises(TypeError, match="expected a meshweave.DeviceMesh"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(mesh="2x2"))
    with torch.no_grad():
        cm = meshweave.compile(model, inputs)
    assert cm.plan is None
    with pytest.raises(MeshweaveError, match="compiled without mesh="):
        cm.report("x.html")


def test_a_saved_plan_is_run_as_given(planned, tmp_path):
    """CompileOptions(plan=...): a Plan or its JSON, checked against the mesh and the batch."""
    cm, inputs = planned
    path = tmp_path / "plan.json"
    path.write_text(cm.plan.to_json())
    model, _ = build_model("gpt-tiny", batch=2, seq=8)
    again = meshweave.compile(model.eval(), inputs,
                              options=meshweave.CompileOptions(plan=str(path)))
    assert again.plan.to_json() == cm.plan.to_json()
    with pytest.raises(MeshweaveError, match="the plan needs 4 devices, but "
                                             "CompileOptions.mesh=.* has 2"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(plan=cm.plan, mesh=2))
    model4, inputs4 = build_model("gpt-tiny", batch=4, seq=8)
    with pytest.raises(MeshweaveError, match="made for a global batch of 2, the model was "
                                             "traced at 4"):
        meshweave.compile(model4, inputs4, options=meshweave.CompileOptions(plan=str(path)))
    path.write_text("{}")
    with pytest.raises(MeshweaveError, match="cannot read a meshweave Plan JSON"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(plan=str(path)))
    with pytest.raises(TypeError, match="expected a Plan or the path of its JSON, got dict"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(plan={}))


def test_zero_optimizer_needs_a_plan():
    model, inputs = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(training=True))
    with pytest.raises(MeshweaveError, match="no multi-device plan to shard the optimizer"):
        cm.zero_optimizer(torch.optim.AdamW, lr=1e-3)


def test_local_batch_checks_the_plan_and_the_per_rank_shapes():
    """CompileOptions(local_batch=True): traced at the global batch (the example dp times),
    called with one rank's slice; a mesh without dp, or with pipeline stages, is refused."""
    model, inputs = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
        mesh=MESH, training=True, local_batch=True))
    assert cm.graph.user_inputs[0].tensor_type.shape[0] == 4  # 2 per rank x dp=2
    assert cm.signature.slots[0].expected.shape[0] == 2
    with pytest.raises(ValueError, match=r"dim 0 must be 2"):
        cm(torch.cat([inputs[0]] * 2))  # the global batch, where one rank's slice belongs
    with pytest.raises(ValueError, match="local_batch=True splits the batch over a plan's dp"):
        meshweave.CompileOptions(local_batch=True)
    with pytest.raises(MeshweaveError, match="has none; use a named mesh"):
        meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            mesh=meshweave.DeviceMesh((2,), ("tp",)), local_batch=True))
    pipelined = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2, 2), ("dp", "pp")), local_batch=True))
    assert pipelined.plan.num_stages == 2 and pipelined.plan.uniform
    plan = pipelined.plan  # a stage on another mesh shape: no rank pairs up with the last
    uneven = dataclasses.replace(plan, stages=[plan.stages[0], dataclasses.replace(
        plan.stages[1], mesh_shape=(1, 2))])
    with pytest.raises(MeshweaveError, match="needs stages of one mesh"):
        _check_local_plan(uneven)


class _WithLoss(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, y):
        o = self.m(x)
        return torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("mesh", [MESH, meshweave.DeviceMesh((2,), ("tp",))],
                         ids=["dp2-tp2", "tp2"])
def test_vocab_parallel_cross_entropy_never_gathers_the_logits(mesh):
    """A module returning its loss: on dp=2,tp=2 and on tp=2 alone the planner keeps the
    logits vocab-split through log_softmax (row max and sum of exponentials all-reduced) and
    the target pick (a partial sum); every rank's program equals the graph (simulate_plan).
    (tp=2 alone failed to plan: its strategies were enumerated at a stand-in batch the loss's
    mean cannot be re-batched to.)"""
    from meshweave.passes.parallel.lower.rank import lower_for_rank
    from meshweave.passes.parallel.lower.simulate import simulate_plan
    from meshweave.runtime.reference import run_graph

    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    y = torch.roll(x, -1, 1)
    cm = meshweave.compile(_WithLoss(model), (x, y), options=meshweave.CompileOptions(
        mesh=mesh, training=True))
    softmax = next(n for n in cm.graph.nodes if n.op == "aten._log_softmax.default")
    assert cm.plan.placements[softmax.outputs[0].name][1] == "S(1)"
    vocab = softmax.outputs[0].tensor_type.shape[-1]
    gathered = [c for c in cm.plan.collectives if c.kind == "all_gather"
                and not c.value.startswith("p_") and c.nbytes >= vocab * 4]
    assert not gathered, gathered
    reduces = [n.kwargs.get("reduce") for n in lower_for_rank(cm.graph, cm.plan, 0).nodes
               if n.op == "dist.all_reduce"]
    assert "max" in reduces, reduces
    want = run_graph(cm.graph, [x, y])[0]
    torch.testing.assert_close(simulate_plan(cm.graph, cm.plan, [x, y])[0], want,
                               rtol=1e-5, atol=1e-6)


def test_the_search_plans_a_module_returning_its_loss_whole():
    """A device count sends a loss-returning module to the planner's search: its batch dim is
    lost at the loss's mean, so every candidate runs the batch as one micro-batch (the search
    used to fail re-batching it), and the chosen plan's ranks equal the graph."""
    from meshweave.passes.parallel.lower.simulate import simulate_plan
    from meshweave.passes.parallel.search.candidates import microbatch_options
    from meshweave.runtime.reference import run_graph

    assert microbatch_options(8, 2, 2, True) == [2, 4]
    assert microbatch_options(8, 2, 2, True, rebatchable=False) == [1]
    assert microbatch_options(7, 1, 2, True, rebatchable=False) == []
    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    y = torch.roll(x, -1, 1)
    cm = meshweave.compile(_WithLoss(model), (x, y), options=meshweave.CompileOptions(
        mesh=4, training=True))
    assert cm.plan.micro_batches == 1 and cm.plan.world_size == 4
    torch.testing.assert_close(simulate_plan(cm.graph, cm.plan, [x, y])[0],
                               run_graph(cm.graph, [x, y])[0], rtol=1e-5, atol=1e-6)


def test_the_cost_model_prices_the_vocab_parallel_softmax_all_reduces():
    """The log-softmax's vocab strategy pays its all-reduces of the rows' statistics (max and
    sum of exponentials in the forward, the gradient sum in the backward): fp32, one value per
    row, over the tp link; no other strategy pays them."""
    from meshweave.ir.mesh import DeviceMesh
    from meshweave.passes.parallel.cost.collectives import collective_time
    from meshweave.passes.parallel.cost.hardware import get_spec
    from meshweave.passes.parallel.search.candidates import PlannerState
    from meshweave.passes.parallel.strategies.compute_rules import VOCAB_SOFTMAX

    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    cm = meshweave.compile(_WithLoss(model), (x, torch.roll(x, -1, 1)),
                           options=meshweave.CompileOptions(training=True))
    mesh = DeviceMesh((1, 2), ("dp", "tp"))
    for training in (True, False):
        state = PlannerState(cm.graph, get_spec("h100"), batch=4, training=training)
        mm = state.model(mesh, 4)
        n = next(n for n in cm.graph.nodes if n.op == "aten._log_softmax.default")
        strats = mm.strategies(n)
        vocab = [s for s in strats if VOCAB_SOFTMAX in s.tags]
        assert vocab and all(mm._vocab_softmax_time(n, s) == 0 for s in strats
                             if s not in vocab)
        rows = 4 * 8  # batch x seq rows, one fp32 statistic each
        ar = collective_time("all_reduce", 4.0 * rows, 2, mm.comm.links[1])
        want = ar * (1.0 if training else 2.0)  # x3 training multiplier: 3 all-reduces
        assert mm._vocab_softmax_time(n, vocab[0]) == pytest.approx(want)
