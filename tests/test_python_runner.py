"""The eager backend's generated Python (runtime/python_runner.py) computes what the reference
executor computes, bit for bit, and hands errors and memory metering to it."""

from __future__ import annotations

import pytest
import torch
from meshweave.models import build_model
from meshweave.runtime.memory import LiveBytes
from meshweave.runtime.python_runner import python_runner
from meshweave.runtime.reference import ExecutionError, run_graph

import meshweave


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "moe-tiny"])
def test_generated_code_equals_the_reference_executor_bitwise(name):
    model, inputs = build_model(name, batch=2, seq=8)
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(training=True))
    state = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    for g in (cm.graph, cm.forward_graph):  # the forward takes the state, then the inputs
        args = list(inputs) if g is cm.graph else [
            *(state[v.target] for v in g.user_inputs[:-len(inputs)]), *inputs]
        with torch.no_grad():
            got, want = python_runner(g)(list(args)), run_graph(g, list(args))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b), g.name


def test_errors_come_from_the_reference_executor_with_the_node_and_line():
    model, (x,) = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, (x,))
    run = python_runner(cm.graph)
    with pytest.raises(ExecutionError, match=r"embedding.*models/gpt.py:\d+"):
        run([x + 10_000])  # token ids past the vocabulary
    with pytest.raises(ValueError, match="takes 1 user inputs, got 2"):
        run([x, x])


def test_a_live_bytes_meter_is_fed_by_the_reference_executor():
    model, (x,) = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, (x,))
    with torch.no_grad(), LiveBytes() as meter:
        python_runner(cm.graph)([x])
    assert meter.peak > 0
