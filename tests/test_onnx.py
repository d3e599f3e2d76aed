"""ONNX export: zoo models single-device and partitioned, run in onnxruntime against eager.

Every failure message carries a one-line repro (`meshweave export --model ... --out DIR`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree
from meshweave.codegen.onnx.export import OPSET, export_onnx, run_manifest
from meshweave.codegen.onnx.single import OnnxUnsupportedOpError, use_external_data, verify_onnx
from meshweave.codegen.onnx.partition import apply_collective
from meshweave.codegen.onnx.translations import ONNX_TRANSLATIONS, contrib_op
from meshweave.ir.graph import Node, Value, map_values
from meshweave.ir.mesh import DeviceMesh
from meshweave.models import build_model
from meshweave.passes.parallel.plan import Plan

import meshweave

RTOL = ATOL = 1e-4
_COMPILED: dict[str, tuple] = {}


def compiled(name: str):
    """(model, inputs, CompiledModel, eager leaves), compiled once per test session."""
    if name not in _COMPILED:
        if name.startswith("hf:"):
            pytest.importorskip("transformers")
        model, inputs = build_model(name)
        cm = meshweave.compile(model, inputs)
        with torch.no_grad():
            eager = [x for x in pytree.tree_leaves(model(*inputs)) if isinstance(x, torch.Tensor)]
        _COMPILED[name] = (model, inputs, cm, eager)
    return _COMPILED[name]


def assert_matches(got, expected, repro: str) -> None:
    assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}. {repro}"
    for i, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(
            g, e.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"output {i}. repro: {repro}"
        )


# --------------------------------------------------------------------------------- single device
# convnet-tiny goes through the CLI (test_cli_export), which also compares with eager.
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "hf:gpt2"])
def test_export_matches_eager(name, tmp_path):
    _, inputs, cm, eager = compiled(name)
    result = export_onnx(cm, str(tmp_path), list(inputs))
    repro = f"meshweave export --model {name} --out /tmp/x"
    assert result.max_error is not None and result.max_error < 1e-4, repro
    assert [os.path.basename(p) for p in result.paths] == ["model.onnx"]
    m = onnx.load(result.paths[0])
    assert {o.domain: o.version for o in m.opset_import}[""] == OPSET
    assert [i.name for i in m.graph.input] == [v.name for v in cm.graph.user_inputs]
    verify_onnx(result.paths[0], list(inputs), eager, rtol=RTOL, atol=ATOL)
    assert_matches(run_manifest(str(tmp_path), list(inputs)), eager, repro)
    with open(result.manifest_path) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 1 and manifest["steps"] == [
        {"op": "run", "file": "model.onnx", "rank": 0}
    ]
    assert cm.artifacts["onnx"] is result


def _partition_plan(graph, kind: str):
    megatron = pytest.importorskip(
        "meshweave.passes.parallel.search.megatron_grid",
        reason="passes/parallel/search/megatron_grid.py (megatron_plan) is not in this build yet",
    )
    pytest.importorskip(
        "meshweave.passes.parallel.lower.rank",
        reason="passes/parallel/lower/ (lower_for_rank) is not in this build yet",
    )
    dp, tp, pp = {"tp2": (1, 2, 1), "pp2": (1, 1, 2)}[kind]
    return megatron.megatron_plan(graph, dp, tp, pp, micro_batches=1)


@pytest.mark.parametrize("kind", ["tp2", "pp2"])
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_partitioned_export_matches_eager(name, kind, tmp_path):
    _, inputs, cm, eager = compiled(name)
    plan = _partition_plan(cm.graph, kind)
    result = export_onnx(cm, str(tmp_path), list(inputs), plan=plan)
    mesh = "tp=2" if kind == "tp2" else "pp=2"
    repro = f"meshweave export --model {name} --mesh {mesh} --out /tmp/x"
    manifest = result.manifest
    assert manifest["world_size"] == 2, repro
    assert {f["rank"] for f in manifest["files"]} == {0, 1}, repro
    colls = [s for s in manifest["steps"] if s["op"] == "collective"]
    if kind == "tp2":  # Megatron: one all-reduce after attention and one after the MLP
        assert sum(s["kind"] == "all_reduce" for s in colls) >= 2 * 2, (colls, repro)
    else:
        assert colls and all(s["kind"] == "send_recv" for s in colls), (colls, repro)
    for f in result.paths:
        onnx.checker.check_model(f, full_check=True)
    assert_matches(run_manifest(str(tmp_path), list(inputs)), eager, repro)


# --------------------------------------------------------------------------------- partitioning
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8, bias=False)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


def _handmade_tp_lowering(graph, plan, rank):
    """Megatron MLP by hand: column-parallel `up`, row-parallel `down`, all-reduce, and an
    all-gather of the head's output-sharded result (so two collective kinds are exercised)."""
    g = graph.copy()
    w = {v.target: v for v in g.state_inputs}
    for target, dim in (
        ("up.weight", 0),
        ("up.bias", 0),
        ("down.weight", 1),
        ("head.weight", 0),
        ("head.bias", 0),
    ):
        v = w[target]
        g.tensors[v.name] = g.tensors[v.name].chunk(2, dim)[rank].contiguous()
        v.type = v.type.with_shape(g.tensors[v.name].shape)
    nodes, replace = [], {}
    for n in g.nodes:
        n.args = map_values(n.args, lambda v: replace.get(v, v))
        nodes.append(n)
        out = n.outputs[0]
        if n.op in ("aten.linear.default", "aten.relu.default") and out.type.shape[-1] == 16:
            out.type = out.type.with_shape(out.type.shape[:-1] + (8,))
        if n.op == "aten.linear.default" and n.args[1] in (w["down.weight"], w["head.weight"]):
            gather = n.args[1] is w["head.weight"]
            if gather:
                out.type = out.type.with_shape(out.type.shape[:-1] + (2,))
            kind = "dist.all_gather" if gather else "dist.all_reduce"
            kw = {"axis": "tp", "group": [0, 1]} | ({"dim": -1} if gather else {"reduce": "sum"})
            c = Node(kind, (out,), kw, ())
            c.outputs = (
                Value(
                    out.name + "_c",
                    n.outputs[0].type.with_shape(out.type.shape[:-1] + (4,))
                    if gather
                    else out.type,
                    c,
                ),
            )
            replace[out] = c.outputs[0]
            nodes.append(c)
    g.nodes = nodes
    g.outputs = [replace.get(v, v) for v in g.outputs]
    return g


@pytest.mark.parametrize("how", ["union", "one_by_one"])
def test_partition_segments_and_collectives_handmade(how, tmp_path, monkeypatch):
    """The segmenting, ordering and manifest machinery, independent of the planner; segments
    cut out of one export (small models) or exported one by one (weights past the limit)."""
    import types

    from meshweave.codegen.onnx import partition as onnx_partition

    if how == "one_by_one":
        monkeypatch.setattr(onnx_partition, "UNION_LIMIT_BYTES", 0)

    fake = types.ModuleType("meshweave.passes.parallel.lower.rank")
    fake.lower_for_rank = _handmade_tp_lowering
    monkeypatch.setitem(sys.modules, "meshweave.passes.parallel.lower.rank", fake)
    model, x = _MLP().eval(), torch.randn(3, 8)
    cm = meshweave.compile(model, (x,))
    plan = Plan(DeviceMesh((2,), ("tp",)))
    result = export_onnx(cm, str(tmp_path), [x], plan=plan)
    files = sorted(f["path"] for f in result.manifest["files"])
    assert files == ["rank0_seg0.onnx", "rank0_seg1.onnx", "rank1_seg0.onnx", "rank1_seg1.onnx"]
    kinds = [s.get("kind", "run") for s in result.manifest["steps"]]
    assert kinds == ["run", "run", "all_reduce", "run", "run", "all_gather"]
    seg1 = next(f for f in result.manifest["files"] if f["path"] == "rank1_seg1.onnx")
    assert sorted(seg1["inputs"]) == ["linear_1_c", "x"]  # the residual crosses the cut
    with torch.no_grad():
        want = model(x)
    got = run_manifest(str(tmp_path), [x])
    np.testing.assert_allclose(got[0], want.numpy(), rtol=RTOL, atol=ATOL)


def test_numpy_collectives():
    a, b = np.arange(8.0).reshape(2, 4), np.ones((2, 4))
    env = [{"x": a}, {"x": b}]
    io = {
        "inputs": [{"rank": 0, "name": "x"}, {"rank": 1, "name": "x"}],
        "outputs": [{"rank": 0, "name": "y"}, {"rank": 1, "name": "y"}],
    }
    apply_collective({"kind": "all_reduce", **io}, env)
    assert np.array_equal(env[1]["y"], a + b)
    apply_collective({"kind": "all_gather", "dim": 1, **io}, env)
    assert env[0]["y"].shape == (2, 8)
    apply_collective({"kind": "reduce_scatter", "dim": 1, **io}, env)
    assert np.array_equal(env[1]["y"], (a + b)[:, 2:])
    apply_collective({"kind": "all_to_all", "split_dim": 1, "concat_dim": 0, **io}, env)
    assert np.array_equal(env[0]["y"], np.concatenate([a[:, :2], b[:, :2]], 0))
    apply_collective(
        {"kind": "send_recv", "inputs": io["inputs"][:1], "outputs": io["outputs"][1:]}, env
    )
    assert np.array_equal(env[1]["y"], a)


# --------------------------------------------------------------------------------- errors, ops
@torch.library.custom_op("mwtest::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_twice.register_fake(lambda x: torch.empty_like(x))


@torch.library.custom_op("mwtest::gelu_msft", mutates_args=())
def _gelu_msft(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


_gelu_msft.register_fake(lambda x: torch.empty_like(x))


class _Twice(torch.nn.Module):
    def forward(self, x):
        return torch.ops.mwtest.twice(x) + 1  # the op without an ONNX form


class _MsftGelu(torch.nn.Module):
    def forward(self, x):
        return torch.ops.mwtest.gelu_msft(x) * 3


def test_op_without_onnx_form_is_a_clear_error(tmp_path):
    cm = meshweave.compile(_Twice(), (torch.randn(2, 3),))
    with pytest.raises(OnnxUnsupportedOpError) as info:
        export_onnx(cm, str(tmp_path))
    msg = str(info.value)
    assert "mwtest.twice.default" in msg and "register_onnx_translation" in msg
    assert "test_onnx.py" in msg and "torch.ops.mwtest.twice(x)" in msg  # the source line
    assert info.value.op == "mwtest.twice.default"


def test_custom_translation_to_com_microsoft(tmp_path):
    """The path quantized weights take later (com.microsoft::MatMulNBits): a registered
    translation emitting a contrib op that onnxruntime runs."""
    gelu = contrib_op("Gelu", ["X"])

    def gelu_translation(x):
        return gelu(x)

    ONNX_TRANSLATIONS.register("mwtest.gelu_msft.default")(gelu_translation)
    try:
        x = torch.randn(4, 5)
        cm = meshweave.compile(_MsftGelu(), (x,))
        result = export_onnx(cm, str(tmp_path), [x])
    finally:
        ONNX_TRANSLATIONS.rules.pop("mwtest.gelu_msft.default")
    m = onnx.load(result.paths[0])
    assert any(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in m.graph.node)
    verify_onnx(result.paths[0], [x], [torch.nn.functional.gelu(x) * 3])


def test_external_data_threshold(tmp_path, capsys):
    model, x = _MLP().eval(), torch.randn(3, 8)
    cm = meshweave.compile(model, (x,))
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert use_external_data(cm.graph, threshold=weights - 1)
    assert not use_external_data(cm.graph)  # default: the 2 GB protobuf limit
    big = export_onnx(cm, str(tmp_path / "ext"), [x], external_data_threshold=16)
    assert big.files[0].external_data == "model.onnx.data"
    data = tmp_path / "ext" / "model.onnx.data"
    largest = max(p.numel() * 4 for p in model.parameters())
    assert data.exists() and data.stat().st_size >= largest  # tiny tensors may stay inline
    proto = onnx.load(big.paths[0], load_external_data=False)
    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert any("up.weight" in n or "up_weight" in n for n in external), external
    with torch.no_grad():
        verify_onnx(big.paths[0], [x], [model(x)])
    small = export_onnx(cm, str(tmp_path / "inline"), [x], verify=False)
    assert "ONNX" not in capsys.readouterr().err  # progress is silent off a terminal
    assert small.files[0].external_data is None
    assert not (tmp_path / "inline" / "model.onnx.data").exists()
    inline = onnx.load(small.paths[0], load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in inline.graph.initializer)


def test_export_progress_on_tty(tmp_path, monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    cm = meshweave.compile(_MLP().eval(), (torch.randn(3, 8),))
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    export_onnx(cm, str(tmp_path / "tty"), verify=False)
    assert "exporting" in tty.getvalue() and "done in" in tty.getvalue()


def test_cli_export(tmp_path, capsys):
    from meshweave.cli import main

    out = tmp_path / "conv"
    assert main(["export", "--model", "convnet-tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |onnxruntime - eager|" in text
    assert (out / "model.onnx").exists() and (out / "manifest.json").exists()
    err = float(text.split("max |onnxruntime - eager| = ")[1].split()[0])
    assert err < 1e-4, "repro: meshweave export --model convnet-tiny --out /tmp/x"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["opset"] == OPSET and manifest["world_size"] == 1
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_dynamic_batch_stays_dynamic(tmp_path):
    model, x = _MLP().eval(), torch.randn(3, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    cm = meshweave.compile(model, (x,), dynamic_shapes={"x": {0: batch}})
    result = export_onnx(cm, str(tmp_path), [x])
    dim0 = onnx.load(result.paths[0]).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # a named, symbolic batch dim
    x5 = torch.randn(5, 8)
    with torch.no_grad():
        verify_onnx(result.paths[0], [x5], [model(x5)])
