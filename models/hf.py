"""Tiny HuggingFace ``transformers`` causal LMs with random weights (no downloads).

``transformers`` is optional: it is imported only when one of these models is
built. The models are created with ``AutoModelForCausalLM.from_config`` and
``use_cache=False`` so their ``ModelOutput`` holds no cache objects.

Tracing notes (torch 2.13, transformers 5.x, ``torch.export(strict=False)``):
``attn_implementation="sdpa"`` and ``"eager"`` both export; we use ``"sdpa"``.
MoE models default to ``experts_implementation="grouped_mm"``, which exports as
an opaque ``transformers.grouped_mm_fallback`` custom op plus ``histc``/``sort``;
we select ``"batched_mm"`` instead, which gathers per-(token, expert) weights and
uses plain ``aten.bmm`` with static shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import token_inputs
from .registry import register_model

_CONFIG_CLASSES = {
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
}
_MOE_ARCHS = {"mixtral", "qwen2_moe"}


@dataclass
class HFModelConfig:
    """Which transformers config class to instantiate, and with what arguments."""

    arch: str
    vocab_size: int = 128
    max_seq_len: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    experts_implementation: str | None = None  # MoE archs only


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HuggingFace models need the optional 'transformers' package: pip install meshweave[hf]"
        ) from exc
    return transformers


def build_hf_model(cfg: HFModelConfig) -> nn.Module:
    """Instantiate a randomly initialised transformers causal LM from ``cfg``."""
    transformers = _import_transformers()
    config_cls = getattr(transformers, _CONFIG_CLASSES[cfg.arch])
    hf_config = config_cls(vocab_size=cfg.vocab_size, use_cache=False, **cfg.kwargs)
    extra: dict[str, Any] = {"attn_implementation": cfg.attn_implementation}
    if cfg.arch in _MOE_ARCHS and cfg.experts_implementation is not None:
        extra["experts_implementation"] = cfg.experts_implementation
    return transformers.AutoModelForCausalLM.from_config(hf_config, **extra)


def _hf_inputs(cfg: HFModelConfig, batch: int, seq: int, device: str | torch.device) -> tuple:
    return token_inputs(cfg.vocab_size, batch, seq, device, cfg.max_seq_len)


_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

_SPECS: dict[str, tuple[HFModelConfig, str]] = {
    "hf:gpt2": (
        HFModelConfig(
            "gpt2",
            kwargs={
                "n_layer": 2,
                "n_embd": 64,
                "n_head": 4,
                "n_positions": 64,
                "bos_token_id": 0,
                "eos_token_id": 0,
            },
        ),
        "transformers GPT2LMHeadModel: 2 layers, hidden 64, 4 heads, vocab 128",
    ),
    "hf:llama": (
        HFModelConfig("llama", kwargs=dict(_DECODER)),
        "transformers LlamaForCausalLM: 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 128",
    ),
    "hf:mixtral": (
        HFModelConfig(
            "mixtral",
            kwargs={**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
            experts_implementation="batched_mm",
        ),
        "transformers MixtralForCausalLM: 2 layers, hidden 64, 4 experts top-2, vocab 128",
    ),
    "hf:qwen2_moe": (
        HFModelConfig(
            "qwen2_moe",
            kwargs={
                **_DECODER,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "shared_expert_intermediate_size": 128,
            },
            experts_implementation="batched_mm",
        ),
        "transformers Qwen2MoeForCausalLM: 2 layers, hidden 64, 4 experts top-2 + shared expert",
    ),
}


def _factory(template: HFModelConfig) -> Callable[[], HFModelConfig]:
    """Config factory returning a fresh copy (the kwargs dict is not shared)."""
    return lambda: dataclasses.replace(template, kwargs=dict(template.kwargs))


for _name, (_template, _desc) in _SPECS.items():
    register_model(_name, _factory(_template), build_hf_model, _hf_inputs, _desc, family="hf")
