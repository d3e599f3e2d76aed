"""MLIR dumps through torch-mlir's FX importer, or the install hint when it is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from meshweave.codegen.mlir.dump import (
    INSTALL_HINT,
    MlirLoweringError,
    dump_mlir,
    torch_mlir_available,
)
from meshweave.ir.graph import Node, Value, map_values

import meshweave
from meshweave.cli import main


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 64)

    def forward(self, x):
        return torch.relu(self.fc(x)).sum(-1)


def test_cli_mlir_dump_or_hint(capsys):
    """`meshweave dump --what mlir`: MLIR with func.func when torch-mlir imports, else the hint."""
    rc = main(["dump", "--model", "gpt-tiny", "--what", "mlir"])
    out = capsys.readouterr().out
    assert rc == 0
    if torch_mlir_available():
        assert "func.func @main" in out and "torch.aten" in out
        # weights are elided by default: literals name resources whose blobs are left out
        assert "dense_resource<" in out and "dialect_resources" not in out
        assert len(out) < 200_000
    else:
        assert out.strip() == INSTALL_HINT


def test_cli_mlir_hint_without_torch_mlir(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # `import torch_mlir` now fails
    monkeypatch.setitem(sys.modules, "torch_mlir.fx", None)
    rc = main(["dump", "--model", "gpt-tiny", "--what", "mlir", "--dialect", "linalg"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip() == INSTALL_HINT and "pip install" in out and len(out.splitlines()) == 1


@pytest.mark.parametrize("dialect", ["linalg", "stablehlo", "tosa"])
def test_backend_dialects(dialect):
    if not torch_mlir_available():
        pytest.skip("torch-mlir is not installed (pip install 'meshweave[mlir]')")
    x = torch.randn(2, 8)
    cm = meshweave.compile(_Small(), (x,))
    text = dump_mlir(cm.graph, [x], dialect=dialect)
    assert "func.func @main" in text
    marker = {"linalg": "linalg.", "stablehlo": "stablehlo.", "tosa": "tosa."}[dialect]
    assert marker in text
    full = dump_mlir(cm.graph, [x], dialect=dialect, elide_weights=False)
    assert "__elided__" not in full and len(full) > len(text)


def test_unknown_dialect_is_an_error():
    cm = meshweave.compile(_Small(), (torch.randn(2, 8),))
    with pytest.raises(ValueError, match="unknown MLIR dialect"):
        dump_mlir(cm.graph, dialect="llvm")


def _with_all_reduce(graph):
    """A rank-program-like graph: an all-reduce over ranks [0, 1] after the linear."""
    g = graph.copy()
    i, n = next((i, n) for i, n in enumerate(g.nodes) if n.op == "aten.linear.default")
    out = n.outputs[0]
    ar = Node("dist.all_reduce", (out,), {"axis": "tp", "group": [0, 1], "reduce": "sum"}, ())
    ar.outputs = (Value(out.name + "_ar", out.type, ar),)
    for m in g.nodes[i + 1 :]:
        m.args = map_values(m.args, lambda v: ar.outputs[0] if v is out else v)
    g.nodes.insert(i + 1, ar)
    return g


def test_rank_program_collectives_dump_as_placeholder_ops():
    if not torch_mlir_available():
        pytest.skip("torch-mlir is not installed (pip install 'meshweave[mlir]')")
    x = torch.randn(2, 8)
    g = _with_all_reduce(meshweave.compile(_Small(), (x,)).graph)
    text = dump_mlir(g, [x])
    assert 'torch.operator "torch.meshweave.collective"' in text and '"all_reduce"' in text
    with pytest.raises(MlirLoweringError, match="use --dialect torch"):
        dump_mlir(g, [x], dialect="linalg")


def test_cli_rank_dump(capsys):
    if not torch_mlir_available():
        pytest.skip("torch-mlir is not installed (pip install 'meshweave[mlir]')")
    pytest.importorskip(
        "meshweave.passes.parallel.lower",
        reason="passes/parallel/lower/ (lower_for_rank) is not in this build yet",
    )
    rc = main(["dump", "--model", "gpt-tiny", "--what", "mlir", "--mesh", "tp=2", "--rank", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "func.func @main" in out.out
    assert "meshweave.collective" in out.out  # the rank's collectives appear as ops
