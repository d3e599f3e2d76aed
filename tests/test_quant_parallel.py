"""Tensor parallelism on packed quantized weights (passes/parallel/strategies/quant_rules.py).

The rules: quant.linear splits along N freely (qweight/scales/zeros columns, bias, output's last
dim) and along K only at group boundaries (qweight rows of whole groups' int32 words, scales
and zeros rows, output a partial sum); a pin that would cut a group is a clear error. Then the
lowering (simulate_plan, every rank in one process), the cost model's byte counts, real gloo
ranks under torchrun through compile(mesh=...), and `meshweave run --quantize ... --check`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import meshweave
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.passes.parallel.cost.cost_model import compute_dtype
from meshweave.passes.parallel.cost.hardware import get_spec
from meshweave.passes.parallel.lower.rank import lower_for_rank
from meshweave.passes.parallel.lower.simulate import simulate_plan
from meshweave.passes.parallel.search.candidates import PlannerState
from meshweave.passes.parallel.search.search import plan_parallel
from meshweave.passes.parallel.strategies.axis import axis_strategies
from meshweave.passes.parallel.strategies.node_strategies import mesh_strategies
from meshweave.passes.parallel.strategies.quant_rules import QuantShardingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "torchrun_quant.py")


class TwoLayers(torch.nn.Module):
    """K=64 (2 groups of 32) then K=96 (3 groups of 32)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(64, 96, bias=bias)
        self.down = torch.nn.Linear(96, 32, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _quantized(spec: str = "w4g32", bias: bool = True, batch: int = 4):
    model = TwoLayers(bias).eval()
    x = torch.randn(batch, 64)
    with torch.no_grad():
        cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
            quantize=meshweave.QuantConfig.parse(spec), backend="eager"))
    nodes = [n for n in cm.graph.nodes if n.op == "quant.linear"]
    assert len(nodes) == 2, cm.graph
    return cm, x, nodes


def _by_tag(node, types=None):
    return {s.tag: s for s in axis_strategies(node, types or {})}


def test_column_split_shards_every_packed_tensor_on_n():
    _, _, (up, _) = _quantized()
    col = _by_tag(up)["col"]
    x, qw, sc, zr, b = up.args
    ins = dict(zip(up.inputs, col.ins))
    assert ins[x] == Replicate()
    assert ins[qw] == Shard(1) and ins[sc] == Shard(1) and ins[zr] == Shard(1)
    assert ins[b] == Shard(0)
    assert col.outs == (Shard(1),)


def test_row_split_shards_k_in_whole_groups_and_sums_partials():
    _, _, (up, down) = _quantized()
    row = _by_tag(up)["row"]
    x, qw, sc, zr, b = up.args
    ins = dict(zip(up.inputs, row.ins))
    assert ins[x] == Shard(1) and ins[qw] == Shard(0) and ins[sc] == Shard(0)
    assert ins[zr] == Shard(0) and ins[b] == Replicate()  # the bias is added once
    assert row.outs == (Partial(),)

    def row_kept(node, n):
        return any(s.tags == ("row",) for s in mesh_strategies(node, {}, (n,)))

    # K=64 is 2 groups: 2 devices take one each, 4 would cut them; K=96 is 3 groups
    assert row_kept(up, 2) and not row_kept(up, 4)
    assert not row_kept(down, 2) and row_kept(down, 3)
    # columns split freely (N=96 over 4 devices)
    assert any(s.tags == ("col",) for s in mesh_strategies(up, {}, (4,)))


def test_per_channel_weights_get_no_k_split():
    _, _, (up, down) = _quantized("w4c")
    for n in (up, down):
        tags = _by_tag(n)
        assert "col" in tags and "row" not in tags, sorted(tags)


def test_pin_that_cuts_a_group_names_node_group_and_multiple():
    cm, _, (up, _) = _quantized()
    qweight = up.args[1].name
    with pytest.raises(QuantShardingError) as e:
        plan_parallel(cm.graph, DeviceMesh((4,), ("tp",)), "cpu", batch=4,
                      pins={qweight: ("S(0)",)})
    text = str(e.value)
    assert f"%{qweight}" in text and f"quant.linear %{up.outputs[0].name}" in text, text
    assert "group_size=32" in text and "K=64 is 2 group(s)" in text, text
    assert "multiple of 32" in text and "(here 4)" in text, text
    assert up.source and up.source in text, text  # the user's source line
    # a per-channel layer pinned to a partial sum (a row split) cuts its only group
    cm_c, _, (up_c, _) = _quantized("w4c")
    with pytest.raises(QuantShardingError, match=r"1 group\(s\) of group_size=64"):
        plan_parallel(cm_c.graph, DeviceMesh((2,), ("tp",)), "cpu", batch=4,
                      pins={up_c.outputs[0].name: ("P",)})


def test_pin_at_group_boundaries_is_honoured_and_lowered_as_word_rows():
    cm, x, (up, _) = _quantized()
    qw = up.args[1]
    plan = plan_parallel(cm.graph, DeviceMesh((2,), ("tp",)), "cpu", batch=4,
                         pins={qw.name: ("S(0)",), up.outputs[0].name: ("P",)})
    assert plan.placement_of(qw.name) == (Shard(0),)
    full = cm.graph.tensors[qw.name]
    for r in range(2):
        prog = lower_for_rank(cm.graph, plan, r)
        piece = prog.tensors[qw.name]
        assert tuple(piece.shape) == (4, 96)  # one group of 32 4-bit codes = 4 int32 rows
        assert torch.equal(piece, full[4 * r: 4 * (r + 1)])
        qn = next(n for n in prog.nodes if n.op == "quant.linear")
        has_bias = (qn.args[4] if len(qn.args) > 4 else qn.kwargs.get("bias")) is not None
        assert has_bias == (r == 0), prog  # the row-parallel bias is added on one rank
    want = cm(x)
    got = simulate_plan(cm.graph, plan, [x])[0]
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.timeout(120)
def test_llama_tiny_tp2_simulated_matches_one_device_with_row_and_column_splits():
    from meshweave.models import build_model

    model, inputs = build_model("llama-tiny", batch=2, seq=8)
    model.eval()
    config = meshweave.QuantConfig.parse("w4g32", skip=("down_proj",))
    with torch.no_grad():
        single = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=config, backend="eager"))
        want = single(*inputs)
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
        quantize=config, mesh=DeviceMesh((2,), ("tp",))))
    pls = [cm.plan.placements.get(n.outputs[0].name) for n in cm.graph.nodes
           if n.op == "quant.linear"]
    assert ("R", "P") in pls and ("R", "S(2)") in pls, pls  # o_proj rows, the rest columns
    got = simulate_plan(cm.graph, cm.plan, list(inputs))[0]
    assert (got - want).abs().max().item() < 1e-5


def test_cost_model_counts_packed_bytes_and_float_compute_dtype():
    cm, _, (up, _) = _quantized(bias=False)
    fp = TwoLayers(bias=False).eval()
    with torch.no_grad():
        fp_graph = meshweave.compile(fp, (torch.randn(4, 64),),
                                     options=meshweave.CompileOptions(backend="eager")).graph
    spec = get_spec("cpu")
    # every parameter is packed or a scale: the math still runs in the scales' float32
    assert compute_dtype(cm.graph, spec) == "float32"
    mesh = DeviceMesh((2,), ("tp",))
    rep = [(Replicate(),)]

    def weight_bytes(graph):
        model = PlannerState(graph, spec, batch=4, training=False).model(mesh, 4)
        return sum(float(model.input_memory(v, rep)[0]) for v in graph.inputs
                   if v.kind == "param")

    q, f = weight_bytes(cm.graph), weight_bytes(fp_graph)
    # int32 words (1/8 of fp32), fp32 scales and uint8 zeros per group of 32
    want_q = sum(int(cm.graph.tensors[v.name].nbytes) for v in cm.graph.inputs
                 if v.kind == "param")
    assert q == want_q and f == (64 * 96 + 96 * 32) * 4
    assert q < f / 5, (q, f)
    model = PlannerState(cm.graph, spec, batch=4, training=False).model(mesh, 4)
    qw = up.args[1]
    halves = model.input_memory(qw, [(Replicate(),), (Shard(1),), (Shard(0),)])
    assert list(halves) == [64 * 96 / 2, 64 * 96 / 4, 64 * 96 / 4]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.mark.timeout(200)
def test_two_gloo_ranks_tp2_match_one_device_exactly():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", SCRIPT, "tp=2", "--quantize", "w4g32", "--quant-skip", "down_proj"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180,
                       check=False, cwd=ROOT)
    out = r.stdout
    assert r.returncode == 0, f"{' '.join(cmd)}\n{out[-2000:]}\n{r.stderr[-3000:]}"
    assert "plan: 1 stage(s) x mesh 1x2" in out, out
    splits = re.search(r"quant.linear splits: \{'col': (\d+), 'row': (\d+)\}", out)
    assert splits and int(splits.group(1)) > 0 and int(splits.group(2)) > 0, out
    held, full = map(int, re.search(r"rank 0 holds (\d+) of (\d+)", out).groups())
    assert held * 2 == full, out  # every packed tensor is split in two
    assert float(re.search(r"max \|tp - single device\| = (\S+)", out).group(1)) <= 1e-5


@pytest.mark.timeout(200)
def test_cli_run_quantized_tp2_check():
    # GPTQ (calibrated on random batches) through `run`; RTN runs under torchrun above
    cmd = [sys.executable, "-m", "meshweave", "run", "--model", "llama-tiny", "--quantize", "w4c",
           "--method", "gptq", "--mesh", "tp=2", "--batch", "2", "--seq", "8", "--check"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180,
                       check=False, cwd=ROOT)
    out = r.stdout
    assert r.returncode == 0, f"{' '.join(cmd)}\n{out[-2000:]}\n{r.stderr[-3000:]}"
    assert "= 2 ranks" in out and "check passed" in out and "GPTQ calibration" in out, out
    err = float(re.search(r"outputs: (\S+e[-+]\d+)", out).group(1))
    assert err <= 1e-5, out
    bad = subprocess.run([*cmd[:3], "run", "--model", "llama-tiny", "--quantize", "w4c",
                          "--train", "--mesh", "tp=2"], capture_output=True, text=True,
                         env=_env(), timeout=60, check=False, cwd=ROOT)
    assert bad.returncode == 2 and "inference" in bad.stderr + bad.stdout, bad.stderr
