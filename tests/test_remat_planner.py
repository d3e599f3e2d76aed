"""The remat pass's memory-versus-recompute curve in the parallel planner (passes/remat/curve.py,
passes/parallel/search/staging.py): a stage over the planner's memory is priced at the first
curve point that fits, and the plan gives its ranks that point's budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meshweave.ir.errors import MeshweaveError
from meshweave.models import build_model
from meshweave.passes.parallel.search.staging import UnitTable, eval_stage, evaluate_stages
from meshweave.passes.remat.curve import remat_curve
from meshweave.passes.remat.solve import smallest_feasible

import meshweave

TP2 = meshweave.DeviceMesh((2,), ("tp",))


@pytest.fixture(scope="module")
def gpt():
    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(training=True))
    return model, x, cm


def test_the_curve_trades_memory_for_recompute_down_to_the_floor(gpt):
    _, _, cm = gpt
    problem = cm.remat["problem"]
    curve = remat_curve(problem)
    assert curve[0] == (1.0, 0.0) and len(curve) >= 3, curve
    kept = [p[0] for p in curve]
    extra = [p[1] for p in curve]
    assert all(a > b for a, b in zip(kept, kept[1:])), curve
    assert all(a <= b + 1e-12 for a, b in zip(extra, extra[1:])), curve
    assert curve[-1][0] == pytest.approx(smallest_feasible(problem) / problem.full_bytes,
                                         rel=1e-6)
    assert 0 < extra[-1] < 1, curve  # the floor recomputes part of one step's compute


def _table(curve):
    one = np.ones(4)
    seg = type("Seg", (), {"compute": 0.0, "comm": 0.0, "sync": 0.0, "sync_fixed": 0.0,
                           "weight_memory": 0.0, "activation_memory": 0.0,
                           "boundary_bytes": 0.0})()
    return UnitTable(one, one * 4 / 3, one * 0, one * 0, one * 0, one * 10, one * 100,
                     one * 5, seg, seg, None, True, curve)


def test_a_stage_over_budget_takes_the_first_curve_point_that_fits():
    curve = ((1.0, 0.0), (0.6, 0.05), (0.3, 0.2), (0.1, 0.5))
    u = _table(curve)
    full = eval_stage(u, 0, 4, 4, 1, False)
    assert full.memory == 40 + 400 and full.saved_fraction is None
    # 0.6 keeps 240 + one layer's 100 x 0.4 live in backward = 320 with the weights: fits 330
    ev = evaluate_stages([u], [0, 4], 1, "gpipe", 330.0, "auto")
    st = ev.stages[0]
    assert st.recompute and st.saved_fraction == 0.6 and ev.fits, st
    assert st.compute == pytest.approx(4 * 1.05)
    ev = evaluate_stages([u], [0, 4], 1, "gpipe", 240.0, "auto")  # 0.3: 120 + 70 + 40
    assert ev.stages[0].saved_fraction == 0.3, ev.stages[0]
    # nothing fits: the point of least memory, and the partition does not fit
    ev = evaluate_stages([u], [0, 4], 1, "gpipe", 10.0, "auto")
    assert ev.stages[0].saved_fraction == 0.1 and not ev.fits
    # without a curve: whole-layer recomputation, as before
    ev = evaluate_stages([_table(None)], [0, 4], 1, "gpipe", 330.0, "auto")
    assert ev.stages[0].recompute and ev.stages[0].compute == pytest.approx(4 * 4 / 3)


def test_compile_under_a_memory_limit_plans_a_stage_budget_from_the_curve(gpt):
    """compile(mesh=tp=2, training=True, memory_limit=...) below what saving everything
    needs: the stage recomputes at a point of the model's own curve (in the plan's search
    record), and that point's kept fraction is the stage's budget for its ranks."""
    model, x, _ = gpt
    roomy = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=TP2, training=True))
    need = roomy.plan.memory["stage0"]
    assert not roomy.plan.stages[0].recompute
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=TP2, training=True, memory_limit=int(need * 0.97)))
    stage, curve = cm.plan.stages[0], cm.plan.search["remat_curve"]
    assert stage.recompute and stage.memory_budget in [p[0] for p in curve[1:]], (stage, curve)
    assert cm.plan.memory["stage0"] <= need * 0.97
    assert f"at budget {stage.memory_budget:.3g}" in cm.plan.summary()


def test_a_memory_limit_no_plan_meets_names_the_smallest():
    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    with pytest.raises(MeshweaveError, match="smallest per-device memory any plan"):
        meshweave.compile(model, (x,), options=meshweave.CompileOptions(
            mesh=2, training=True, memory_limit=1000))
    assert torch.is_grad_enabled()


def _rank_step(rank, world, cm, x):
    import torch.nn.functional as F

    out = cm(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1)).backward()
    sol = cm.rank_remat["solution"]
    return cm.rank_remat["budget"].fraction, sol.saved_bytes, sol.full_bytes, \
        {n: p.grad.clone() for n, p in cm.named_parameters()}


def test_each_rank_recomputes_to_its_stages_curve_budget(gpt):
    """The curve-chosen stage budget, run: on 2 gloo ranks each rank's remat pass gets the
    stage's kept fraction and keeps no more of its own activations than that; the gradients
    equal eager's."""
    import copy

    import torch.nn.functional as F
    from meshweave.runtime.distributed.launch import launch

    model, x, _ = gpt
    ref = copy.deepcopy(model)
    out = ref(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1)).backward()
    want = dict(ref.named_parameters(remove_duplicate=False))
    need = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=TP2, training=True)).plan.memory["stage0"]
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=TP2, training=True, memory_limit=int(need * 0.97)))
    budget = cm.plan.stages[0].memory_budget
    for fraction, saved, full, grads in launch(_rank_step, 2, (cm, x), timeout_s=120):
        assert fraction == budget and saved <= budget * full + 1, (fraction, saved, full)
        for n, g in grads.items():
            if g.shape == want[n].shape:
                torch.testing.assert_close(g, want[n].grad, rtol=1e-4, atol=1e-5)
