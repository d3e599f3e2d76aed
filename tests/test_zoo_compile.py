"""Every zoo model at its tiny config, and the hf: tiny models, compiled vs eager in fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_outputs
from meshweave.models import build_model, list_models
from torch.export import Dim

import meshweave

TINY = [n for n in list_models() if n.endswith("-tiny") or n.startswith("hf:")]


def test_zoo_has_the_required_models():
    for name in ("gpt-tiny", "pangu-alpha-2.6b", "pangu-alpha-13b", "pangu-alpha-200b",
                 "llama-tiny", "llama-8b", "llama-70b", "gpt3-175b", "moe-tiny",
                 "convnet-tiny", "hf:gpt2", "hf:llama", "hf:mixtral", "hf:qwen2_moe"):
        assert name in list_models(), name


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_matches_eager(name):
    model, inputs = build_model(name, batch=2, seq=8)
    cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(eager_fallback=False))
    with torch.no_grad():
        expected = model(*inputs)
    assert_same_outputs(expected, cm(*inputs), rtol=1e-4, atol=1e-5,
                        repro=f"meshweave compile --model {name} --batch 2 --seq 8")
    # The registry covers every op of the model: with fallback allowed, nothing falls back.
    opts = meshweave.CompileOptions(eager_fallback=True)
    fallback = meshweave.compile(model, inputs, options=opts)
    assert fallback.fallback_ops == [], fallback.fallback_ops


def test_llama_dynamic_batch():
    model, inputs = build_model("llama-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, inputs,
                           dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    for b in (1, 3, 16):
        ids = torch.randint(0, 128, (b, 8))
        with torch.no_grad():
            assert_same_outputs(model(ids), cm(ids), rtol=1e-4, atol=1e-5,
                                repro=f"llama-tiny dynamic batch {b}")


def test_planning_scale_model_traces_on_meta():
    from meshweave.models import get_model_spec

    spec = get_model_spec("llama-8b", num_layers=2)
    model = spec.build(device="meta")
    cm = meshweave.compile(model, spec.example_inputs(batch=1, seq=16, device="meta"))
    assert all(t.device.type == "meta" for t in cm.graph.tensors.values())
    assert "estimated FLOPs" in cm.explain()
