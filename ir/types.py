"""Types carried by IR values: tensor types with symbolic shapes, and scalar (SymInt) types.

A dimension is either a Python int or a sympy expression over the graph's shape symbols
(the dynamic dimensions torch.export traced). Everything downstream (cost models, the planner,
codegen) reads shapes through these helpers so that symbolic and static shapes share one path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Union

import sympy
import torch

Dim = Union[int, sympy.Expr]

_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
}
_SHORT_DTYPE = {v: k for k, v in _DTYPE_SHORT.items()}


def dtype_short(dtype: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


def dtype_from_short(name: str) -> torch.dtype:
    if name in _SHORT_DTYPE:
        return _SHORT_DTYPE[name]
    return getattr(torch, name)


def simplify_dim(d: Dim) -> Dim:
    """Collapse a sympy expression to an int when it is a constant."""
    if isinstance(d, sympy.Expr):
        d = sympy.simplify(d)
        if d.is_Integer:
            return int(d)
        return d
    return int(d)


def dim_str(d: Dim) -> str:
    return str(d)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorType:
    """Shape, dtype and device of a tensor value."""

    shape: tuple[Dim, ...]
    dtype: torch.dtype
    device: str = "cpu"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return simplify_dim(n) if isinstance(n, sympy.Expr) else n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()

    def nbytes(self) -> Dim:
        return self.numel() * self.itemsize

    def concrete_shape(self, hints: Mapping[sympy.Symbol, int] | None = None) -> tuple[int, ...]:
        """The shape with every symbol replaced by its hint (the example input's size)."""
        return tuple(concrete_dim(d, hints) for d in self.shape)

    def with_shape(self, shape: Sequence[Dim]) -> TensorType:
        return TensorType(tuple(simplify_dim(d) for d in shape), self.dtype, self.device)

    def with_dtype(self, dtype: torch.dtype) -> TensorType:
        return TensorType(self.shape, dtype, self.device)

    def __str__(self) -> str:
        dims = ", ".join(dim_str(d) for d in self.shape)
        dev = "" if self.device in ("cpu", "meta") else f" @{self.device}"
        return f"{dtype_short(self.dtype)}[{dims}]{dev}"


@dataclasses.dataclass(frozen=True, slots=True)
class ScalarType:
    """A Python scalar produced inside the graph: a SymInt/SymFloat (size arithmetic)."""

    kind: str  # "int" | "float" | "bool"
    expr: Dim | None = None  # the symbolic value, when known

    def __str__(self) -> str:
        return f"{self.kind}" + (f"={self.expr}" if self.expr is not None else "")


@dataclasses.dataclass(frozen=True, slots=True)
class OpaqueType:
    """A value the IR does not look into (for instance a tuple from an eager fallback op)."""

    description: str = "opaque"

    def __str__(self) -> str:
        return self.description


ValueType = Union[TensorType, ScalarType, OpaqueType]


def concrete_dim(d: Dim, hints: Mapping[sympy.Symbol, int] | None = None) -> int:
    if isinstance(d, int):
        return d
    if hints is None:
        raise ValueError(f"dimension {d} is symbolic and no hint was given")
    v = d.subs(hints)
    if not v.is_number:
        raise ValueError(f"dimension {d} still symbolic after substituting hints {hints}")
    return int(v)


def tensor_type_of(t: torch.Tensor, device: str | None = None) -> TensorType:
    """TensorType of a real, fake or meta tensor; SymInt sizes become sympy expressions."""
    shape = tuple(sym_to_dim(s) for s in t.shape)
    dev = device if device is not None else t.device.type
    return TensorType(shape, t.dtype, dev)


def sym_to_dim(s) -> Dim:
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return simplify_dim(expr) if isinstance(expr, sympy.Expr) else int(expr)
    return int(s)
