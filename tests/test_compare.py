"""Comparisons of like with like: a dropped output, loss, step or parameter is an error that
names it, never an error of 0 (runtime/compare.py and every check built on it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from meshweave.cli import _max_error
from meshweave.codegen.onnx.single import OnnxVerificationError, compare_outputs
from meshweave.runtime.compare import ComparisonError, max_errors
from meshweave.runtime.distributed import DistributedError
from meshweave.runtime.distributed.runner import RunResult, compare


def test_max_errors_by_position_and_by_name():
    a, b = torch.ones(3), torch.ones(3) + 0.25
    assert max_errors([a, a], [a, b]) == {"output 0": 0.0, "output 1": 0.25}
    assert max_errors({"w": a}, {"w": b}, what="parameter") == {"w": 0.25}


@pytest.mark.parametrize(
    "got, match",
    [
        ([torch.ones(2)], "1 outputs against 2 expected.*missing output 1"),
        ([torch.ones(2)] * 3, "3 outputs against 2 expected.*unexpected output 2"),
        ([torch.ones(2), torch.ones(3)], r"output 1.*shape \(3,\), expected \(2,\)"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_max_errors_rejects_what_does_not_pair(got, match):
    with pytest.raises(ComparisonError, match=match):
        max_errors([torch.ones(2), torch.ones(2)], got, where="the test")


def test_max_errors_names_missing_parameters_and_nothing_to_compare():
    with pytest.raises(ComparisonError, match="missing b"):
        max_errors({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)}, what="param")
    with pytest.raises(ComparisonError, match="no outputs to compare"):
        max_errors([], [])


def test_nan_is_an_error_unless_both_sides_are_nan():
    nan = torch.tensor([math.nan, 1.0])
    assert max_errors([nan], [nan.clone()])["output 0"] == 0.0
    assert max_errors([nan], [torch.tensor([0.0, 1.0])])["output 0"] == math.inf


def _result(losses, params=None, outputs=None):
    return RunResult(outputs, list(losses), dict(params or {}))


def test_distributed_compare_per_step_and_per_parameter():
    p = {"w": torch.ones(2), "b": torch.zeros(2)}
    errs = compare(_result([1.0, 0.5], p), _result([1.0, 0.75], {**p, "b": torch.ones(2)}))
    assert errs["loss"] == 0.25 and errs["params"] == 1.0 and errs["worst_param"] == "b"


@pytest.mark.parametrize(
    "got, match",
    [
        (_result([1.0], {"w": torch.ones(2)}), "missing step 2"),
        (_result([1.0, 0.5, 0.2], {"w": torch.ones(2)}), "unexpected step 3"),
        (_result([1.0, 0.5], {}), "missing w"),
        (_result([1.0, 0.5], {"w": torch.ones(2)}, outputs=[]), "missing output 0"),
    ],
    ids=["dropped_loss", "extra_step", "dropped_param", "dropped_output"],
)
def test_distributed_compare_fails_on_a_dropped_item(got, match):
    ref = _result([1.0, 0.5], {"w": torch.ones(2)}, outputs=[torch.ones(1)])
    if got.outputs is None:
        got.outputs = [torch.ones(1)]
    with pytest.raises(DistributedError, match=match):
        compare(ref, got)


def test_onnx_comparison_fails_on_a_dropped_output():
    want = [np.ones(2, np.float32), np.ones(3, np.float32)]
    assert compare_outputs([w.copy() for w in want], want, 1e-4, 1e-4, "model.onnx") == 0.0
    with pytest.raises(OnnxVerificationError, match="model.onnx.*missing output 1"):
        compare_outputs(want[:1], want, 1e-4, 1e-4, "model.onnx")
    with pytest.raises(OnnxVerificationError, match="output 1 differs"):
        compare_outputs([want[0], want[1] + 1], want, 1e-4, 1e-4, "model.onnx")


def test_cli_error_helper_fails_on_a_dropped_output():
    x = torch.ones(2)
    assert _max_error((x, x * 2), (x, x * 2 + 0.5)) == 0.5
    with pytest.raises(ComparisonError, match="missing output 1"):
        _max_error((x, x), (x,))
