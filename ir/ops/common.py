"""Helpers shared by the shape and cost rules of the core ops."""

from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch

from ..types import Dim, ScalarType, TensorType, simplify_dim


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        chosen: Dim = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(chosen, int) and chosen == 1:
                chosen = d
            elif isinstance(d, int) and isinstance(chosen, int) and d != chosen:
                raise ValueError(f"shapes {shapes} do not broadcast at dim {i}: {chosen} vs {d}")
        out.append(chosen)
    return tuple(out)


def norm_dim(d: int, rank: int) -> int:
    if rank == 0 and d in (0, -1):
        return 0
    if not -rank <= d < rank:
        raise ValueError(f"dim {d} out of range for rank {rank}")
    return d % rank


def result_dtype(*xs) -> torch.dtype:
    """torch's type promotion over tensor types and Python scalars."""
    tensors = [x for x in xs if isinstance(x, TensorType)]
    dt = tensors[0].dtype
    for t in tensors[1:]:
        if t.rank == 0 and tensors[0].rank > 0:
            continue  # zero-dim tensors do not promote dimensioned ones within a category
        dt = torch.promote_types(dt, t.dtype)
    for x in xs:
        if isinstance(x, (bool, TensorType)):
            continue
        if isinstance(x, float) and not (dt.is_floating_point or dt.is_complex):
            dt = torch.get_default_dtype()
        if isinstance(x, ScalarType) and x.kind == "float" and not dt.is_floating_point:
            dt = torch.get_default_dtype()
    return dt


def numel(shape: Sequence[Dim]) -> Dim:
    n: Dim = 1
    for d in shape:
        n = n * d
    return simplify_dim(n) if isinstance(n, sympy.Expr) else n


def as_dim(x) -> Dim:
    """A size argument: an int, or a ScalarType standing for a SymInt."""
    if isinstance(x, ScalarType):
        if x.expr is None:
            raise ValueError("symbolic size with unknown value")
        return simplify_dim(x.expr)
    return int(x)


def first_tensor(args) -> TensorType:
    for a in args:
        if isinstance(a, TensorType):
            return a
    raise ValueError("op has no tensor argument")
