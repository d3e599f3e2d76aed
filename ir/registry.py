"""The op registry and per-op rule tables.

Every op the IR knows has an OpInfo: its eager implementation (the reference semantics), a
shape/dtype rule, and cost rules (FLOPs, bytes moved). Later components keep their own rules in
RuleTables keyed by op name (sharding strategies, Triton lowerings, ONNX translations), registered
next to the code that uses them. Adding an op means adding entries; nothing dispatches on op
names in an if-chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .errors import UnsupportedOpError
from .types import Dim, TensorType, ValueType

# A shape rule takes (args, kwargs) with every Value replaced by its ValueType and returns the
# output types, or None when it cannot say (then the traced types stand).
ShapeRule = Callable[..., "list[ValueType] | None"]
# A FLOP rule takes (args, kwargs, outputs) with Values replaced by types; returns a count.
FlopRule = Callable[[tuple, dict, list], Dim]


@dataclasses.dataclass(slots=True)
class OpInfo:
    name: str
    eager: Callable[..., Any]
    shape: ShapeRule | None = None
    flops: FlopRule | None = None
    category: str = "other"  # pointwise | reduction | view | matmul | attention | creation | ...
    doc: str = ""
    bytes: FlopRule | None = None  # bytes moved to/from memory; default: inputs + outputs


OPS: dict[str, OpInfo] = {}


def register_op(
    name: str,
    eager: Callable[..., Any] | None = None,
    *,
    shape: ShapeRule | None = None,
    flops: FlopRule | None = None,
    category: str = "other",
    doc: str = "",
    bytes: FlopRule | None = None,
) -> OpInfo:
    """Add (or replace) an op. `eager` defaults to the torch op of the same name."""
    info = OpInfo(name, eager or resolve_torch_op(name), shape, flops, category, doc, bytes)
    OPS[name] = info
    return info


def lookup(name: str) -> OpInfo | None:
    _ensure_core_ops()
    return OPS.get(name)


def require(name: str, source: str = "") -> OpInfo:
    info = lookup(name)
    if info is None:
        raise UnsupportedOpError(name, source)
    return info


def resolve_torch_op(name: str) -> Callable[..., Any]:
    """'aten.add.Tensor' -> torch.ops.aten.add.Tensor (any torch.ops namespace)."""
    parts = name.split(".")
    if len(parts) < 2:
        raise UnsupportedOpError(name, what="torch.ops namespace")
    obj: Any = torch.ops
    try:
        for p in parts:
            obj = getattr(obj, p)
    except (AttributeError, RuntimeError) as e:
        raise UnsupportedOpError(name, what="torch.ops namespace") from e
    if isinstance(obj, torch._ops.OpOverloadPacket):
        obj = obj.default
    return obj


class RuleTable:
    """Rules of one kind (sharding, lowering, ...), keyed by op name."""

    tables: dict[str, RuleTable] = {}

    def __init__(self, kind: str):
        self.kind = kind
        self.rules: dict[str, Any] = {}
        RuleTable.tables[kind] = self

    def register(self, *ops: str) -> Callable[[Any], Any]:
        def deco(rule: Any) -> Any:
            for op in ops:
                self.rules[op] = rule
            return rule

        return deco

    def get(self, op: str, default: Any = None) -> Any:
        return self.rules.get(op, default)

    def require(self, op: str, source: str = "") -> Any:
        if op not in self.rules:
            raise UnsupportedOpError(op, source, what=f"{self.kind} rule table", hint="add a rule")
        return self.rules[op]

    def __contains__(self, op: str) -> bool:
        return op in self.rules


_loaded = False


def _ensure_core_ops() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import ops  # noqa: F401  (registers the core op set)



# Categories whose ops move no data of their own (views are index arithmetic; sym ops are host
# scalars).
_NO_TRAFFIC = {"view", "sym", "constant", "assert"}


def default_bytes(category: str, args: tuple, kwargs: dict, outs: list) -> Dim:
    """Bytes an op reads and writes when nothing is fused: its tensor inputs and outputs."""
    if category in _NO_TRAFFIC:
        return 0
    def tensors(tree):
        if isinstance(tree, TensorType):
            yield tree
        elif isinstance(tree, (list, tuple)):
            for x in tree:
                yield from tensors(x)
        elif isinstance(tree, dict):
            for x in tree.values():
                yield from tensors(x)

    total: Dim = 0
    for t in list(tensors((args, kwargs))) + list(tensors(outs)):
        total = total + t.nbytes()
    return total


def node_cost(node) -> tuple[Dim, Dim]:
    """(FLOPs, bytes moved) of one IR node by its registry rules; (0, 0) for unknown ops."""
    from .graph import map_values

    info = lookup(node.op)
    if info is None:
        return 0, 0
    args = map_values(node.args, lambda v: v.type)
    kwargs = map_values(node.kwargs, lambda v: v.type)
    outs = [o.type for o in node.outputs]
    flops = info.flops(args, kwargs, outs) if info.flops else 0
    moved = (info.bytes(args, kwargs, outs) if info.bytes
             else default_bytes(info.category, args, kwargs, outs))
    return flops, moved
