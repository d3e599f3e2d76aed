"""Expert parallelism in the auto-parallel search (issue 16, item 3): the zoo's MoE configs, the
all-to-all in the cost model, the search against the exhaustive EP grid, the plan's ep axis.

Reproduce: .venv/bin/pytest tests/test_moe_search.py -x -q
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import meshweave
from meshweave.ir.mesh import DeviceMesh
from meshweave.models import get_model_spec
from meshweave.models.moe import MoEConfig
from meshweave.passes.parallel.cost.cost_model import MeshModel
from meshweave.passes.parallel.cost.hardware import get_spec
from meshweave.passes.parallel.cost.moe_cost import TRAIN_SCALE
from meshweave.passes.parallel.search.candidates import PlannerState, stage_meshes
from meshweave.passes.parallel.search.context import GraphContext
from meshweave.passes.parallel.search.moe_grid import grid_meshes, moe_grid
from meshweave.passes.parallel.search.search import plan_parallel
from meshweave.runtime.reference import run_graph
from moe_helpers import moe_graph

# experts wide enough that, even at this size (every kernel near its launch latency), the grid's
# best ep layout beats pure data parallelism by ~6%
SMALL = dict(hidden_size=128, expert_ffn_size=2048, num_experts=8, num_layers=3,
             shared_expert=True, shared_ffn_size=128, shared_gate="sigmoid", vocab_size=128)
BATCH, SEQ, DEVICES = 32, 32, 8


# ------------------------------------------------------------------------------ the zoo
@pytest.mark.parametrize("name,published", [("mixtral-8x7b", 46.7e9), ("qwen2-moe-57b", 57.4e9)])
def test_zoo_moe_configs_have_the_published_parameter_counts(name, published):
    count = get_model_spec(name).param_count()  # a meta build: no weight memory
    assert abs(count - published) < 0.05e9, f"{name}: {count / 1e9:.3f}B, published {published}"


def test_mixtral_count_is_the_sum_of_its_parts():
    c = get_model_spec("mixtral-8x7b").config
    d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    layer = (2 * d * d + 2 * d * kv) + d * c.num_experts \
        + 3 * c.num_experts * d * c.expert_ffn_size + 2 * d
    total = c.num_layers * layer + 2 * c.vocab_size * d + d
    assert get_model_spec("mixtral-8x7b").param_count() == total


@pytest.fixture(scope="module")
def small():
    """A small MoE decoder with a Qwen2-style sigmoid-gated shared expert, compiled on the CPU
    (its MoE blocks become moe.experts), with its eager output for 2 x 8 tokens."""
    warnings.filterwarnings("ignore")
    spec = get_model_spec("moe-tiny", **SMALL)
    model = spec.build(seed=0)
    ids = spec.example_inputs(batch=2, seq=SEQ)
    cm = meshweave.compile(model, ids)
    with torch.no_grad():
        want = model(*ids)
    return model, ids, cm.graph, want


def test_sigmoid_shared_gate_matches_its_formula_and_the_compiled_graph(small):
    model, ids, graph, want = small
    moe = model.layers[0].moe
    assert not hasattr(moe, "coefficient") and moe.shared_expert_gate.weight.shape == (1, 128)
    x = torch.randn(4, 3, 128, generator=torch.Generator().manual_seed(1))
    tokens = x.reshape(12, 128)
    expect = moe.experts(tokens, moe.router(tokens)) + torch.sigmoid(
        tokens @ moe.shared_expert_gate.weight.t()) * moe.shared_expert(tokens)
    torch.testing.assert_close(moe(x), expect.reshape(4, 3, 128))
    (got,) = run_graph(graph, list(ids))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert sum(n.op == "moe.experts" for n in graph.nodes) == SMALL["num_layers"]


def test_a_bad_shared_gate_is_named():
    with pytest.raises(ValueError, match="unknown shared_gate 'tanh'.*'softmax', 'sigmoid'"):
        MoEConfig(shared_gate="tanh")


# --------------------------------------------------------------------- the all-to-all cost
@pytest.mark.parametrize("training", [False, True])
def test_ep_strategy_pays_dispatch_and_combine_all_to_all(training):
    t, d, f, e, k = 256, 64, 128, 8, 2
    g = moe_graph(t, d, f, e, k, "kn", "separate", torch.float32)
    ctx = GraphContext.build(g)
    spec = get_spec("h100")
    mesh = DeviceMesh((2, 4, 1), ("dp", "ep", "tp"))
    model = MeshModel(g, ctx.types, ctx.batch, mesh, t, spec, training=training,
                      dtype="float32")
    node = g.nodes[0]
    strats = model.strategies(node)
    assert strats and all(x.tags[1] == "ep" for x in strats)  # the "ep" axis pins ep
    (s,) = [x for x in strats if x.tags[0] == "batch"]
    flops, moved, _ = model._local_cost(node, s)
    compute = spec.compute_time(flops, moved, "float32")
    # expert compute: E/ep experts over k * T_group / ep pairs (T_group = T / dp), uniform routing
    assert flops == 2 * (k * (t // 2) // 4) * d * f * 3
    buf = (t // 8) * k * d * 4  # T_local * k * d * itemsize, per device
    link = spec.intra_node  # 4 consecutive ranks of a node
    one = 3 * link.latency_s + 3 / 4 * buf / link.bandwidth_for("all_to_all")
    added = float(model.node_costs(node, [s])[0][0]) - compute
    scale = TRAIN_SCALE if training else 1.0
    assert math.isclose(added, 2 * one * scale, rel_tol=1e-9)
    if training:  # x3 in the search (forward + backward): 4 exchanges
        assert math.isclose(3 * added, 4 * one, rel_tol=1e-9)


def test_moe_graphs_get_ep_meshes_dense_graphs_do_not():
    spec = get_spec("h100")
    shapes = {(pp, m.shape, m.names) for pp, m in stage_meshes(16, spec, 4, None, experts=8)}
    assert (1, (2, 8, 1), ("dp", "ep", "tp")) in shapes
    assert (2, (1, 4, 2), ("dp", "ep", "tp")) in shapes
    assert not any(m[1] == 3 for _, m, _ in shapes)  # ep=3 does not divide 8 experts
    assert all(len(m) == 2 for _, m, _ in {(pp, m.shape, m.names) for pp, m in
                                          stage_meshes(16, spec, 4, None)})
    grid = {(pp, m.shape) for pp, m in grid_meshes(12, 4, 8)}  # 12 devices, E=4
    assert {(1, (3, 4, 1)), (1, (6, 2, 1)), (1, (12, 1)), (1, (3, 2, 2)), (3, (1, 4, 1))} <= grid
    assert not any(len(sh) == 3 and sh[1] in (3, 6, 12) for _, sh in grid)  # E % ep != 0


# --------------------------------------------------------------------------- the search
def test_search_picks_ep_and_is_no_slower_than_any_grid_entry(small):
    _, _, graph, _ = small
    plan = plan_parallel(graph, DEVICES, "h100", batch=BATCH, training=True, time_budget=10)
    ep = plan.search["ep"]
    assert ep["degree"] > 1 and SMALL["num_experts"] % ep["degree"] == 0, plan.summary()
    assert ep["experts_per_device"] * ep["degree"] == SMALL["num_experts"]
    assert any(c.kind == "all_to_all" for c in plan.collectives)
    state = PlannerState(graph, get_spec("h100"), batch=BATCH, training=True)
    grid = moe_grid(state, DEVICES)
    fits = [e.step_time for e in grid.entries if e.evaluation.fits]
    assert len(fits) > 20 and plan.estimate["total"] <= min(fits) * (1 + 1e-9), (
        plan.summary(), min(fits))
    assert any(e.config.mesh.names == ("dp", "ep", "tp") for e in grid.entries)
    d = json.loads(plan.to_json())
    assert d["search"]["ep"]["degree"] == ep["degree"]
    if "ep" in d["mesh"]["axis_names"]:
        i = d["mesh"]["axis_names"].index("ep")
        assert d["mesh"]["shape"][i] == ep["degree"] and ep["axes"] == ["ep"]
    assert f"expert parallelism: ep={ep['degree']}" in plan.summary()
    # the searched plan lowers: each MoE layer exchanges over a group of ep ranks
    from meshweave.passes.parallel.lower.rank import lower_for_rank

    lowered = [n for n in lower_for_rank(graph, plan, 0).nodes if n.op == "moe.experts_ep"]
    assert len(lowered) == SMALL["num_layers"]
    assert all(len(n.kwargs["group"]) == ep["degree"] for n in lowered)


def test_moe_grid_refuses_a_dense_graph():
    from meshweave.passes.parallel.strategies.node_strategies import PlanningError

    spec = get_model_spec("llama-tiny")
    g = meshweave.compile(spec.build(), spec.example_inputs(batch=2, seq=8)).graph
    with pytest.raises(PlanningError, match="no moe.experts node"):
        moe_grid(PlannerState(g, get_spec("h100"), batch=8, training=True), 4)


# ------------------------------------------------------------------------------ the CLI
def test_cli_plan_json_carries_the_ep_axis(capsys):
    from meshweave.cli import main

    argv = ["plan", "--model", "moe-tiny", "--mesh", "dp=2,ep=4", "--train", "--batch", "16",
            "--seq", "16", "--json", "--time-budget", "5"]
    assert main(argv) == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)
    assert d["mesh"]["axis_names"][:2] == ["dp", "ep"] and d["mesh"]["shape"][:2] == [2, 4]
    assert d["search"]["ep"]["degree"] == 4 and d["search"]["ep"]["experts_per_device"] == 1
    a2a = [c for c in d["collectives"] if c["kind"] == "all_to_all"]
    # 2 layers x (dispatch + combine) x (forward + backward) x micro-batches
    assert a2a and sum(c["count"] for c in a2a) == 2 * 4 * d["micro_batches"]
    assert {c["axis"] for c in a2a} == {"ep"}


@pytest.mark.parametrize("model,mesh,message", [
    ("moe-tiny", "dp=2,ep=3", "ep=3 does not divide the 4 experts of moe.experts %"),
    ("llama-tiny", "dp=2,ep=2", "has an 'ep' axis (expert parallelism), but graph"),
])
def test_cli_plan_rejects_a_bad_ep_degree_in_one_line(model, mesh, message, capsys):
    from meshweave.cli import main

    assert main(["plan", "--model", model, "--mesh", mesh, "--train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("meshweave plan: error: "), err
    assert message in err, err


def test_a_plan_without_ep_says_so(small):
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan

    _, _, graph, _ = small
    dense = megatron_plan(graph, 4, 1, 1, batch=8, training=True)  # experts replicated
    assert dense.search["ep"]["degree"] == 1
    assert not any(c.kind == "all_to_all" for c in dense.collectives)
    assert "expert parallelism off: ep=1, all 8 experts on every device" in dense.summary()
    ep = megatron_plan(graph, 2, 1, 1, batch=8, training=True, ep=2)
    assert ep.search["ep"]["degree"] == 2 and ep.search["ep"]["axes"] == ["ep"]
    # the exchange makes the ep layout's MoE nodes dearer than the compute alone
    assert ep.search["ep"]["all_to_all_seconds"] > 0
