"""The planner's layer structure (passes/parallel/search/layers.py) counts the model's real depth.

A reduced trace (two layers of llama-70b on meta) must cluster into one run of identical layers
standing for the config's depth: a layer that differs (rotary tables first used in layer 0) made
llama-70b cost 81 layers (issue 21)."""

from __future__ import annotations

import pytest

from meshweave.cli_parallel import trace_for_planning
from meshweave.models import get_model_spec, list_models
from meshweave.passes.parallel.search.layers import find_layers

# layers outside the numbered stack: PanGu-alpha's top query layer
_OUTSIDE = {"pangu": 1}


def _depth(name: str) -> int | None:
    cfg = get_model_spec(name).config
    for attr in ("num_layers", "n_layer", "num_hidden_layers"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    kwargs = getattr(cfg, "kwargs", {})
    return kwargs.get("num_hidden_layers") or kwargs.get("n_layer")


def _check(name: str) -> None:
    graph, repeats, _ = trace_for_planning(name, 2, 32, "float16", 2, None)
    ls = find_layers(graph, repeats)
    sizes = [len(layer) for layer in ls.layers]
    assert len(set(sizes)) == 1, f"{name}: traced layers differ in size: {sizes}"
    assert ls.cluster is not None and ls.cluster.num_layers == len(ls.layers), name
    outside = next((v for k, v in _OUTSIDE.items() if name.startswith(k)), 0)
    assert ls.num_layers + outside == _depth(name), (name, ls.num_layers, _depth(name))


def test_llama_70b_counts_80_layers():
    _check("llama-70b")


@pytest.mark.heavy
@pytest.mark.parametrize("name", [m for m in list_models() if not m.startswith("convnet")])
def test_every_zoo_model_counts_its_depth(name):
    if name.startswith("hf:"):
        pytest.importorskip("transformers")
    _check(name)
