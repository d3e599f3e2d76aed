"""Alpa-style stage sub-meshes: the DP over several stage sizes, the search that uses it, and
the Plan it builds (per-stage mesh_shape and ranks)."""

from __future__ import annotations

import math
from itertools import combinations, product

import numpy as np
import pytest
from meshweave.ir.mesh import DeviceMesh
from meshweave.passes.parallel import Plan, plan_parallel
from meshweave.passes.parallel.cost.optimizer_shard import inflight_microbatches
from meshweave.passes.parallel.search.pipeline import (
    StageCostTable,
    brute_force_pipeline,
    partition_stages,
    pipeline_latency,
)
from meshweave.passes.parallel.search.submesh_search import (
    cluster_of,
    logical_meshes,
    placeable_sizes,
)


# ------------------------------------------------------------------ DP on synthetic costs
def _random_table(rng, n_layers: int, sizes: list[int], b: int) -> StageCostTable:
    """Columns of the given sizes; wider stages are faster (sub-linearly) and lighter, with
    random per-column efficiency so that two columns of one size differ."""
    lt = rng.uniform(0.5, 2.0, n_layers)
    lw = rng.uniform(0.1, 1.0, n_layers)
    shape = (n_layers, n_layers + 1, len(sizes))
    t, w, a = np.full(shape, np.inf), np.zeros(shape), np.zeros(shape)
    for j, d in enumerate(sizes):
        eff = rng.uniform(0.5, 1.0)
        for k in range(n_layers):
            for e in range(k + 1, n_layers + 1):
                t[k, e, j] = lt[k:e].sum() / b / d**eff + 0.05 * rng.random()
                w[k, e, j] = lw[k:e].sum() / d
                a[k, e, j] = lw[k:e].sum() / d / b
    return StageCostTable(tuple((1, d) for d in sizes), t, w, a)


def _exhaustive(tab: StageCostTable, sizes, n_dev, b, sched, budget) -> float:
    n_layers, best = tab.num_layers, math.inf
    for n_st in range(1, min(n_layers, n_dev) + 1):
        for inner in combinations(range(1, n_layers), n_st - 1):
            cuts = (0, *inner, n_layers)
            for cols in product(range(len(sizes)), repeat=n_st):
                if sum(sizes[m] for m in cols) != n_dev:
                    continue
                times, ok = [], True
                for i, m in enumerate(cols):
                    k, e = cuts[i], cuts[i + 1]
                    mem = tab.weight_memory[k, e, m] + inflight_microbatches(
                        sched, b, n_st, i) * tab.activation_memory[k, e, m]
                    ok &= budget is None or mem <= budget * (1 + 1e-9)
                    times.append(tab.time[k, e, m])
                if ok:
                    best = min(best, pipeline_latency(times, b))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_partition_over_sizes_matches_exhaustive(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(2, 6))
    sizes = [[1, 2, 2, 4], [2, 1, 3], [1, 1, 2], [2, 4, 4]][seed % 4]
    n_dev = [4, 5, 4, 8][seed % 4]
    b = int(rng.choice([1, 2, 4]))
    sched = ("1f1b", "gpipe")[seed % 2]
    tab = _random_table(rng, n_layers, sizes, b)
    budget = float(rng.uniform(0.3, 2.0)) if seed % 3 else None
    ref = _exhaustive(tab, sizes, n_dev, b, sched, budget)
    part = partition_stages({b: tab}, sizes, n_dev, budget, schedules=(sched,))
    if not math.isfinite(ref):
        assert part is None
        return
    assert part is not None and part.latency == pytest.approx(ref, rel=1e-9)
    assert sum(sizes[m] for _, _, m in part.stages) == n_dev
    times = [tab.time[k, e, m] for k, e, m in part.stages]
    assert pipeline_latency(times, b) == pytest.approx(part.latency, rel=1e-9)
    assert part.stages[0][0] == 0 and part.stages[-1][1] == n_layers


def test_partition_agrees_with_alpa_brute_force():
    # Alpa shapes (1, 1), (1, 2), (1, 4) of a 4-device node are the sizes 1, 2, 4.
    tabs = {b: _random_table(np.random.default_rng(7), 4, [1, 2, 4], b) for b in (1, 4)}
    ref = brute_force_pipeline(tabs, 4, (1, 4), (1, 4), 3.0,
                               submesh_shapes=[(1, 1), (1, 2), (1, 4)])
    part = partition_stages(tabs, [1, 2, 4], 4, 3.0)
    assert part is not None and part.latency == pytest.approx(ref.latency, rel=1e-9)


def test_partition_bound_and_bad_sizes():
    tab = _random_table(np.random.default_rng(1), 3, [2, 4], 2)
    part = partition_stages({2: tab}, [2, 4], 8)
    assert part is not None
    assert partition_stages({2: tab}, [2, 4], 8, best_latency=part.latency) is None
    with pytest.raises(ValueError, match="cannot add up to 7 devices"):
        partition_stages({2: tab}, [2, 4], 7)
    with pytest.raises(ValueError, match="columns"):
        partition_stages({2: tab}, [2, 4, 8], 8)
    with pytest.raises(ValueError, match="positive"):
        partition_stages({2: tab}, [0, 4], 8)


def test_submesh_sizes_and_logical_meshes():
    assert cluster_of(8, 8) == (1, 8) and cluster_of(24, 8) == (3, 8)
    assert cluster_of(12, 8) is None  # not whole nodes: no node-local promise
    # in-node powers of two, or whole nodes; 12 straddles nodes of 8, 3 does not divide 8
    assert placeable_sizes([1, 2, 3, 4, 8, 12, 16, 64], (2, 8)) == [1, 2, 4, 8, 16]
    meshes = logical_meshes(8, 8, micro_batch=4)
    assert [m.shape for m in meshes] == [(4, 2), (2, 4), (1, 8)]  # dp=8 does not divide 4


# ------------------------------------------------------------------ the search on a real model
@pytest.fixture(scope="module")
def gpt3_plan() -> Plan:
    from meshweave.cli_parallel import trace_for_planning

    graph, repeats, _ = trace_for_planning("gpt3-175b", 1536, 2048, "float16", 2)
    return plan_parallel(graph, 1024, "a100", batch=1536, training=True, repeats=repeats)


def test_search_chooses_heterogeneous_stage_meshes(gpt3_plan):
    plan = gpt3_plan
    plan.validate()
    assert not plan.uniform, plan.summary()
    shapes = {tuple(plan.stage_mesh(s).shape) for s in range(plan.num_stages)}
    assert len(shapes) > 1 and plan.world_size == 1024
    s = plan.search
    assert s["solver"].endswith("submesh-dp")
    assert plan.estimate["total"] < s["uniform_best"] <= s["grid_best"] * (1 + 1e-9)
    assert plan.estimate["total"] < s["grid_best"]
    mbs = s["micro_batch_size"]
    for st in plan.stages:
        dp, tp = st.mesh_shape
        assert mbs % dp == 0 and tp <= 8
        if dp * tp <= 8:  # a stage that fits in a node stays in one node
            assert len({r // 8 for r in st.ranks}) == 1
        assert plan.memory[f"stage{st.index}"] <= 0.9 * 80 * 2**30
    assert plan.stages[0].layers[0] == 0 and plan.stages[-1].layers[1] == s["layers"]


def test_submesh_plan_json_round_trip(gpt3_plan):
    back = Plan.from_json(gpt3_plan.to_json())
    assert back.to_json() == gpt3_plan.to_json()
    assert [st.mesh_shape for st in back.stages] == [st.mesh_shape for st in gpt3_plan.stages]
    for r in (0, 511, 1023):
        assert back.stage_of_rank(r) == gpt3_plan.stage_of_rank(r)
    assert "meshes" in back.summary()
    # every traced node belongs to exactly one stage, and stage placements name 2 axes
    names = [n for st in back.stages for n in st.nodes]
    assert len(names) == len(set(names))
    assert all(len(p) == 2 for p in back.placements.values())


def test_fixed_mesh_keeps_uniform_stages():
    """A fixed DeviceMesh keeps today's uniform search (sub-meshes need a device count)."""
    from meshweave.cli_parallel import trace_for_planning

    graph, repeats, _ = trace_for_planning("llama-8b", 64, 2048, "float16", 2)
    plan = plan_parallel(graph, DeviceMesh((4, 2), ("dp", "tp")), "h100", batch=64,
                         training=True, repeats=repeats)
    assert plan.uniform and "uniform_best" not in plan.search


def test_pins_skip_layouts_that_cannot_honour_them():
    """A stage mesh whose only layout breaks a pin gives no DP column (the size is skipped)."""
    from meshweave.models import build_model
    from meshweave.passes.parallel.search.candidates import PlannerState
    from meshweave.passes.parallel.cost.hardware import get_spec
    from meshweave.passes.parallel.search.megatron_grid import state_megatron
    from meshweave.passes.parallel.search.candidates import respects_pins
    from meshweave.passes.parallel.search.submesh_search import stage_layouts

    import meshweave

    model, inputs = build_model("gpt-tiny", batch=4, seq=8)
    graph = meshweave.compile(model, inputs).graph
    pins = {"p_lm_head_weight": ("R", "S(1)")}
    state = PlannerState(graph, get_spec("h100"), batch=4, training=True, pins=pins)
    mesh = DeviceMesh((2, 2), ("dp", "tp"))
    assert not respects_pins(state, state_megatron(state, mesh, 2))
    assert stage_layouts(state, mesh, 2, [], None) == []
    plan = plan_parallel(graph, 4, "h100", batch=4, training=True, pins=pins)
    assert plan.placements["p_lm_head_weight"] == pins["p_lm_head_weight"]
