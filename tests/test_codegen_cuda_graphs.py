"""CUDA-graph replay of generated modules (codegen/triton/cuda_graphs.py) and when it is on by default.

CompileOptions(cuda_graphs=None), the default, replays from a graph only for static-shape
inference on CUDA with every node in a kernel; the GPU tests check that policy, that replays
match eager, and that a later call never overwrites an earlier call's outputs.
"""

from __future__ import annotations

import pytest
import torch
from meshweave.codegen.triton.cuda_graphs import CudaGraphRunner
from meshweave.models import build_model

import meshweave
from meshweave import CompileOptions

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
REPRO = "pytest tests/test_codegen_cuda_graphs.py::{}"

pytestmark = pytest.mark.usefixtures("kernel_cache")  # conftest.py: a private kernel cache


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with CUDA, triton is imported for the GPU, not the interpreter")
def test_no_graphs_on_the_cpu_by_default():
    model, (ids,) = build_model("gpt-tiny", batch=1, seq=8)
    cm = meshweave.compile(model, (ids,), options=CompileOptions(backend="triton"))
    assert not isinstance(cm._runner, CudaGraphRunner)
    assert "CUDA graphs off (the model runs on the CPU)" in cm.explain()
    with pytest.raises(ValueError, match="needs the triton backend on CUDA tensors"):
        meshweave.compile(model, (ids,), options=CompileOptions(backend="triton",
                                                                cuda_graphs=True))


@needs_gpu
def test_default_replays_and_keeps_earlier_outputs():
    model, (ids,) = build_model("gpt-tiny", device="cuda", batch=2, seq=8)
    cm = meshweave.compile(model, (ids,), options=CompileOptions(backend="triton"))
    assert isinstance(cm._runner, CudaGraphRunner)
    assert "CUDA graphs on (static-shape inference on CUDA" in cm.explain()
    other = torch.randint(0, 128, ids.shape, device="cuda")
    with torch.no_grad():
        first = cm(ids)
        second = cm(other)  # replays into the same static buffers
        assert cm._runner.disabled is None, cm._runner.disabled
        assert len(cm._runner.graphs) == 1
        test = REPRO.format("test_default_replays_and_keeps_earlier_outputs")
        torch.testing.assert_close(first, model(ids), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{m}\nrepro: {test}")
        torch.testing.assert_close(second, model(other), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{m}\nrepro: {test}")


@needs_gpu
def test_default_is_off_for_dynamic_shapes_and_when_asked():
    model, (ids,) = build_model("llama-tiny", device="cuda", batch=2, seq=8)
    dims = {0: torch.export.Dim("batch", min=1, max=8)}
    cm = meshweave.compile(model, (ids,), dynamic_shapes=(dims,),
                           options=CompileOptions(backend="triton"))
    assert not isinstance(cm._runner, CudaGraphRunner)
    assert "CUDA graphs off (dynamic shapes)" in cm.explain()
    cm = meshweave.compile(model, (ids,), options=CompileOptions(backend="triton",
                                                                 cuda_graphs=False))
    assert not isinstance(cm._runner, CudaGraphRunner)
    assert "CUDA graphs off (cuda_graphs=False)" in cm.explain()
    with torch.no_grad():
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-4)


class _Relu(torch.nn.Module):
    def forward(self, x):
        return (x * 2.0).relu()


@needs_gpu
def test_graphs_per_signature_are_capped():
    """Strides are part of the signature: inputs viewed out of wider tensors capture a graph
    each, up to MAX_GRAPHS; later signatures run without a graph, still right."""
    from meshweave.codegen.triton.cuda_graphs import MAX_GRAPHS

    def view(i):  # a [4, 8] view with row stride 8 + i
        return torch.randn(4, 8 + i, device="cuda")[:, :8]

    cm = meshweave.compile(_Relu(), (view(0),), options=CompileOptions(backend="triton",
                                                                       cuda_graphs=True))
    runner = cm._runner
    for i in range(MAX_GRAPHS):
        x = view(i)
        torch.testing.assert_close(cm(x), (x * 2.0).relu())
    x = view(100)
    with pytest.warns(RuntimeWarning, match="CUDA graphs are held"):
        out = cm(x)
    torch.testing.assert_close(out, (x * 2.0).relu())
    for i in (101, 102, 3):  # further new strides run plain; a held signature still replays
        x = view(i)
        torch.testing.assert_close(cm(x), (x * 2.0).relu())
    assert len(runner.graphs) == MAX_GRAPHS and runner.uncaptured == 3


def test_graph_cap_policy_without_a_gpu(monkeypatch):
    """The cap itself, on any machine: capture is replaced by a stand-in that records what
    would be captured (the real capture is the GPU test above)."""
    calls = []

    class _Replay:
        def replay(self):
            calls.append("replay")

    def fake_capture(self, leaves):
        calls.append("capture")
        return _Replay(), [], [leaves[0] * 2]

    monkeypatch.setattr(CudaGraphRunner, "_capture", fake_capture)
    runner = CudaGraphRunner(lambda leaves: [leaves[0] * 2], max_graphs=2)
    for v in (1, 2, 1):
        runner([torch.tensor(float(v)), v])
    with pytest.warns(RuntimeWarning, match="2 CUDA graphs are held"):
        runner([torch.tensor(3.0), 3])
    assert runner([torch.tensor(4.0), 4])[0].item() == 8.0  # run plain, no graph
    assert calls == ["capture", "replay", "capture", "replay", "replay"]
    assert len(runner.graphs) == 2 and runner.uncaptured == 2
