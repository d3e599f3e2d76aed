"""Per-op sharding rules: how each op can run over ONE mesh axis.

A rule takes an `OpView` (the node plus the global types of its values) and returns the
`AxisStrategy`s the op supports on a single mesh axis: the placement it needs for each input
and the placement it produces for each output. The all-replicated strategy is always added by
`axis_strategies`, so a rule lists only the sharded ones. Strategies over a whole mesh are the
products of per-axis strategies (node_strategies.py), checked there for divisibility.

This module holds the vocabulary (AxisStrategy, OpView) and the two tables: `SHARDING_RULES`
keyed by op name, and `CATEGORY_RULES` keyed by op category for ops without a rule of their
own. The rules themselves register from compute_rules.py, shape_rules.py, quant_rules.py and
moe_rules.py (the package's __init__ loads them):

  pointwise        follow the (broadcast) inputs; add/sub (and aliases) also carry Partial
  linear/mm/addmm  batch dims, Megatron column (weight S(0)) and row (weight S(1) -> Partial)
  bmm              batch (or expert: stacked weights S(0)), column, row (-> Partial)
  sdpa             batch and heads; query-sequence sharding when not causal
  embedding        batch, vocab-parallel (weight S(0) -> Partial), hidden (weight S(1))
  views            track dimensions through split/merge groups (only a group's major dim);
                   these and the other data-movement/creation rules: shape_rules.py
  reductions/norms/softmax  shard any dim they do not reduce; sum/mean over it -> Partial
  quant.linear     batch, column (packed weight columns), row at group boundaries (-> Partial)
  moe.experts      batch, ep (stacked experts S(0) too), row: expert slicing on f (-> Partial)
Ops without a rule run replicated. Tags name strategies ("col", "row", "vocab", "heads",
"batch", "expert", "ep", "follow") for the Megatron heuristic and for dumps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable, lookup
from meshweave.ir.sharding import Partial, Placement, Replicate, Shard
from meshweave.ir.types import TensorType

SHARDING_RULES = RuleTable("sharding")
# Fallback rules by op category (registry OpInfo.category), for ops without a rule of their own.
CATEGORY_RULES = RuleTable("sharding_by_category")
R, P = Replicate(), Partial()


@dataclasses.dataclass(frozen=True, slots=True)
class AxisStrategy:
    """One way to run a node over one mesh axis.

    `ins` has one entry per `node.inputs` element (None for non-tensor values), `outs` one per
    node output (None for non-tensor outputs).
    """

    ins: tuple[Placement | None, ...]
    outs: tuple[Placement | None, ...]
    tag: str = "R"


_INPUTS: dict[Node, list[Value]] = {}


def node_inputs(n: Node) -> list[Value]:
    """`n.inputs`, memoised: the planner asks for it millions of times (nodes are not mutated
    once built; lowering builds new ones)."""
    ins = _INPUTS.get(n)
    if ins is None:
        if len(_INPUTS) > 200_000:
            _INPUTS.clear()
        ins = _INPUTS[n] = n.inputs
    return ins


class OpView:
    """A node with the (global, effective) types of its values, as rules see it."""

    def __init__(self, node: Node, types: dict[Value, Any]):
        self.node = node
        self.inputs: list[Value] = node_inputs(node)
        self.types = types
        self.base = node.op.split(".")[1] if "." in node.op else node.op

    def t(self, v: Any) -> TensorType | None:
        if not isinstance(v, Value):
            return None
        t = self.types.get(v, v.type)
        return t if isinstance(t, TensorType) else None

    @property
    def out_types(self) -> list[TensorType | None]:
        return [self.t(o) for o in self.node.outputs]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def tensor_inputs(self) -> list[Value]:
        return [v for v in self.inputs if self.t(v) is not None]

    def make(
        self, assign: dict[Value, Placement], outs: Placement | Sequence[Placement], tag: str
    ) -> AxisStrategy:
        """Inputs not in `assign` are replicated; `outs` is one placement or one per output."""
        ins = tuple((assign.get(v, R) if self.t(v) is not None else None) for v in self.inputs)
        if isinstance(outs, (Replicate, Shard, Partial)):
            outs = [outs] * len(self.node.outputs)
        o = tuple((p if self.t(v) is not None else None) for p, v in zip(outs, self.node.outputs))
        return AxisStrategy(ins, o, tag)


def replicated(op: OpView) -> AxisStrategy:
    return op.make({}, R, "R")


def axis_strategies(node: Node, types: dict[Value, Any]) -> list[AxisStrategy]:
    """All strategies of `node` on one mesh axis: the rule's, then the replicated one."""
    op = OpView(node, types)
    rule = SHARDING_RULES.get(node.op)
    if rule is None:
        info = lookup(node.op)
        rule = CATEGORY_RULES.get(info.category) if info is not None else None
    out = list(rule(op)) if rule is not None else []
    out.append(replicated(op))
    seen, uniq = set(), []
    for s in out:
        if (s.ins, s.outs) not in seen:
            seen.add((s.ins, s.outs))
            uniq.append(s)
    return uniq


def _norm(d: int, rank: int) -> int:
    return d % rank if rank else 0
