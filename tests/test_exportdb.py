"""Every torch ExportDB example that torch.export accepts: compiled and matched, or rejected."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_outputs
from torch._export.db.examples import all_examples

import meshweave

CASES = sorted(all_examples().items())


def _exportable(case) -> bool:
    try:
        torch.export.export(copy.deepcopy(case.model), case.example_args,
                            case.example_kwargs or {}, dynamic_shapes=case.dynamic_shapes,
                            strict=False)
    except Exception:
        return False
    return True


def _run_case(case, fallback: bool) -> str:
    kwargs = case.example_kwargs or {}
    opts = meshweave.CompileOptions(eager_fallback=fallback)
    try:
        cm = meshweave.compile(copy.deepcopy(case.model), case.example_args, kwargs,
                               dynamic_shapes=case.dynamic_shapes, options=opts)
    except meshweave.UnsupportedOpError:
        return "rejected"
    expected = copy.deepcopy(case.model)(*copy.deepcopy(case.example_args),
                                         **copy.deepcopy(kwargs))
    got = cm(*copy.deepcopy(case.example_args), **copy.deepcopy(kwargs))
    assert_same_outputs(expected, got, repro=f"pytest tests/test_exportdb.py -k {case.name}")
    return "matched"


@pytest.mark.parametrize("fallback", [False, True], ids=["strict_registry", "fallback"])
def test_exportdb_examples(fallback, capsys):
    counts = {"matched": 0, "rejected": 0, "not exportable": 0}
    rejected = []
    for name, case in CASES:
        if not _exportable(case):
            counts["not exportable"] += 1
            continue
        result = _run_case(case, fallback)
        counts[result] += 1
        if result == "rejected":
            rejected.append(name)
    with capsys.disabled():
        print(f"\nExportDB ({'fallback on' if fallback else 'fallback off'}): {counts}; "
              f"rejected: {rejected}")
    assert counts["matched"] >= 25
    assert counts["matched"] + counts["rejected"] + counts["not exportable"] == len(CASES)
    if fallback:  # with fallback only control flow (torch.cond / map) may be rejected
        assert len(rejected) <= 3, rejected
