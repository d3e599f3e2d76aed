"""Model registry: named, config-driven model factories for the meshweave zoo.

Each entry pairs a config factory (returning a dataclass) with a builder
(``config -> nn.Module``) and an example-input function
(``(config, batch, seq, device) -> tuple``). :class:`ModelSpec` wraps one entry
and offers building on any device (``"meta"`` allocates no weight memory),
example inputs, and a parameter count computed on a meta build.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ConfigFactory = Callable[[], Any]
Builder = Callable[[Any], nn.Module]
ExampleInputsFn = Callable[[Any, int, int, "str | torch.device"], tuple]

__all__ = [
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "get_model_spec",
    "list_models",
    "register_model",
]


class UnknownModelError(KeyError):
    """Raised when a model name is not in the registry; the message lists known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        self.message = f"unknown model {name!r}; known models: {', '.join(known)}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


@dataclass(frozen=True)
class _Entry:
    name: str
    config_factory: ConfigFactory
    builder: Builder
    example_inputs_fn: ExampleInputsFn
    description: str
    family: str


_REGISTRY: dict[str, _Entry] = {}


@dataclass
class ModelSpec:
    """A registered model together with a concrete config instance."""

    name: str
    config: Any
    description: str
    family: str
    _builder: Builder = field(repr=False, compare=False)
    _example_inputs_fn: ExampleInputsFn = field(repr=False, compare=False)

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> nn.Module:
        """Construct the model on ``device``; on ``"meta"`` no weight memory is allocated."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = self._builder(self.config)
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
        return model

    def example_inputs(
        self, batch: int = 2, seq: int = 16, device: str | torch.device = "cpu"
    ) -> tuple:
        """Deterministic example inputs (token ids for LMs, images for conv nets)."""
        return self._example_inputs_fn(self.config, batch, seq, device)

    def param_count(self) -> int:
        """Number of unique parameters, counted on a meta-device build."""
        model = self.build(device="meta")
        return sum(p.numel() for p in model.parameters())


def register_model(
    name: str,
    config_factory: ConfigFactory,
    builder: Builder,
    example_inputs_fn: ExampleInputsFn,
    description: str,
    *,
    family: str = "custom",
    overwrite: bool = False,
) -> None:
    """Add a model to the registry. Re-registering a name requires ``overwrite=True``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = _Entry(name, config_factory, builder, example_inputs_fn, description, family)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def get_model_spec(name: str, **config_overrides: Any) -> ModelSpec:
    """Look up ``name``; keyword overrides replace fields of a fresh config instance."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name, list_models()) from None
    config = entry.config_factory()
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    return ModelSpec(
        name=entry.name,
        config=config,
        description=entry.description,
        family=entry.family,
        _builder=entry.builder,
        _example_inputs_fn=entry.example_inputs_fn,
    )


def get_model_spec_with_layers(name: str, num_layers: int | None = None) -> ModelSpec:
    """get_model_spec with the depth set to `num_layers` (None: the zoo config's); a
    ValueError when the model's config has no `num_layers` or the count is not >= 1."""
    spec = get_model_spec(name)
    if num_layers is None:
        return spec
    if not hasattr(spec.config, "num_layers") or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"{name}: cannot set {num_layers!r} layers (want an int >= 1; its config "
            f"{'has' if hasattr(spec.config, 'num_layers') else 'has no'} num_layers)"
        )
    return get_model_spec(name, num_layers=num_layers)


def build_model(
    name: str,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    seq: int = 16,
    **config_overrides: Any,
) -> tuple[nn.Module, tuple]:
    """Seed torch, build ``name`` in eval mode and return ``(model, example_inputs)``.

    Floating-point example inputs are cast to ``dtype`` so they match the weights; keyword
    overrides replace config fields (``num_layers=3``), as in get_model_spec.
    """
    spec = get_model_spec(name, **config_overrides)
    model = spec.build(device=device, dtype=dtype, seed=seed)
    inputs = spec.example_inputs(batch=batch, seq=seq, device=device)
    inputs = tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
    )
    return model.eval(), inputs
