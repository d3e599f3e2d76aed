"""Tests for the meshweave model zoo (meshweave.models)."""

from __future__ import annotations

import dataclasses
import resource
import sys

import pytest
import torch
from meshweave.models import (
    ModelSpec,
    UnknownModelError,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)

TINY_MODELS = [
    "gpt-tiny",
    "pangu-tiny",
    "llama-tiny",
    "moe-tiny",
    "convnet-tiny",
    "hf:gpt2",
    "hf:llama",
    "hf:mixtral",
    "hf:qwen2_moe",
]

# name -> published parameter count
BIG_MODELS = {
    "pangu-alpha-2.6b": 2.6e9,
    "pangu-alpha-13b": 13.1e9,
    "pangu-alpha-200b": 207.0e9,
    "gpt3-175b": 175.0e9,
    "llama-8b": 8.03e9,
    "llama-70b": 70.6e9,
    "mixtral-8x7b": 46.7e9,
    "qwen2-moe-57b": 57.4e9,
}

FAMILIES = {"gpt", "llama", "moe", "conv", "hf"}


def _logits(out: object) -> torch.Tensor:
    """Zoo models return a tensor, HF models a ModelOutput with ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _needs_transformers(name: str) -> None:
    if name.startswith("hf:"):
        pytest.importorskip("transformers")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------- registry


def test_registry_contains_all_models() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(TINY_MODELS) | set(BIG_MODELS) == set(names)


@pytest.mark.parametrize("name", TINY_MODELS + list(BIG_MODELS))
def test_spec_fields(name: str) -> None:
    spec = get_model_spec(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    assert dataclasses.is_dataclass(spec.config) and not isinstance(spec.config, type)
    assert spec.description
    assert spec.family in FAMILIES


def test_unknown_model_lists_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model_spec("no-such-model")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "no-such-model" in message
    for name in list_models():
        assert name in message
    with pytest.raises(KeyError):
        build_model("no-such-model")


def test_duplicate_registration_rejected() -> None:
    spec = get_model_spec("gpt-tiny")
    with pytest.raises(ValueError):
        register_model(
            "gpt-tiny", lambda: spec.config, spec._builder, spec._example_inputs_fn, "dup"
        )


def test_config_overrides_and_fresh_configs() -> None:
    spec = get_model_spec("llama-8b", num_layers=2)
    assert spec.config.num_layers == 2
    assert get_model_spec("llama-8b").config.num_layers == 32
    assert spec.param_count() < get_model_spec("llama-8b").param_count()


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_eager_and_export(name: str) -> None:
    _needs_transformers(name)
    model, inputs = build_model(name)
    assert not model.training
    spec = get_model_spec(name)
    if spec.family == "conv":
        assert inputs[0].dtype == torch.float32 and inputs[0].shape == (2, 3, 32, 32)
    else:
        assert inputs[0].dtype == torch.int64 and inputs[0].shape == (2, 16)

    with torch.no_grad():
        eager = _logits(model(*inputs))
    assert torch.isfinite(eager).all()
    if spec.family == "conv":
        assert eager.shape == (2, spec.config.num_classes)
    else:
        assert eager.shape == (2, 16, spec.config.vocab_size)
    assert 1e-3 < eager.std().item() < 10.0  # well-conditioned random init

    exported = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        traced = _logits(exported.module()(*inputs))
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "moe-tiny", "convnet-tiny"])
def test_seeded_build_is_deterministic(name: str) -> None:
    a, inputs = build_model(name, seed=3)
    b, _ = build_model(name, seed=3)
    c, _ = build_model(name, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), rtol=0, atol=0)
        assert not torch.equal(a(*inputs), c(*inputs))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_meta_build_matches_param_count(name: str) -> None:
    _needs_transformers(name)
    spec = get_model_spec(name)
    meta = spec.build(device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = spec.build(device="cpu")
    assert sum(p.numel() for p in real.parameters()) == spec.param_count()


def test_build_dtype() -> None:
    model, inputs = build_model("convnet-tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert inputs[0].dtype == torch.bfloat16
    with torch.no_grad():
        assert model(*inputs).dtype == torch.bfloat16


def test_llama_dynamic_batch_export() -> None:
    spec = get_model_spec("llama-tiny")
    model, inputs = build_model("llama-tiny")
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(
        model, inputs, dynamic_shapes={"input_ids": {0: batch}}, strict=False
    )
    module = exported.module()
    for b in (1, 3, 8):
        (ids,) = spec.example_inputs(batch=b, seq=16)
        with torch.no_grad():
            out = module(ids)
            ref = model(ids)
        assert out.shape == (b, 16, spec.config.vocab_size)
        torch.testing.assert_close(out, ref)


def test_moe_router_and_stacked_experts() -> None:
    model, _ = build_model("moe-tiny")
    cfg = model.config
    moe = model.layers[0].moe
    assert moe.experts.w_in.shape == (cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size)
    assert moe.experts.w_out.shape == (cfg.num_experts, cfg.expert_ffn_size, cfg.hidden_size)
    assert moe.shared_expert is not None  # PR-MoE residual expert enabled in moe-tiny
    combine = moe.router(torch.randn(10, cfg.hidden_size))
    assert combine.shape == (10, cfg.num_experts)
    assert ((combine > 0).sum(dim=-1) == cfg.top_k).all()
    torch.testing.assert_close(combine.sum(dim=-1), torch.ones(10))


def test_pangu_has_top_query_layer() -> None:
    model, _ = build_model("pangu-tiny")
    assert hasattr(model, "top_query_layer") and hasattr(model, "top_query_emb")
    assert len(model.blocks) == model.config.num_layers - 1
    assert model.lm_head.weight is model.tok_emb.weight  # tied head


def test_hf_missing_transformers_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import` raise
    with pytest.raises(ImportError, match=r"meshweave\[hf\]"):
        get_model_spec("hf:gpt2").build(device="meta")


# ---------------------------------------------------------------- big configs


@pytest.mark.parametrize("name", list(BIG_MODELS))
def test_big_config_meta_param_count(name: str) -> None:
    rss_before = _max_rss_bytes()
    spec = get_model_spec(name)
    model = spec.build(device="meta")
    assert all(t.is_meta for t in model.parameters())
    assert all(t.is_meta for t in model.buffers())
    count = spec.param_count()
    assert abs(count - BIG_MODELS[name]) / BIG_MODELS[name] < 0.03, count
    assert _max_rss_bytes() - rss_before < 512 * 2**20
