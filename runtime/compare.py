"""Comparing results like with like: by name and count, never by silently pairing what is there.

Every `--check`, the ONNX verification and the distributed runtime's check against one device
go through `max_errors`. Results are given as sequences (item i is named `<what> i`) or as
mappings (named by key). A missing or extra item, or a shape that differs, raises
`ComparisonError` naming it; an error of 0 always means the values were compared and agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..ir.errors import MeshweaveError


class ComparisonError(MeshweaveError):
    """Two results cannot be compared item by item: a missing, extra or misshapen item."""


def _named(items: Any, what: str) -> dict[str, Any]:
    if isinstance(items, Mapping):
        return {str(k): v for k, v in items.items()}
    return {f"{what} {i}": v for i, v in enumerate(items)}


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(x)


def max_errors(
    expected: Sequence[Any] | Mapping[str, Any],
    got: Sequence[Any] | Mapping[str, Any],
    *,
    what: str = "output",
    where: str = "",
) -> dict[str, float]:
    """Max absolute error of each item, by name. Raises ComparisonError when the two sides
    do not hold the same items, an item's shape differs, or there is nothing to compare.

    Empty tensors count as compared (error 0) once their shapes agree; NaN against NaN is 0,
    NaN against a number is inf.
    """
    at = f" ({where})" if where else ""
    want, have = _named(expected, what), _named(got, what)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:6])}")
        raise ComparisonError(
            f"{len(have)} {what}s against {len(want)} expected{at}: {'; '.join(parts)}"
        )
    if not want:
        raise ComparisonError(f"no {what}s to compare{at}")
    out: dict[str, float] = {}
    for name, w in want.items():
        a, b = _as_tensor(w), _as_tensor(have[name])
        if tuple(a.shape) != tuple(b.shape):
            raise ComparisonError(
                f"{name}{at}: shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            )
        out[name] = _max_abs(a, b)
    return out


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.numel():
        return 0.0
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    err = float(diff.max())
    return math.inf if math.isnan(err) else err


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested output structure, in order (pytree leaves)."""
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def worst(errors: Mapping[str, float]) -> tuple[str, float]:
    """The item with the largest error, and that error."""
    name = max(errors, key=lambda k: errors[k])
    return name, errors[name]
