"""Typed Triton expressions: TVar, compute types, literals and casts.

Inside a kernel every value is computed in a *compute type*: half and bfloat16 tensors are
loaded and computed in float32 and rounded once when stored (as Inductor does); an explicit
dtype conversion in the IR (aten._to_copy to float16) still rounds, so numerics follow eager
wherever the program asks for a cast.
"""

from __future__ import annotations

import math

import torch

from meshweave.ir.errors import MeshweaveError

TL_STORAGE = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
FLOAT_CTYPES = ("tl.float32", "tl.float64")


class CodegenError(MeshweaveError):
    """Codegen could not emit a kernel; names the op/group so the dump shows where."""


class TVar(str):
    """A Triton expression (usually a tmp variable) with its compute type and the kernel
    axes (x, r, m, n, ...) it varies along; the axes decide masks and broadcasting."""

    ctype: str
    axes: frozenset

    def __new__(cls, text: str, ctype: str, axes=frozenset()):
        s = super().__new__(cls, text)
        s.ctype = ctype
        s.axes = frozenset(axes)
        return s


def compute_ctype(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "tl.float32"
    if dtype not in TL_STORAGE:
        raise CodegenError(f"dtype {dtype} has no Triton type")
    return TL_STORAGE[dtype]


def is_float_ctype(ctype: str) -> bool:
    return ctype in FLOAT_CTYPES


def lit(x) -> str:
    """A Python scalar as Triton source text."""
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, int):
        return f"({x})" if x < 0 else str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else 'float("-inf")'
        return f"({x!r})" if x < 0 else repr(x)
    raise CodegenError(f"cannot use {x!r} ({type(x).__name__}) as a Triton literal")


def literal_value(text: str):
    """The Python value of a literal's source text, or None when `text` is not a literal."""
    special = {'float("inf")': math.inf, 'float("-inf")': -math.inf, 'float("nan")': math.nan}
    if text in special:
        return special[text]
    t = text[1:-1] if text.startswith("(") and text.endswith(")") else text
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return None


def cast(x, ctype: str):
    """Convert a TVar (or Python scalar) to compute type `ctype`."""
    if isinstance(x, TVar) and not x.axes and literal_value(x) is not None:
        return TVar(cast(literal_value(x), ctype), ctype)
    if not isinstance(x, TVar):
        if ctype == "tl.int1":
            return lit(bool(x))
        if is_float_ctype(ctype) and isinstance(x, (int, float)):
            return lit(float(x))
        if not is_float_ctype(ctype) and isinstance(x, float) and math.isfinite(x):
            return lit(int(x))
        return lit(x)
    if x.ctype == ctype:
        return x
    if ctype == "tl.int1":
        return TVar(f"({x} != 0)", ctype, x.axes)
    return TVar(f"{x}.to({ctype})", ctype, x.axes)


def ctype_of_scalar(x) -> str:
    if isinstance(x, bool):
        return "tl.int1"
    if isinstance(x, int):
        return "tl.int64"
    return "tl.float32"


def promote_ctypes(*ctypes: str) -> str:
    order = [
        "tl.int1",
        "tl.uint8",
        "tl.int8",
        "tl.int16",
        "tl.int32",
        "tl.int64",
        "tl.float32",
        "tl.float64",
    ]
    return max(ctypes, key=order.index)
