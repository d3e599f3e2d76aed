"""Pipeline stages on meshes of different shapes (Plan v2 `StagePlan.mesh_shape`, Alpa's
sub-meshes): the cross-mesh transfer schedule, the lowering (simulate_plan against the
reference executor), real gloo runs (inference, and training with ZeRO-1 and tied weights
across stages) against one device, `meshweave run --plan-file`, and bad plans.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_outputs
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import parse_placement
from meshweave.passes.parallel import LoweringError, megatron_plan, simulate_plan
from meshweave.passes.parallel.lower.cross_mesh import assemble_order, transfer_schedule
from meshweave.passes.parallel.plan import Plan
from meshweave.runtime.distributed.program import tie_rank_groups, tied_params
from meshweave.runtime.distributed.runner import (
    RunSpec,
    compare,
    prepare,
    run_distributed,
    run_single_device,
    trace_model,
)
from meshweave.runtime.reference import run_graph

BATCH, SEQ = 4, 8
# (dp, tp) of the base Megatron plan, micro-batches, then one (dp, tp) shape per stage
LAYOUTS = {
    "dp2tp2->tp2": ((2, 2), 2, [(2, 2), (1, 2)]),
    "dp2tp2->dp2": ((2, 2), 2, [(2, 2), (2, 1)]),
    "single->dp2tp2": ((2, 2), 1, [(1, 1), (2, 2)]),
    "tp2->dp2": ((2, 2), 2, [(1, 2), (2, 1)]),
}


def _pl(*texts):
    return tuple(parse_placement(t) for t in texts)


def with_meshes(plan: Plan, shapes) -> Plan:
    """`plan` with stage s on a mesh of shapes[s], ranks numbered stage after stage."""
    first = 0
    for st, shape in zip(plan.stages, shapes):
        size = shape[0] * shape[1]
        st.mesh_shape, st.ranks = tuple(shape), list(range(first, first + size))
        first += size
    return Plan.from_json(plan.to_json())  # what a run loads: validated, version 2


@functools.cache
def _traced(name: str):
    model, inputs, graph = trace_model(name, BATCH, SEQ)
    return model, inputs, graph


# ------------------------------------------------------------------ transfer schedule
def _covers_exactly(pieces, dst_mesh, shape, dst_pl):
    """Every destination rank's pieces tile its box exactly once."""
    for r in dst_mesh.devices:
        mine = [p.box for p in pieces if p.dst == r]
        hit = torch.zeros(shape, dtype=torch.int32)
        for box in mine:
            hit[tuple(slice(lo, hi) for lo, hi in box)] += 1
        want = torch.zeros(shape, dtype=torch.int32)
        from meshweave.passes.parallel.lower.cross_mesh import rank_box

        box = rank_box(shape, dst_pl, dst_mesh, r, "test")
        want[tuple(slice(lo, hi) for lo, hi in box)] = 1
        assert torch.equal(hit, want), f"rank {r}: pieces {mine}"
        assemble_order(mine)  # a grid: concatenation order exists


def test_schedule_batch_split_to_tensor_split():
    src = DeviceMesh((2, 2), ("dp", "tp"), (0, 1, 2, 3))
    dst = DeviceMesh((1, 2), ("dp", "tp"), (4, 5))
    shape = (4, 6, 8)
    pieces = transfer_schedule(shape, _pl("S(0)", "R"), src, _pl("S(0)", "S(2)"), dst)
    _covers_exactly(pieces, dst, shape, _pl("S(0)", "S(2)"))
    # the batch halves come from the two dp rows; each half is sent by one replica only
    assert sorted((p.src, p.dst) for p in pieces) == [(0, 4), (1, 5), (2, 4), (3, 5)]


def test_schedule_same_shape_is_peer_to_peer():
    src = DeviceMesh((2, 1), ("dp", "tp"), (0, 1))
    dst = DeviceMesh((2, 1), ("dp", "tp"), (2, 3))
    pieces = transfer_schedule((4, 3), _pl("S(0)", "R"), src, _pl("S(0)", "R"), dst)
    assert [(p.src, p.dst) for p in pieces] == [(0, 2), (1, 3)]


def test_schedule_replicated_source_spreads_sends():
    src = DeviceMesh((1, 4), ("dp", "tp"), (0, 1, 2, 3))
    dst = DeviceMesh((4, 1), ("dp", "tp"), (4, 5, 6, 7))
    pieces = transfer_schedule((8, 2), _pl("R", "R"), src, _pl("S(0)", "R"), dst)
    _covers_exactly(pieces, dst, (8, 2), _pl("S(0)", "R"))
    assert sorted(p.src for p in pieces) == [0, 1, 2, 3]


def test_schedule_rejects_uneven_and_partial():
    src = DeviceMesh((3, 1), ("dp", "tp"), (0, 1, 2))
    dst = DeviceMesh((1, 1), ("dp", "tp"), (3,))
    with pytest.raises(LoweringError, match="does not split into 3 equal shards"):
        transfer_schedule((4, 2), _pl("S(0)", "R"), src, _pl("R", "R"), dst, "%x")
    with pytest.raises(LoweringError, match="partial"):
        transfer_schedule((3, 2), _pl("P", "R"), src, _pl("R", "R"), dst, "%x")


# ------------------------------------------------------------------ lowering, in one process
@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny", "moe-tiny", "hf:gpt2"])
def test_lowered_submesh_plans_match_reference(model):
    if model.startswith("hf:"):
        pytest.importorskip("transformers")
    _, inputs, graph = _traced(model)
    expected = run_graph(graph, list(inputs))
    for name, ((dp, tp), mb, shapes) in LAYOUTS.items():
        plan = with_meshes(megatron_plan(graph, dp, tp, 2, micro_batches=mb), shapes)
        assert not plan.uniform and plan.world_size == sum(a * b for a, b in shapes)
        got = simulate_plan(graph, plan, list(inputs))
        assert_same_outputs(expected, got, rtol=1e-4, atol=1e-5, repro=f"{model} {name}")


def test_cross_mesh_programs_slice_and_concatenate():
    _, _, graph = _traced("gpt-tiny")
    from meshweave.passes.parallel import lower_for_rank

    plan = with_meshes(megatron_plan(graph, 2, 2, 2), [(2, 1), (1, 2)])
    sender = lower_for_rank(graph, plan, 0)
    receiver = lower_for_rank(graph, plan, 2)
    sends = [n for n in sender.nodes if n.op == "dist.send"]
    recvs = [n for n in receiver.nodes if n.op == "dist.recv"]
    # rank 2 (stage 1, whole batch) receives one half of each boundary value from each of
    # stage 0's two dp ranks and concatenates them on the batch dim
    assert {n.kwargs["src"] for n in recvs} == {0, 1}
    assert {n.kwargs["dst"] for n in sends} == {2, 3}
    assert any(n.op == "aten.cat.default" for n in receiver.nodes)
    assert receiver.meta["mesh"].shape == (1, 2) and receiver.meta["groups"]["tp"] == [2, 3]


# ------------------------------------------------------------------ real gloo ranks
@pytest.mark.timeout(200)
@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny", "hf:gpt2"])
def test_submesh_plans_on_gloo_match_one_device(model):
    if model.startswith("hf:"):
        pytest.importorskip("transformers")
    failures = []
    for training in (False, True):
        spec = RunSpec(model, plan="fixed", dp=2, tp=2, pp=2, micro_batches=2, batch=BATCH,
                       seq=SEQ, training=training, lowering="planner",
                       schedule="1f1b" if training else "gpipe", zero=training)
        job = prepare(spec, _traced(model))
        for name in ("dp2tp2->tp2", "tp2->dp2"):
            job.plan = with_meshes(job.plan, LAYOUTS[name][2])
            job.plan.training, job.plan.zero = training, training
            errs = compare(run_single_device(job), run_distributed(job))
            worst = max(errs.get("outputs", 0), errs.get("loss", 0), 10 * errs.get("params", 0))
            if worst > 1e-4:
                failures.append(f"{name} training={training}: {errs}")
    assert not failures, "\n".join(failures)


def test_tied_weights_across_differently_shaped_stages_sync_as_full_tensors():
    """hf:gpt2 ties wte (stage 0) and lm_head (last stage): with meshes (1, 2) and (2, 1)
    the copies are sharded differently, so the tie group is every rank of both stages."""
    pytest.importorskip("transformers")
    _, _, graph = _traced("hf:gpt2")
    plan = with_meshes(megatron_plan(graph, 2, 2, 2, micro_batches=2), [(1, 2), (2, 1)])
    ties = tied_params(graph, plan)
    assert any(len(stages) == 2 for _, stages in ties)
    assert [0, 1, 2, 3] in tie_rank_groups(ties, plan)


# ------------------------------------------------------------------ CLI and bad plans
def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True,
                          text=True, timeout=240, check=False)


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_run_plan_file_checks_against_one_device(tmp_path):
    _, _, graph = _traced("gpt-tiny")
    plan = megatron_plan(graph, 2, 2, 2, micro_batches=2, batch=BATCH, training=True)
    plan = with_meshes(plan, [(1, 2), (2, 1)])
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    r = _run_cli("run", "--model", "gpt-tiny", "--plan-file", str(path), "--batch", str(BATCH),
                 "--seq", str(SEQ), "--train", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "meshes 1x2 | 2x1" in r.stdout and "check passed" in r.stdout
    dump = _run_cli("dump", "--model", "gpt-tiny", "--batch", str(BATCH), "--seq", str(SEQ),
                    "--what", "rank:0", "--plan-file", str(path))
    assert dump.returncode == 0, dump.stderr
    assert "dist.send(" in dump.stdout and "aten.slice.Tensor" in dump.stdout  # half the batch
    onnx = _run_cli("export", "--model", "gpt-tiny", "--batch", str(BATCH), "--seq", str(SEQ),
                    "--plan-file", str(path), "--out", str(tmp_path / "onnx"))
    assert onnx.returncode == 0, onnx.stderr
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and manifest["outputs"][0]["mesh_shape"] == [2, 1]
    err = float(onnx.stdout.split("max |onnxruntime - eager| = ")[1].split()[0])
    assert err < 1e-4, onnx.stdout
    bad = _run_cli("run", "--model", "gpt-tiny", "--plan-file", str(path), "--batch", "8",
                   "--seq", str(SEQ))
    assert bad.returncode != 0 and "made for a global batch of 4" in bad.stderr
    path.write_text("{}")
    bad = _run_cli("run", "--plan-file", str(path))
    assert bad.returncode != 0 and "not a meshweave Plan JSON" in bad.stderr


def test_bad_stage_meshes_are_clear_errors():
    _, inputs, graph = _traced("gpt-tiny")
    plan = megatron_plan(graph, 2, 2, 2)
    plan.stages[0].mesh_shape, plan.stages[0].ranks = (2, 1), [0, 1]
    plan.stages[1].mesh_shape, plan.stages[1].ranks = (1, 2), [1, 2]  # rank 1 twice
    with pytest.raises(ValueError, match="do not cover"):
        Plan.from_json(plan.to_json())
    with pytest.raises(LoweringError, match="invalid plan"):
        simulate_plan(graph, plan, list(inputs))
    plan.stages[1].ranks = [2, 3, 4]
    with pytest.raises(ValueError, match="3 ranks for a mesh of shape"):
        plan.validate()
    # a stage mesh that cannot split the micro-batch: 3-way dp of a batch of 4
    plan = with_meshes(megatron_plan(graph, 2, 1, 2), [(2, 1), (3, 1)])
    with pytest.raises(LoweringError, match="does not split into 3 equal shards"):
        simulate_plan(graph, plan, list(inputs))


def test_version_1_plans_still_load():
    _, _, graph = _traced("gpt-tiny")
    d = json.loads(megatron_plan(graph, 1, 2, 2).to_json())
    d["version"] = 1
    for st in d["stages"]:
        st.pop("mesh_shape")
    plan = Plan.from_json(json.dumps(d))
    assert plan.uniform and plan.version == 2 and plan.world_size == 4
    d["version"] = 7
    with pytest.raises(ValueError, match="version 7 is not supported"):
        Plan.from_json(json.dumps(d))


@pytest.mark.timeout(300)
def test_searched_submesh_plan_runs_end_to_end(tmp_path):
    """The user's path: `meshweave plan` picks stages of different meshes (3 layers on 8
    devices under a memory budget: Alpa's 4 + 2 + 2), `meshweave run --plan-file` trains
    with it on 8 gloo ranks and --check compares losses and parameters with one device."""
    path = tmp_path / "plan.json"
    common = ["--model", "gpt-tiny", "--num-layers", "3", "--batch", "8", "--seq", "16",
              "--train"]
    r = _run_cli("plan", *common, "--layers", "0", "--mesh", "8", "--spec", "cpu",
                 "--dtype", "float32", "--memory-gib", "0.0005", "--out", str(path))
    assert r.returncode == 0, r.stderr
    plan = Plan.from_json(path.read_text())
    sizes = [plan.stage_mesh(s).size for s in range(plan.num_stages)]
    assert not plan.uniform and sorted(sizes) != [sizes[0]] * len(sizes), r.stdout
    assert plan.estimate["total"] < plan.search["uniform_best"]
    hops = [c for c in plan.collectives if c.kind == "send_recv"]
    assert len(hops) == plan.num_stages - 1 and all(c.nbytes > 0 for c in hops)
    _, inputs, graph = trace_model("gpt-tiny", 8, 16, 3)
    got = simulate_plan(graph, plan, inputs)
    assert_same_outputs(run_graph(graph, inputs), got, rtol=1e-4, atol=1e-5)
    r = _run_cli("run", *common, "--plan-file", str(path), "--check")
    assert r.returncode == 0 and "check passed" in r.stdout, r.stdout + r.stderr


def test_report_draws_each_stage_on_its_own_mesh(tmp_path):
    from meshweave.report import write_report

    _, _, graph = _traced("gpt-tiny")
    plan = with_meshes(megatron_plan(graph, 2, 2, 2, micro_batches=2), [(2, 2), (1, 2)])
    with open(write_report(str(tmp_path / "p.html"), plan, graph)) as f:
        page = f.read()

    widths = re.findall(r'id="stage-\d"><rect x="\d+" y="0" width="(\d+)"', page)
    assert len(widths) == 2 and int(widths[0]) == int(widths[1])  # both two columns wide
    assert page.count('class="device"') == 6 and 'id="rank-5"' in page
    assert "rank 5, stage 1, dp=0, tp=1" in page  # its coordinates on the (1, 2) mesh


def test_num_layers_bad_values_are_one_line_errors():
    r = _run_cli("plan", "--model", "gpt-tiny", "--num-layers", "0", "--mesh", "2")
    assert r.returncode == 2 and "cannot set 0 layers" in r.stderr
    r = _run_cli("dump", "--model", "convnet-tiny", "--num-layers", "3", "--what", "ir")
    assert r.returncode == 2 and "num_layers" in r.stderr, r.stderr
