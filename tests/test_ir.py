"""The IR itself: printer stability, verifier, registry rules, and each pass vs the reference."""

from __future__ import annotations

import os

import pytest
import sympy
import torch
from meshweave.ir import Graph, Node, RuleTable, Value, verify
from meshweave.ir.errors import UnsupportedOpError, VerificationError
from meshweave.ir.registry import lookup
from meshweave.ir.types import TensorType
from meshweave.passes.constant_fold import constant_fold
from meshweave.passes.cse import cse
from meshweave.passes.dce import dce
from meshweave.passes.pipeline import Pass, run_pipeline
from meshweave.runtime import run_graph

import meshweave


class Redundant(torch.nn.Module):
    """Has a common subexpression, a dead branch and a foldable constant subgraph."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.table = torch.arange(8.0)  # lifted constant

    def forward(self, x):
        a = torch.tanh(self.lin(x))
        b = torch.tanh(self.lin(x))  # same as a
        _dead = torch.exp(x) * 3  # unused
        c = (self.table * 2 + 1).softmax(-1)  # constants only
        return a + b + c


def _frontend_graph(model, *args):
    opts = meshweave.CompileOptions(passes=())
    return meshweave.compile(model, args, options=opts).graph


def test_passes_preserve_numerics_and_shrink_the_graph():
    m = Redundant()
    x = torch.randn(3, 8)
    g0 = _frontend_graph(m, x)
    expected = run_graph(g0, [x])
    text0 = str(g0)
    for p in (cse, dce, constant_fold):
        g1 = p(g0)
        verify(g1, after_pass=p.__name__)
        torch.testing.assert_close(run_graph(g1, [x])[0], expected[0])
        assert g1 is not g0 and str(g0) == text0, f"{p.__name__} changed its input graph"
    full = run_pipeline(g0)
    counts = full.op_counts()
    assert counts.get("aten.linear.default") == 1, counts  # CSE merged the two linears
    assert "aten.exp.default" not in counts  # DCE removed the dead branch
    assert "aten._softmax.default" not in counts  # folded into a constant
    torch.testing.assert_close(run_graph(full, [x])[0], m(x))
    assert [r.name for r in full.provenance] == ["shape_prop", "moe", "constant_fold", "cse",
                                                   "dce"]


def test_printer_is_stable_and_shows_types_symbols_and_passes():
    from torch.export import Dim

    m = Redundant()
    cm1 = meshweave.compile(m, (torch.randn(3, 8),), dynamic_shapes=({0: Dim("b")},))
    cm2 = meshweave.compile(m, (torch.randn(3, 8),), dynamic_shapes=({0: Dim("b")},))
    text = meshweave.ir.print_graph(cm1.graph, with_source=False)
    assert text == meshweave.ir.print_graph(cm2.graph, with_source=False)
    sym = cm1.graph.user_inputs[0].type.shape[0]
    assert f"%x: f32[{sym}, 8]" in text
    assert f"# symbol {sym} = 3" in text
    assert "# pass cse" in text


def test_dump_dir_has_one_file_per_pass(tmp_path):
    opts = meshweave.CompileOptions(dump_dir=str(tmp_path))
    meshweave.compile(Redundant(), (torch.randn(3, 8),), options=opts)
    names = sorted(os.listdir(tmp_path))
    assert names[:6] == ["00_frontend.mwir", "01_shape_prop.mwir", "02_moe.mwir",
                         "03_constant_fold.mwir", "04_cse.mwir", "05_dce.mwir"]
    assert "final.mwir" in names and "explain.txt" in names


def _tiny_graph(shape_out=(2, 3)):
    x = Value("x", TensorType((2, 3), torch.float32), kind="user", target="x")
    n = Node("aten.relu.default", (x,), {}, ())
    n.outputs = (Value("y", TensorType(shape_out, torch.float32), n),)
    return Graph([x], [n], [n.outputs[0]])


def test_verifier_accepts_good_and_rejects_wrong_shape():
    verify(_tiny_graph())
    with pytest.raises(VerificationError, match=r"%y is declared f32\[2, 4\].*gives f32\[2, 3\]"):
        verify(_tiny_graph((2, 4)), after_pass="my_pass")


def test_verifier_rejects_use_before_def_and_duplicates():
    g = _tiny_graph()
    g.nodes[0].args = (Value("ghost", TensorType((2, 3), torch.float32)),)
    with pytest.raises(VerificationError, match="ghost is used before it is defined"):
        verify(g)
    g = _tiny_graph()
    g.nodes[0].outputs[0].name = "x"
    with pytest.raises(VerificationError, match="duplicate value name %x"):
        verify(g)


def test_verifier_rejects_unknown_op_not_marked_fallback():
    g = _tiny_graph()
    g.nodes[0].op = "aten.not_a_real_op.default"
    with pytest.raises(VerificationError, match="not in the registry"):
        verify(g)


def test_pipeline_rejects_an_impure_pass():
    with pytest.raises(RuntimeError, match="must be pure"):
        run_pipeline(_tiny_graph(), [Pass("identity", lambda g: g)])


def test_symbolic_shape_rules():
    s = sympy.Symbol("s0", positive=True, integer=True)
    x = TensorType((s, 4, 6), torch.float32)
    view = lookup("aten.view.default").shape(x, [-1, 6])[0]
    assert view.shape[1] == 6 and sympy.simplify(view.shape[0] - 4 * s) == 0
    mm = lookup("aten.linear.default")
    flops = mm.flops((x, TensorType((10, 6), torch.float32)), {}, [])
    assert sympy.simplify(flops - 2 * s * 4 * 6 * 10) == 0


def test_rule_tables_are_keyed_by_op():
    table = RuleTable("test_rules")
    table.register("aten.add.Tensor", "aten.mul.Tensor")(lambda: "pointwise")
    assert table.get("aten.add.Tensor")() == "pointwise" and "aten.mul.Tensor" in table
    with pytest.raises(UnsupportedOpError, match="no entry in the test_rules rule table"):
        table.require("aten.bmm.default", source="model.py:3")
    del RuleTable.tables["test_rules"]


def test_graph_copy_is_deep_for_structure():
    g = _frontend_graph(Redundant(), torch.randn(3, 8))
    c = g.copy()
    c.nodes.pop()
    assert len(g.nodes) == len(c.nodes) + 1
    assert all(a is not b for a, b in zip(g.all_values(), c.all_values()))


def test_node_cost_flops_and_bytes():
    from meshweave.ir.registry import node_cost

    g = _frontend_graph(torch.nn.Linear(8, 16), torch.randn(4, 8))
    (lin,) = [n for n in g.nodes if n.op == "aten.linear.default"]
    flops, moved = node_cost(lin)
    assert flops == 2 * 4 * 8 * 16
    assert moved == 4 * (4 * 8 + 16 * 8 + 16 + 4 * 16)  # x, weight, bias, out in fp32
    view = Node("aten.view.default", (g.user_inputs[0], [32]), {}, ())
    view.outputs = (Value("v", TensorType((32,), torch.float32), view),)
    assert node_cost(view) == (0, 0)
