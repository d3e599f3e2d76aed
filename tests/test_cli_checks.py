"""Mutation tests of the CLI's checks: a wrong result must make `compile` and `export` fail.

(`run --check` has its own, with a perturbed single-device reference, in test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch
from meshweave.cli import main
from meshweave.compiled import CompiledModel

ARGS = ["--model", "gpt-tiny", "--batch", "1", "--seq", "8"]


def _perturb_outputs(monkeypatch, delta: float):
    real = CompiledModel.__call__

    def wrong(self, *a, **k):
        out = real(self, *a, **k)
        return out + delta if isinstance(out, torch.Tensor) else out

    monkeypatch.setattr(CompiledModel, "__call__", wrong)


def test_compile_check_passes_and_fails_on_a_wrong_output(monkeypatch, capsys):
    assert main(["compile", *ARGS]) == 0
    _perturb_outputs(monkeypatch, 1e-2)
    assert main(["compile", *ARGS]) == 1
    err = capsys.readouterr().err
    assert "check FAILED: beyond --tol 0.001" in err


def test_compile_check_fails_on_a_dropped_output(monkeypatch, capsys):
    real = CompiledModel.__call__
    monkeypatch.setattr(CompiledModel, "__call__", lambda self, *a, **k: (real(self, *a, **k),) * 2)
    assert main(["compile", *ARGS]) == 2
    assert "2 outputs against 1 expected" in capsys.readouterr().err


@pytest.mark.parametrize("mesh", [None, "tp=2"], ids=["one_file", "partitioned"])
def test_export_check_fails_on_a_wrong_onnxruntime_output(mesh, monkeypatch, tmp_path, capsys):
    from meshweave.codegen.onnx import export

    argv = ["export", *ARGS, "--out", str(tmp_path / "onnx")] + (["--mesh", mesh] if mesh else [])
    assert main(argv) == 0
    real = export.run_manifest
    monkeypatch.setattr(export, "run_manifest", lambda d, x: [o + 1e-2 for o in real(d, x)])
    assert main(argv) == 2
    assert "differs from the reference by up to 1.000e-02" in capsys.readouterr().err


def test_a_model_too_big_for_this_machine_is_one_line_before_any_allocation(capsys):
    """The memory preflight: llama-70b's fp32 weights (263 GiB, counted on the meta device)
    against the memory available: one line, exit 2, and the command that works instead."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["compile", "--model", "llama-70b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "llama-70b needs at least 262.8 GiB for its fp32 weights alone" in err, err
    assert "`meshweave plan --model llama-70b --mesh 64`" in err, err
    # nothing was materialized: the peak resident size grew by far less than one layer's weights
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 * 2**20  # KiB
