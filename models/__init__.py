"""meshweave model zoo: a registry of named models for compiler tests and benchmarks.

Usage::

    from meshweave.models import list_models, get_model_spec, build_model

    model, inputs = build_model("llama-tiny")          # eval mode, seeded weights
    spec = get_model_spec("llama-70b")
    spec.param_count()                                 # counted on a meta build
    big = spec.build(device="meta")                    # no weight memory

Families: ``gpt`` (GPT / PanGu-alpha / GPT-3), ``llama``, ``moe``, ``conv`` and
``hf`` (tiny HuggingFace transformers models; needs ``pip install meshweave[hf]``).
"""

from .registry import (
    ModelSpec,
    UnknownModelError,
    build_model,
    get_model_spec,
    get_model_spec_with_layers,
    list_models,
    register_model,
)

# Importing the family modules registers their models.
from . import convnet, gpt, hf, llama, moe  # noqa: F401  isort: skip

__all__ = [
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "get_model_spec",
    "get_model_spec_with_layers",
    "list_models",
    "register_model",
]
