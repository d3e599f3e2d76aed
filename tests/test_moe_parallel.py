"""Expert parallelism for moe.experts: sharding rules, lowering and real gloo ranks on CPU.

  * the planner: strategies of moe.experts, the "ep" axis pinning, and its bad inputs (an ep
    degree that does not divide E, an ep axis on a dense model);
  * the rank programs in one process (simulate_plan) against the reference executor;
  * gloo ranks against one device (runner API, one trace shared): EP, EP x DP, EP x TP in
    inference and training, skewed routing (a zero router) dropless under EP, a capacity
    factor, a searched plan splitting the experts over two axes;
  * `meshweave run ... --check` as a user runs it (moe-tiny ep=4, HF Mixtral ep=2,tp=2 train).

The row exchange and moe.experts_ep alone are unit-tested in test_moe_exchange.py.

Every numeric failure names a command that reproduces it.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------ the planner
BATCH, SEQ = 4, 16


@pytest.fixture(scope="module")
def moe_tiny():
    """(model, inputs, graph) of moe-tiny with its MoE blocks as moe.experts nodes."""
    from meshweave.runtime.distributed.runner import trace_model

    model, inputs, graph = trace_model("moe-tiny", BATCH, SEQ)
    if not any(n.op == "moe.experts" for n in graph.nodes):  # a pipeline without passes/moe
        from meshweave.passes.moe import recognize_moe

        graph = recognize_moe(graph)
    assert sum(n.op == "moe.experts" for n in graph.nodes) == 2
    return model, inputs, graph


def _moe_nodes(graph):
    return [n for n in graph.nodes if n.op == "moe.experts"]


def test_moe_experts_strategies(moe_tiny):
    """batch, ep, row (expert slicing) and replicated; dropped is replicated when dropless
    and a partial count under a capacity factor."""
    from meshweave.ir.graph import Node
    from meshweave.ir.sharding import Partial, Replicate, Shard
    from meshweave.passes.parallel.strategies.axis import axis_strategies
    from meshweave.passes.parallel.strategies.node_strategies import concrete_types

    graph = moe_tiny[2]
    types = concrete_types(graph)
    n = _moe_nodes(graph)[0]
    by_tag = {s.tag: s for s in axis_strategies(n, types)}
    assert set(by_tag) == {"batch", "ep", "row", "R"}
    s0, r, p = Shard(0), Replicate(), Partial()
    assert by_tag["batch"].ins == (s0, s0, s0, r, r, r) and by_tag["batch"].outs == (s0, r)
    assert by_tag["ep"].ins == (s0,) * 6 and by_tag["ep"].outs == (s0, r)
    # kn layout: w_in/w_gate [E, d, f] split on f (dim 2), w_out [E, f, d] on dim 1
    assert by_tag["row"].ins == (r, r, r, Shard(2), Shard(2), Shard(1))
    assert by_tag["row"].outs == (p, r)
    capped = Node(n.op, n.args, {**n.kwargs, "capacity_factor": 1.25}, n.outputs)
    by_tag = {s.tag: s for s in axis_strategies(capped, types)}
    assert by_tag["ep"].outs == (s0, p) and by_tag["row"].outs == (p, r)


def test_ep_axis_pins_experts_and_keeps_the_rest_data_parallel(moe_tiny):
    """On an "ep" axis moe.experts splits its experts (and tokens), every parameter of the
    dense ops stays replicated, activations are batch-split, and the only collective over the
    axis is the MoE token exchange; the rank program runs it as moe.experts_ep."""
    from meshweave.passes.parallel.lower.rank import lower_for_rank
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan

    graph = moe_tiny[2]
    plan = megatron_plan(graph, 1, 1, 1, batch=BATCH, ep=4)
    assert plan.mesh.names == ("dp", "ep", "tp") and plan.mesh.shape == (1, 4, 1)
    experts = set()
    for n in _moe_nodes(graph):
        ins = plan.input_placements[n.outputs[0].name]
        assert [pl[1] for pl in ins] == ["S(0)"] * 6, ins
        experts |= {v.name for v in n.args[3:6]}
    for v in graph.inputs:
        if v.kind == "param" and v.name not in experts:
            assert plan.placement_of(v.name)[1].__class__.__name__ == "Replicate", v.name
    assert plan.placements[graph.outputs[0].name][1] == "S(0)"
    moe_out = {n.outputs[0].name for n in _moe_nodes(graph)}
    on_ep = [c for c in plan.collectives if c.axis == "ep"]  # the token exchange, if recorded
    assert all(c.kind == "all_to_all" and c.value in moe_out for c in on_ep), on_ep
    prog = lower_for_rank(graph, plan, 2)
    ep_nodes = [n for n in prog.nodes if n.op == "moe.experts_ep"]
    assert len(ep_nodes) == 2 and not _moe_nodes(prog)
    for n in ep_nodes:
        assert n.kwargs["group"] == [0, 1, 2, 3] and n.kwargs["num_experts"] == 4
        assert n.args[3].type.shape[0] == 1  # one local expert
        assert n.args[0].type.shape[0] == BATCH * SEQ // 4  # a quarter of the tokens


def test_ep_degree_must_divide_the_experts(moe_tiny):
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan
    from meshweave.passes.parallel.strategies.moe_rules import ExpertParallelError

    with pytest.raises(ExpertParallelError,
                       match=r"ep=3 does not divide the 4 experts of moe.experts %\w+ "
                             r"\(from .*models/moe.py:\d+"):
        megatron_plan(moe_tiny[2], 1, 1, 1, batch=6, ep=3)


def test_ep_axis_on_a_dense_model_is_an_error(capsys):
    from meshweave.cli import main

    assert main(["run", "--model", "llama-tiny", "--mesh", "ep=2", "--seq", "8"]) == 2
    err = capsys.readouterr().err
    assert "has an 'ep' axis (expert parallelism), but graph" in err
    assert "no moe.experts node" in err and "dp=2" in err


# ------------------------------------------------------------------ gloo ranks vs one device
RUN_CASES = [
    ("ep=4", {"ep": 4}),
    ("dp=2,ep=2 --train", {"dp": 2, "ep": 2, "training": True}),
    ("ep=2,tp=2", {"ep": 2, "tp": 2}),
    ("ep=2,tp=2 --train", {"ep": 2, "tp": 2, "training": True}),
]


def _run_and_compare(traced, model_name: str, mesh: str, **fields):
    from meshweave.runtime.distributed.runner import (
        RunSpec, compare, prepare, run_distributed, run_single_device)

    spec = RunSpec(model_name, batch=BATCH, seq=SEQ, timeout_s=60, **fields)
    job = prepare(spec, traced=traced)
    got = run_distributed(job)
    errs = compare(run_single_device(job), got)
    cmd = (f"meshweave run --model {model_name} --mesh {mesh.split()[0]} --batch {BATCH} "
           f"--seq {SEQ}{' --train' if spec.training else ''} --check")
    for key, tol in (("outputs", 1e-4), ("loss", 1e-4), ("params", 1e-5)):
        if key in errs:
            assert errs[key] <= tol, f"{key} off by {errs[key]:.3e}: {cmd}"
    return job, got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mesh,fields", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_expert_parallel_runs_match_one_device(moe_tiny, mesh, fields):
    job, got = _run_and_compare(moe_tiny, "moe-tiny", mesh, **fields)
    if fields.get("training"):
        assert len(got.losses) == 2 and got.losses[1] < got.losses[0]
        # the experts were trained: each rank holds and updates only its own experts
        w = "layers.0.moe.experts.w_in"
        assert not torch.equal(got.params[w], job.model_state[w])
        ep = fields["ep"]
        assert {r.params["p_layers_0_moe_experts_w_in"].shape[0] for r in got.ranks} == {4 // ep}


@pytest.mark.timeout(120)
def test_skewed_routing_is_dropless_under_ep(moe_tiny):
    """A zero router gives every token the same two experts (2 and 3: both on ep rank 1);
    rank 0's experts get no token. Dropless: training still matches one device exactly."""
    from meshweave.runtime.distributed.runner import _compiled_graph

    model, inputs, _ = moe_tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.router.gate.weight.zero_()
        d = model.layers[0].moe_norm.weight.shape[0]
        combine = model.layers[0].moe.router(torch.randn(5, d))
        assert (combine[:, :2] == 0).all()  # experts 0 and 1: no combine weight for any token
        graph = _compiled_graph(model, tuple(inputs))
        if not _moe_nodes(graph):
            from meshweave.passes.moe import recognize_moe

            graph = recognize_moe(graph)
    try:
        _run_and_compare((model, inputs, graph), "moe-tiny", "ep=2 --train (zero router)",
                         ep=2, training=True)
    finally:
        model.load_state_dict(state)


@pytest.mark.timeout(120)
def test_capacity_factor_counts_drops_as_a_partial_sum(moe_tiny):
    """With a capacity factor the dropped count is a partial sum over the token-splitting
    axes (batch dims still tracked past it); a factor that drops nothing (cap = 2 T_l >= T_l,
    the most one expert can get) matches the dropless model in training."""
    from meshweave.passes.parallel.strategies.node_strategies import infer_batch_dims

    graph = moe_tiny[2]
    nodes = _moe_nodes(graph)
    try:
        for n in nodes:
            n.kwargs["capacity_factor"] = 4.0
        assert not infer_batch_dims(graph).lost_at
        job, _ = _run_and_compare(moe_tiny, "moe-tiny", "dp=2,ep=2 --train (capacity 4)",
                                  dp=2, ep=2, training=True)
        dropped = [job.plan.placements[n.outputs[1].name] for n in nodes]
        assert dropped == [("P", "P", "R")] * 2
    finally:
        for n in nodes:
            n.kwargs["capacity_factor"] = None


@pytest.mark.timeout(120)
def test_searched_plan_splits_experts_over_two_axes(moe_tiny, tmp_path):
    """plan_parallel on a (dp, ep) mesh may split the experts over both axes (one each on 4
    ranks): the rank programs exchange tokens over the flattened dp x ep group."""
    from meshweave.ir.mesh import DeviceMesh
    from meshweave.passes.parallel.lower.rank import lower_for_rank
    from meshweave.passes.parallel.search.search import plan_parallel

    plan = plan_parallel(moe_tiny[2], DeviceMesh((2, 2), ("dp", "ep")), "cpu", batch=BATCH,
                         time_budget=5)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    prog = lower_for_rank(moe_tiny[2], plan, 3)
    for n in (n for n in prog.nodes if n.op == "moe.experts_ep"):
        assert n.kwargs["axis"] in ("ep", "dp,ep")
        assert n.kwargs["group"] == ([2, 3] if n.kwargs["axis"] == "ep" else [0, 1, 2, 3])
    _run_and_compare(moe_tiny, "moe-tiny", f"--plan-file {path}", plan="file",
                     plan_file=str(path))


# ------------------------------------------------------------------ the commands users run
@pytest.mark.timeout(150)
@pytest.mark.parametrize("argv", [
    ["--model", "moe-tiny", "--mesh", "ep=4"],
    ["--model", "hf:mixtral", "--mesh", "ep=2,tp=2", "--train"],
], ids=["moe-tiny ep=4", "mixtral ep=2,tp=2 train"])
def test_meshweave_run_check(argv, capsys):
    """`meshweave run ... --check` as a user runs it: traced through the default pipeline
    (passes/moe recognises the blocks), planned, run on gloo ranks, compared with one device.
    HF Mixtral's fused gate_up_proj is cut half by half under expert slicing."""
    if argv[1].startswith("hf:"):
        pytest.importorskip("transformers")
    from meshweave.cli import main

    code = main(["run", *argv, "--seq", "16", "--check"])
    out = capsys.readouterr().out
    assert code == 0, f"meshweave run {' '.join(argv)} --check\n{out[-2000:]}"
    assert "check passed" in out and "(dp, ep, tp)" in out


@pytest.mark.parametrize("dp,ep,tp", [(1, 4, 1), (2, 2, 1), (1, 2, 2)],
                         ids=["ep", "dpxep", "epxtp"])
def test_simulated_ranks_match_the_graph(moe_tiny, dp, ep, tp):
    """simulate_plan (every rank's program in one process) runs moe.experts_ep as a
    collective over its group: the lowering's oracle agrees with the reference executor."""
    from meshweave.passes.parallel.lower.simulate import simulate_plan
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan
    from meshweave.runtime.reference import run_graph

    _, inputs, graph = moe_tiny
    plan = megatron_plan(graph, dp, tp, 1, batch=BATCH, ep=ep)
    want = run_graph(graph, inputs)[0]
    got = simulate_plan(graph, plan, inputs)[0]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def _aux_rank(rank, world, cm, x, want):
    import torch.nn.functional as F

    logits, aux = cm(x)
    (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)) + aux).backward()
    grads = {n: p.grad for n, p in cm.named_parameters()}
    return float(aux.detach()), {n: float((g - want[n]).abs().max())
                                 for n, g in grads.items() if g.shape == want[n].shape}


def test_the_load_balancing_loss_trains_under_expert_parallelism():
    """moe-tiny with its load-balancing loss on ep=2 (compile(mesh=...), 2 gloo ranks): the
    experts are split over the ranks, the loss of the whole batch is the same on both, and
    cross-entropy + loss gives eager's gradients on the router and every replicated weight."""
    import copy

    import torch.nn.functional as F

    import meshweave
    from meshweave.models import build_model
    from meshweave.runtime.distributed.launch import launch

    model, (x,) = build_model("moe-tiny", batch=4, seq=8, router_aux_loss_coef=0.01)
    ref = copy.deepcopy(model)
    logits, aux = ref(x)
    (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)) + aux).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("ep",)), training=True))
    assert sum(n.op.startswith("moe.experts") for n in cm.graph.nodes) == 2
    for got, errs in launch(_aux_rank, 2, (cm, x, want), timeout_s=120):
        assert abs(got - float(aux)) < 1e-7, (got, float(aux))
        assert "layers.0.moe.router.gate.weight" in errs and max(errs.values()) < 1e-6, errs
