"""Tests of the parallel planner's solver core on synthetic costs with known optima.

Covers ir/mesh.py and passes/parallel/{hardware, collectives, ilp*, clustering, pipeline*,
optimizer_shard}.py. Everything here is hardware- and graph-free: costs in, plan out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.passes.parallel.intra_op.clustering import cluster_layers, expand_clusters
from meshweave.passes.parallel.cost.collectives import (
    collective_time,
    link_for_axis,
    resharding_cost,
    resharding_cost_multi,
)
from meshweave.passes.parallel.cost.hardware import (
    LinkSpec,
    get_spec,
    list_presets,
    load_spec,
    save_spec,
)
from meshweave.passes.parallel.intra_op.ilp import (
    IntraOpProblem,
    NoFeasiblePlanError,
    Strategy,
    brute_force_solve,
    min_memory,
    solve_intra_op,
)
from meshweave.passes.parallel.cost.optimizer_shard import (
    activation_memory,
    inflight_microbatches,
    param_training_memory,
    params_training_memory,
)
from meshweave.passes.parallel.search.pipeline import (
    StageCostTable,
    alpa_submesh_shapes,
    brute_force_pipeline,
    pipeline_latency,
    plan_pipeline,
)

R, S0, S1, P = Replicate(), Shard(0), Shard(1), Partial()
EXACT = 1e-9  # MIP gap used when comparing with brute force


# ---------------------------------------------------------------------------------- mesh
def test_mesh_basics_and_groups():
    m = DeviceMesh.parse("2x4")
    assert (m.shape, m.size, m.ndim, m.devices) == ((2, 4), 8, 2, tuple(range(8)))
    assert m.groups(0) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.groups(1) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.rank_coords(6) == (1, 2) and m.coords_rank((1, 2)) == 6
    named = DeviceMesh.parse("dp=2, tp=4")
    assert named.axis_names == ("dp", "tp") and named.axis_size("tp") == 4
    assert named.axis_size(-2) == 2 and DeviceMesh.parse("dp:2 x tp:4") == named
    assert DeviceMesh.parse("2x4", axis_names=("dp", "tp")) == named


def test_mesh_submesh_keeps_global_ranks():
    m = DeviceMesh((2, 4), ("dp", "tp"))
    row = m.submesh(dp=1)
    assert row.shape == (4,) and row.devices == (4, 5, 6, 7) and row.axis_names == ("tp",)
    block = m.submesh({"tp": slice(2, 4)})
    assert block.shape == (2, 2) and block.devices == (2, 3, 6, 7)
    assert block.groups("dp") == [[2, 6], [3, 7]] and block.rank_coords(6) == (1, 0)
    assert DeviceMesh.from_json(block.to_json()) == block
    assert DeviceMesh.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DeviceMesh((2, 0)), "positive"),
        (lambda: DeviceMesh((2, -1)), "positive"),
        (lambda: DeviceMesh(()), "at least one axis"),
        (lambda: DeviceMesh((2, 4), ("dp",)), "1 axis names"),
        (lambda: DeviceMesh((2, 4), ("a", "a")), "duplicate"),
        (lambda: DeviceMesh.parse("2xq"), "cannot parse"),
        (lambda: DeviceMesh.parse(""), "empty"),
        (lambda: DeviceMesh.parse("0x4"), "positive"),
        (lambda: DeviceMesh((2,), device_ids=(0, 0)), "distinct"),
    ],
)
def test_mesh_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mesh_axis_lookup_errors():
    m = DeviceMesh((2, 4), ("dp", "tp"))
    with pytest.raises(KeyError, match="no axis named 'pp'"):
        m.axis_size("pp")
    with pytest.raises(IndexError):
        m.axis_size(2)


# ------------------------------------------------------------------------------ hardware
def test_hardware_presets_and_json_roundtrip(tmp_path):
    assert {"h100", "h200", "a100", "ascend910", "cpu"} <= set(list_presets())
    h100 = get_spec("H100")
    assert h100.peak_flops("torch.bfloat16") == pytest.approx(989e12)
    assert get_spec("ascend910").memory_bytes == 32 * 2**30
    with pytest.raises(ValueError, match="bfloat16"):
        get_spec("ascend910").peak_flops("bf16")
    path = tmp_path / "hw.json"
    save_spec(h100, path)
    assert load_spec(path) == h100 and get_spec(str(path)) == h100


def test_compute_time_adds_the_kernel_latency():
    import dataclasses

    h100 = get_spec("h100")
    bare = dataclasses.replace(h100, kernel_latency_s=0.0)
    flops, nbytes = 2 * 4096**3, 3 * 2 * 4096**2
    assert h100.kernel_latency_s > 0  # measured on an H200 (RESULTS.md)
    assert h100.compute_time(flops, nbytes, "float16") == pytest.approx(
        bare.compute_time(flops, nbytes, "float16") + h100.kernel_latency_s)
    # a tiny op costs at least the latency, however small its roofline time
    assert h100.compute_time(10, 10, "float16") >= h100.kernel_latency_s
    with pytest.raises(ValueError, match="kernel_latency_s must be in"):
        dataclasses.replace(h100, kernel_latency_s=-1e-6)
    with pytest.raises(ValueError, match="kernel_latency_s must be in"):
        dataclasses.replace(h100, kernel_latency_s=0.5)


def test_hardware_unknown_name_lists_presets():
    with pytest.raises(ValueError, match="a100.*ascend910.*cpu.*h100.*h200"):
        get_spec("tpu-v9")


# --------------------------------------------------------------------------- collectives
LINK = LinkSpec(latency_s=1e-5, bandwidth_Bps=1e10)


def test_collective_efficiency_per_kind_and_its_json_round_trip(tmp_path):
    from meshweave.passes.parallel.cost.hardware import get_spec, load_spec, save_spec

    slow_rs = LinkSpec(1e-5, 1e10, (("reduce_scatter", 0.25),))
    nb, n = 1e8, 4
    assert collective_time("reduce_scatter", nb, n, slow_rs) == pytest.approx(3e-5 + 0.03)
    assert collective_time("all_gather", nb, n, slow_rs) == collective_time(
        "all_gather", nb, n, LINK)  # kinds without a measured efficiency keep the ring model
    spec = dataclasses.replace(get_spec("cpu"), intra_node=slow_rs)
    save_spec(spec, tmp_path / "spec.json")
    assert load_spec(tmp_path / "spec.json").intra_node == slow_rs
    with pytest.raises(ValueError, match="efficiencies must be positive"):
        LinkSpec(1e-5, 1e10, (("all_gather", 0.0),))


def test_calibration_fit_recovers_alpha_beta_and_efficiency():
    from meshweave.passes.parallel.cost.calibrate import _LINK_CASES, fit_link

    alpha, beta = 40e-6, 2e9  # what the "measured" times below are made of
    times = []
    for kind, n in _LINK_CASES:
        b = 4 * n
        if kind == "all_reduce":
            times.append(2 * alpha + b / beta)
        else:  # these two run at half and a third of the ring bandwidth
            eff = 0.5 if kind == "all_gather" else 1 / 3
            times.append(alpha + (b / 2) / (beta * eff))
    link = fit_link(_LINK_CASES, times)
    assert link.latency_s == pytest.approx(alpha, rel=1e-6)
    assert link.bandwidth_Bps == pytest.approx(beta, rel=1e-6)
    assert dict(link.efficiency) == pytest.approx({"all_gather": 0.5, "reduce_scatter": 1 / 3})


def test_collective_alpha_beta_by_hand():
    nb, n = 1e8, 4  # 100 MB over 4 devices: bandwidth term of one full pass = 0.01 s
    assert collective_time("all_reduce", nb, n, LINK) == pytest.approx(6e-5 + 2 * 0.75 * 0.01)
    assert collective_time("all_gather", nb, n, LINK) == pytest.approx(3e-5 + 0.75 * 0.01)
    assert collective_time("reduce_scatter", nb, n, LINK) == pytest.approx(3e-5 + 0.0075)
    assert collective_time("all_to_all", nb, n, LINK) == pytest.approx(3e-5 + 0.0075)
    assert collective_time("send_recv", nb, n, LINK) == pytest.approx(1e-5 + 0.01)
    assert collective_time("all_reduce", nb, 1, LINK) == 0.0
    with pytest.raises(ValueError, match="unknown collective"):
        collective_time("broadcastish", nb, n, LINK)


def test_link_for_axis_follows_node_boundaries():
    spec = get_spec("h100")  # 8 devices per node
    m = DeviceMesh((2, 8))
    assert link_for_axis(m, 1, spec) == spec.intra_node
    assert link_for_axis(m, 0, spec) == spec.inter_node
    m44 = DeviceMesh((4, 4))  # rows of 4 inside a node; columns span two nodes
    assert link_for_axis(m44, 1, spec) == spec.intra_node
    assert link_for_axis(m44, 0, spec) == spec.inter_node
    assert link_for_axis(DeviceMesh((2, 4)), 0, spec) == spec.intra_node


def test_resharding_single_axis_cases():
    nb, n = 1e8, 4
    assert resharding_cost(R, S0, nb, n, LINK) == 0.0
    assert resharding_cost(S1, S1, nb, n, LINK) == 0.0
    assert resharding_cost(S0, R, nb, n, LINK) == collective_time("all_gather", nb, n, LINK)
    assert resharding_cost(P, R, nb, n, LINK) == collective_time("all_reduce", nb, n, LINK)
    assert resharding_cost(P, S1, nb, n, LINK) == collective_time("reduce_scatter", nb, n, LINK)
    assert resharding_cost(S0, S1, nb, n, LINK) == pytest.approx(3e-5 + 0.75 * 0.0025)
    assert math.isinf(resharding_cost(R, P, nb, n, LINK))
    assert math.isinf(resharding_cost(S0, P, nb, n, LINK))
    assert resharding_cost(R, P, nb, 1, LINK) == 0.0


def test_resharding_multi_axis_sizes_and_order():
    spec = get_spec("h100")
    mesh = DeviceMesh((2, 4))  # one node: both axes on the intra-node link
    link, nb = spec.intra_node, 8e8
    # S(0),S(1) -> R,R: gather axis 0 (local nb/8 -> nb/4) then axis 1 (-> nb).
    want = collective_time("all_gather", nb / 4, 2, link) + collective_time("all_gather", nb, 4, link)
    assert resharding_cost_multi((S0, S1), (R, R), nb, mesh, spec) == pytest.approx(want)
    # P,R -> R,S(0): slice on axis 1 first, so the all-reduce moves nb/4, not nb.
    want = collective_time("all_reduce", nb / 4, 2, link)
    assert resharding_cost_multi((P, R), (R, S0), nb, mesh, spec) == pytest.approx(want)
    assert math.isinf(resharding_cost_multi((R, R), (P, R), nb, mesh, spec))
    with pytest.raises(ValueError, match="placements per side"):
        resharding_cost_multi((R,), (R, R), nb, mesh, spec)


# ----------------------------------------------------------------------------------- ILP
def random_problem(
    rng: np.random.Generator, n: int, smax: int = 4, inf_p: float = 0.1, p_edge: float = 0.35
):
    pr = IntraOpProblem()
    for v in range(n):
        k = int(rng.integers(1, smax + 1))
        strategies = [
            Strategy(f"s{i}", float(rng.random()), float(rng.random() * 0.5),
                     float(rng.integers(1, 10)))
            for i in range(k)
        ]
        pr.add_node(v, strategies, weight=float(rng.integers(1, 3)))
    for u, v in itertools.combinations(range(n), 2):
        if v == u + 1 or rng.random() < p_edge:
            c = rng.random((len(pr.nodes[u].strategies), len(pr.nodes[v].strategies)))
            if c.shape[0] > 1:
                c[-1] = c[0]  # duplicate rows/columns exercise the edge compression
            c[rng.random(c.shape) < inf_p] = np.inf
            pr.add_edge(u, v, c)
    return pr


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pr = random_problem(rng, n=int(rng.integers(3, 8)))
    if seed % 3:
        pr.memory_budget = float(rng.integers(15, 60))
    try:
        ref = brute_force_solve(pr)
    except NoFeasiblePlanError as e:
        with pytest.raises(NoFeasiblePlanError) as got:
            solve_intra_op(pr, mip_rel_gap=EXACT)
        if e.min_memory_bytes is not None:
            assert got.value.min_memory_bytes == pytest.approx(e.min_memory_bytes)
        return
    for simplify in (True, False):
        sol = solve_intra_op(pr, mip_rel_gap=EXACT, simplify=simplify)
        assert sol.objective == pytest.approx(ref.objective, rel=1e-7)
        assert pr.evaluate(sol.choice)["objective"] == pytest.approx(sol.objective)
        if pr.memory_budget is not None:
            assert sol.memory_bytes <= pr.memory_budget + 1e-6


def test_ilp_default_gap_and_exact_agree_on_medium_problem():
    rng = np.random.default_rng(1)
    pr = random_problem(rng, n=60, smax=6, inf_p=0.0, p_edge=0.03)
    free = solve_intra_op(pr)
    pr.memory_budget = 0.5 * (min_memory(pr) + free.memory_bytes)
    exact = solve_intra_op(pr, mip_rel_gap=EXACT)
    quick = solve_intra_op(pr)  # default 1e-3 gap: LP bound + LP-guided plan
    assert exact.status == quick.status == "optimal"
    assert exact.objective <= quick.objective <= exact.objective * (1 + 1e-3) + 1e-12
    assert quick.memory_bytes <= pr.memory_budget * (1 + 1e-9)
    assert exact.stats["lp_bound"] <= exact.objective * (1 + 1e-9)


def test_ilp_respects_pins():
    rng = np.random.default_rng(7)
    pr = random_problem(rng, n=6, smax=4, inf_p=0.0)
    free = solve_intra_op(pr, mip_rel_gap=EXACT)
    node = next(n for n in pr.nodes if len(n.strategies) > 1)
    pin = (free.choice[node.name] + 1) % len(node.strategies)
    pr.pins = {node.name: pin}
    sol = solve_intra_op(pr, mip_rel_gap=EXACT)
    assert sol.choice[node.name] == pin
    assert sol.objective == pytest.approx(brute_force_solve(pr).objective, rel=1e-7)
    assert sol.objective >= free.objective - 1e-12


def test_ilp_respects_memory_budget():
    # Two nodes, each fast-but-big (mem 10) or slow-but-small (mem 1); budget 12 allows one.
    pr = IntraOpProblem()
    for name, fast in (("a", 1.0), ("b", 2.0)):
        pr.add_node(name, [Strategy("fast", fast, 0, 10), Strategy("small", 5.0, 0, 1)])
    pr.add_edge("a", "b", np.zeros((2, 2)))
    assert solve_intra_op(pr).objective == pytest.approx(3.0)
    pr.memory_budget = 12
    sol = solve_intra_op(pr, mip_rel_gap=EXACT)
    # Keeping "a" fast saves 4 s, keeping "b" fast only 3 s.
    assert sol.choice == {"a": 0, "b": 1} and sol.objective == pytest.approx(6.0)
    assert sol.memory_bytes == 11
    pr.memory_budget = 2
    assert solve_intra_op(pr).choice == {"a": 1, "b": 1}


def test_ilp_infeasible_reports_min_memory():
    rng = np.random.default_rng(3)
    pr = random_problem(rng, n=7, inf_p=0.15)
    need = brute_force_solve(pr).memory_bytes
    ref_min = min(  # brute-force min memory over finite-cost assignments
        pr.evaluate(dict(enumerate(c)))["memory_bytes"]
        for c in itertools.product(*(range(len(n.strategies)) for n in pr.nodes))
        if math.isfinite(pr.evaluate(dict(enumerate(c)))["objective"])
    )
    assert ref_min <= need
    assert min_memory(pr) == pytest.approx(ref_min)
    pr.memory_budget = ref_min - 0.5
    with pytest.raises(NoFeasiblePlanError, match=f"{ref_min:.6g} bytes") as err:
        solve_intra_op(pr)
    assert err.value.min_memory_bytes == pytest.approx(ref_min)
    assert err.value.memory_budget == ref_min - 0.5
    pr.memory_budget = ref_min
    assert solve_intra_op(pr).memory_bytes == pytest.approx(ref_min)


def test_ilp_conflicting_pins_raise():
    pr = IntraOpProblem()
    pr.add_node("a", [Strategy("x", 1), Strategy("y", 1)])
    pr.add_node("b", [Strategy("x", 1), Strategy("y", 1)])
    pr.add_edge("a", "b", [[0, np.inf], [np.inf, 0]])
    pr.pins = {"a": 0, "b": 1}
    with pytest.raises(NoFeasiblePlanError, match="infinite cost"):
        solve_intra_op(pr)


def test_ilp_validation_errors():
    pr = IntraOpProblem()
    pr.add_node("a", [Strategy("x", 1)])
    pr.add_edge("a", "zz", [[0.0]])
    with pytest.raises(ValueError, match="not a node"):
        solve_intra_op(pr)


def test_ilp_chain_without_budget_is_solved_by_preprocessing():
    rng = np.random.default_rng(11)
    pr = IntraOpProblem()
    for v in range(60):
        pr.add_node(v, [Strategy(str(i), float(rng.random())) for i in range(5)])
        if v:
            pr.add_edge(v - 1, v, rng.random((5, 5)))
    sol = solve_intra_op(pr)
    assert sol.status == "trivial" and sol.stats["nodes_after"] == 0
    # Same optimum as the MILP on the unreduced problem.
    assert sol.objective == pytest.approx(
        solve_intra_op(pr, simplify=False, mip_rel_gap=EXACT).objective, rel=1e-7)


# ---------------------------------------------------------------------------- clustering
def test_cluster_layers_runs_and_periods():
    fps = ["emb"] + ["blk"] * 5 + ["head"]
    cl = cluster_layers(fps)
    assert [(c.start, c.period, c.repeats) for c in cl] == [(0, 1, 1), (1, 1, 5), (6, 1, 1)]
    alt = ["a", "b"] * 4 + ["c"]
    cl2 = cluster_layers(alt, max_period=2)
    assert [(c.start, c.period, c.repeats) for c in cl2] == [(0, 2, 4), (8, 1, 1)]
    assert expand_clusters(cl2, [["A", "B"], ["C"]]) == ["A", "B"] * 4 + ["C"]
    assert sum(c.num_layers for c in cl2) == len(alt)


def transformer_block(pr: IntraOpProblem, layer: int, weight: float, rng_seed: int = 0):
    """Six nodes with 4-6 strategies each; the same costs for every layer (15-38 bytes)."""
    rng = np.random.default_rng(rng_seed)
    sizes = [4, 6, 4, 6, 4, 5]
    names = [f"L{layer}.n{i}" for i in range(len(sizes))]
    for name, k in zip(names, sizes):
        pr.add_node(name, [Strategy(str(i), float(rng.random()), float(rng.random() * 0.2),
                                    float(rng.integers(1, 8))) for i in range(k)], weight)
    for (u, ku), (v, kv) in zip(zip(names, sizes), zip(names[1:], sizes[1:])):
        pr.add_edge(u, v, rng.random((ku, kv)) * 0.5)
    pr.add_edge(names[0], names[3], rng.random((sizes[0], sizes[3])) * 0.5)  # residual
    return names, sizes


def chain_problem(n_layers: int, weight: float = 1.0, budget_per_layer: float = 20.0):
    pr = IntraOpProblem(memory_budget=budget_per_layer * n_layers * weight)
    prev = None
    for layer in range(n_layers):
        names, sizes = transformer_block(pr, layer, weight)
        if prev is not None:
            pr.add_edge(prev, names[0], np.random.default_rng(1).random((sizes[-1], sizes[0])))
        prev = names[-1]
    return pr


def _milp_size(problem: IntraOpProblem) -> int:
    """Variables of the MILP before reductions: one per node strategy, one per edge pair."""
    return sum(len(n.strategies) for n in problem.nodes) + sum(
        e.cost.size for e in problem.edges
    )


def test_clustered_96_layers_solve_as_a_problem_of_one_layer():
    """Clustering makes 96 layers one representative: the MILP HiGHS sees is the size of one
    layer, smaller than the 4-layer chain's, not of 96 (sizes, not wall time, on CI)."""
    four = solve_intra_op(chain_problem(4))
    # One representative block standing for 96 layers; the layer-to-layer edge closes the
    # loop with weight 95 (it occurs between each consecutive pair).
    rep = chain_problem(1, weight=96)
    names = [n.name for n in rep.nodes]
    back = np.random.default_rng(1).random((len(rep.nodes[-1].strategies),
                                            len(rep.nodes[0].strategies)))
    rep.add_edge(names[-1], names[0], back, weight=95)
    sol = solve_intra_op(rep)
    assert four.status in ("optimal", "trivial") and sol.status in ("optimal", "trivial")
    size_rep, size_four = _milp_size(rep), _milp_size(chain_problem(4))
    size_96 = _milp_size(chain_problem(96))
    assert size_rep < size_four / 3 and size_96 > 20 * size_rep, (size_rep, size_four, size_96)
    if "variables" in sol.stats and "variables" in four.stats:  # after the exact reductions
        assert sol.stats["variables"] < four.stats["variables"], (sol.stats, four.stats)
    # Replicating the representative's choice over the explicit 96-layer problem gives the
    # same objective and memory: the weights count every layer and every link.
    full = chain_problem(96)
    clusters = cluster_layers(["block"] * 96)
    per_layer = expand_clusters(clusters, [[[sol.choice[n] for n in names]]])
    choice = {f"L{layer}.n{i}": c for layer, cs in enumerate(per_layer) for i, c in enumerate(cs)}
    ev = full.evaluate(choice)
    assert ev["objective"] == pytest.approx(sol.objective)
    assert ev["memory_bytes"] == pytest.approx(sol.memory_bytes)


# ------------------------------------------------------------------------------ pipeline
def random_stage_costs(rng: np.random.Generator, n_layers: int):
    lt, lw, la = rng.random(n_layers) + 0.2, rng.random(n_layers), rng.random(n_layers)
    exps = rng.uniform(0.6, 1.0, size=(n_layers, n_layers + 1, 8))
    holes = rng.random((n_layers, n_layers + 1, 8)) < 0.05

    def cost(start, end, shape, b):
        d = shape[0] * shape[1]
        j = int(math.log2(d))
        if holes[start, end, j]:
            return (math.inf, 0.0, 0.0)
        t = lt[start:end].sum() / b / d ** exps[start, end, j] + 0.02 * (d > 1) * shape[0]
        return (t, lw[start:end].sum() / d, la[start:end].sum() / d / b)

    return cost


@pytest.mark.parametrize("seed", range(10))
def test_pipeline_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(2, 6))
    cluster = [(1, 4), (2, 2), (1, 2), (2, 4)][seed % 4]
    shapes = alpa_submesh_shapes(*cluster)
    batches = (1, 2, 4, 8)
    cost = random_stage_costs(rng, n_layers)
    tables = {b: StageCostTable.from_function(cost, n_layers, shapes, b) for b in batches}
    budget = float(rng.uniform(0.3, 2.5))
    try:
        ref = brute_force_pipeline(tables, n_layers, cluster, batches, budget)
    except NoFeasiblePlanError:
        with pytest.raises(NoFeasiblePlanError):
            plan_pipeline(tables, n_layers, cluster, batches, budget)
        return
    plan = plan_pipeline(tables, n_layers, cluster, batches, budget)
    assert plan.latency == pytest.approx(ref.latency, rel=1e-9)
    assert plan.latency == pytest.approx(pipeline_latency([s.time for s in plan.stages],
                                                          plan.num_microbatches))
    assert plan.compute_time + plan.bubble_time == pytest.approx(plan.latency)
    assert plan.stages[0].layers[0] == 0 and plan.stages[-1].layers[1] == n_layers
    devices = sorted(d for s in plan.stages for d in s.device_ids)
    assert devices == list(range(cluster[0] * cluster[1]))
    assert all(s.memory_bytes <= budget * (1 + 1e-9) for s in plan.stages)


def test_pipeline_1f1b_needs_less_memory_than_gpipe():
    # 4 equal layers on 4 devices, sub-linear speed-up from wider stages, so 4 one-layer
    # stages win. Activations dominate memory: GPipe holds B=8 micro-batches everywhere,
    # 1F1B min(8, 4 - i) on stage i, so only 1F1B fits the budget.
    def cost(start, end, shape):
        n = end - start
        return (n / (shape[0] * shape[1]) ** 0.5, 0.1 * n, 0.5 * n)

    kwargs = {"num_microbatches": (8,), "memory_budget": 2.2}
    plan = plan_pipeline(cost, 4, (1, 4), **kwargs)
    assert plan.schedule == "1f1b" and plan.num_stages == 4
    assert [s.inflight_microbatches for s in plan.stages] == [4, 3, 2, 1]
    assert plan.latency == pytest.approx(4 * 1.0 + 7 * 1.0)
    assert plan.bubble_time == pytest.approx(3.0)
    with pytest.raises(NoFeasiblePlanError):
        plan_pipeline(cost, 4, (1, 4), schedules=("gpipe",), **kwargs)
    loose = plan_pipeline(cost, 4, (1, 4), schedules=("gpipe",), num_microbatches=(8,),
                          memory_budget=None)
    assert loose.latency == pytest.approx(plan.latency)


def test_pipeline_submesh_placement():
    # Stage sub-meshes of different shapes tile a 2-node x 4-device cluster.
    def cost(start, end, shape):
        return ((end - start) / (shape[0] * shape[1]) ** 0.5, 0.0)

    plan = plan_pipeline(cost, 6, DeviceMesh((2, 4), ("node", "gpu")), (1, 4, 16))
    assert sum(math.prod(s.submesh_shape) for s in plan.stages) == 8
    for s in plan.stages:
        assert s.mesh.shape == s.submesh_shape and s.mesh.axis_names == ("node", "gpu")
    assert sorted(d for s in plan.stages for d in s.device_ids) == list(range(8))


# ---------------------------------------------------------------------- optimizer_shard
def test_param_memory_adam_mixed_precision_and_zero1():
    mesh = DeviceMesh((2, 4), ("dp", "tp"))
    n = 1_000_000
    rep = param_training_memory(n, (R, R), mesh)  # bf16 weights+grads, fp32 master+m+v
    assert (rep.weights, rep.grads, rep.master_weights, rep.optimizer_moments) == (
        2e6, 2e6, 4e6, 8e6)
    assert rep.total == 16e6
    tp = param_training_memory(n, (R, S0), mesh)
    assert tp.total == 4e6
    z = param_training_memory(n, (R, S0), mesh, zero1=True, dp_axis="dp")
    assert (z.weights, z.grads, z.optimizer_states) == (5e5, 5e5, 12 * 250_000 / 2)
    fsdp = param_training_memory(n, (S0, R), mesh, zero1=True, dp_axis="dp")
    assert fsdp.optimizer_states == 12e6 / 2  # already sharded over dp: ZeRO adds nothing
    fp32 = param_training_memory(n, (R, R), mesh, param_bytes=4)
    assert fp32.master_weights == 0 and fp32.total == 16e6
    both = params_training_memory([(n, (R, R)), (n, (R, S0))], mesh)
    assert both.total == rep.total + tp.total
    with pytest.raises(ValueError, match="dp_axis"):
        param_training_memory(n, (R, R), mesh, zero1=True)
    with pytest.raises(ValueError, match="Partial"):
        param_training_memory(n, (P, R), mesh)


def test_activation_memory_and_recompute():
    acts = [4.0, 6.0, 5.0]
    assert activation_memory(acts, inflight=3) == 45.0
    assert activation_memory(acts, inflight=3, recompute=True, stage_input_bytes=1.0) == 9.0
    assert activation_memory(acts, inflight=0, recompute=True, stage_input_bytes=1.0) == 0.0
    assert inflight_microbatches("gpipe", 8, 4, 3) == 8
    assert [inflight_microbatches("1f1b", 8, 4, i) for i in range(4)] == [4, 3, 2, 1]
    assert inflight_microbatches("1f1b", 2, 4, 0) == 2
    with pytest.raises(ValueError, match="schedule"):
        inflight_microbatches("zb", 8, 4, 0)
