"""Call-time checks of a CompiledModel's arguments against the traced signature.

A mismatch raises ValueError naming the argument, what was expected and what was given.
Dynamic dimensions are checked against their ranges and against each other (two dims traced
as the same symbol must be equal at call time).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree

from meshweave.ir.types import TensorType, dtype_short


@dataclasses.dataclass(frozen=True)
class InputSlot:
    name: str  # the argument path, e.g. "args[0]" or "kwargs['attention_mask']"
    expected: Any  # TensorType for tensors, else the traced constant


def _path_name(path) -> str:
    parts = pytree.keystr(path)
    if parts.startswith("[0]"):
        return "args" + parts[3:]
    if parts.startswith("[1]"):
        return "kwargs" + parts[3:]
    return parts


class Signature:
    def __init__(self, in_spec: pytree.TreeSpec, slots: list[InputSlot],
                 symbols: dict[sympy.Symbol, tuple[int, int, int | None]], arg_names: list[str]):
        self.in_spec = in_spec
        self.slots = slots
        self.symbols = symbols
        self.arg_names = arg_names

    def local_batch(self, dp: int, batched: list[bool]) -> Signature:
        """The signature one rank is called with under CompileOptions(local_batch=True): the
        slots marked `batched` (traced at dp times the rank's batch) have dim 0 divided by dp."""
        slots = []
        for slot, b in zip(self.slots, batched):
            exp = slot.expected
            if b and isinstance(exp, TensorType) and isinstance(exp.shape[0], int):
                exp = TensorType((exp.shape[0] // dp, *exp.shape[1:]), exp.dtype, exp.device)
            slots.append(InputSlot(slot.name, exp))
        return Signature(self.in_spec, slots, self.symbols, self.arg_names)

    def _traced_arity(self) -> tuple[int, list[str]]:
        args_spec, kw_spec = _children(self.in_spec)
        return len(_children(args_spec)), list(kw_spec.context or [])

    def _normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        traced_keys = self._traced_arity()[1]
        if set(kwargs) == set(traced_keys):
            kwargs = {k: kwargs[k] for k in traced_keys}
        return args, kwargs

    def flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        args, kwargs = self._normalize(tuple(args), dict(kwargs))
        leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
        if spec != self.in_spec:
            n_expected, kw_expected = self._traced_arity()
            if n_expected == len(args) and sorted(kw_expected) == sorted(kwargs):
                raise ValueError(f"the arguments' nesting differs from the traced one: expected "
                                 f"{self.in_spec}, got {spec}")
            raise ValueError(
                f"compiled model was traced with {n_expected} positional argument(s) and "
                f"keyword arguments {sorted(kw_expected)}; called with {len(args)} positional "
                f"and keywords {sorted(kwargs)}"
            )
        leaves = [x for _, x in leaves_with_path]
        self.check(leaves, [_path_name(p) for p, _ in leaves_with_path])
        return leaves

    def check(self, leaves: list[Any], names: list[str]) -> None:
        bound: dict[sympy.Symbol, tuple[int, str]] = {}
        for slot, value, name in zip(self.slots, leaves, names):
            exp = slot.expected
            label = f"argument {name} ({slot.name})" if slot.name != name else f"argument {name}"
            if isinstance(exp, TensorType):
                self._check_tensor(label, exp, value, bound)
            elif value != exp and not (isinstance(exp, float) and value == exp):
                raise ValueError(f"{label}: the model was traced with the constant {exp!r} and "
                                 f"specialized to it; got {value!r}. Recompile for this value.")

    def _check_tensor(self, label: str, exp: TensorType, value: Any, bound: dict) -> None:
        if not isinstance(value, torch.Tensor):
            # ValueError like every other signature mismatch, so callers catch one type.
            raise ValueError(f"{label}: expected a tensor {exp}, got {type(value).__name__}")  # noqa: TRY004
        if value.dtype != exp.dtype:
            raise ValueError(f"{label}: expected dtype {dtype_short(exp.dtype)} "
                             f"({exp.dtype}), got {value.dtype}")
        if value.dim() != exp.rank:
            raise ValueError(f"{label}: expected a {exp.rank}-d tensor of shape {exp}, got "
                             f"shape {tuple(value.shape)}")
        if value.device.type != exp.device and exp.device != "meta":
            raise ValueError(f"{label}: expected device {exp.device}, got {value.device}")
        for i, (d, actual) in enumerate(zip(exp.shape, value.shape)):
            if isinstance(d, int):
                if d != actual:
                    raise ValueError(f"{label}: dim {i} must be {d} (traced shape {exp}); got "
                                     f"shape {tuple(value.shape)}")
                continue
            self._check_symbolic(label, i, d, int(actual), bound, exp)

    def _check_symbolic(self, label, i, d, actual, bound, exp) -> None:
        if not d.is_Symbol:
            # A derived dim (e.g. 2*s0): check it once its symbols are bound by other dims.
            values = {s: bound[s][0] for s in d.free_symbols if s in bound}
            if len(values) == len(d.free_symbols) and int(d.subs(values)) != actual:
                raise ValueError(f"{label}: dim {i} must be {d} = {int(d.subs(values))}, got "
                                 f"{actual}")
            return
        if d.is_Symbol:
            _, lo, hi = self.symbols.get(d, (None, 0, None))
            if actual < lo or (hi is not None and actual > hi):
                raise ValueError(f"{label}: dim {i} ({d}) must be in [{lo}, "
                                 f"{'inf' if hi is None else hi}], got {actual}")
            if d in bound and bound[d][0] != actual:
                raise ValueError(f"{label}: dim {i} ({d}) is {actual} but {bound[d][1]} gave "
                                 f"{d} = {bound[d][0]}")
            bound[d] = (actual, label)


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    """A TreeSpec's children across torch versions (children_specs is deprecated in 2.13)."""
    children = getattr(spec, "children", None)
    if callable(children):
        return list(children())
    return list(spec.children_specs)
