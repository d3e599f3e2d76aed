"""Tracing: torch.export, then decomposition to the documented core op set.

Non-strict export runs the model's Python as written, so models from transformers trace
without graph breaks. Dataclass outputs that torch's pytree does not know yet are registered on
the fly, so a model returning a plain dataclass traces like one returning a HF ModelOutput.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..ir.errors import FrontendError

# Kept whole through decomposition: later passes shard, fuse and lower them as units.
PRESERVED_OPS = (
    torch.ops.aten.linear.default,
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.embedding.default,
)


def _register_dataclass_outputs(out: Any) -> None:
    """Register plain dataclasses in `out` with pytree so export can flatten them."""
    seen = [out]
    while seen:
        x = seen.pop()
        if isinstance(x, (list, tuple)):
            seen.extend(x)
        elif isinstance(x, dict):
            seen.extend(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            if cls not in pytree.SUPPORTED_NODES:
                torch.export.register_dataclass(cls)
            seen.extend(getattr(x, f.name) for f in dataclasses.fields(x))


def export_model(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """torch.export.export with meshweave's defaults, errors wrapped with a repro hint."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"meshweave.compile expects an nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    # A forward hook (not a wrapper module) keeps the model's signature, so dynamic_shapes
    # keyed by argument name and parameter names stay exactly the user's.
    handle = model.register_forward_hook(lambda mod, inp, out: _register_dataclass_outputs(out))
    try:
        return torch.export.export(
            model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict
        )
    except Exception as e:  # re-raised with context, never swallowed
        raise FrontendError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"repro: torch.export.export(model, args, kwargs, dynamic_shapes=..., "
            f"strict={strict})"
        ) from e
    finally:
        handle.remove()


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Lower to Core ATen, keeping PRESERVED_OPS whole."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return ep.run_decompositions(table)
