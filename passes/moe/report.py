"""What the MoE pass found, per block: graph.meta["moe"], printed by cm.explain()."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEBlockReport:
    router: str  # the router, described (projection, scoring, top-k)
    source: str  # the user's source line of the router's top-k
    num_experts: int
    top_k: int
    node: str | None = None  # the moe.experts output, when rewritten
    experts: str = ""  # layout, gate form and activation of the rewritten node
    weights: tuple[str, ...] = ()  # w_in, w_gate, w_out parameter names
    shared_expert: str | None = None  # the dense shared expert, described
    reason: str | None = None  # why the block stayed dense

    @property
    def recognised(self) -> bool:
        return self.node is not None

    def describe(self) -> str:
        head = f"{self.router}, E={self.num_experts}"
        if not self.recognised:
            return f"{head}: stays dense ({self.reason})"
        shared = f"shared expert {self.shared_expert}" if self.shared_expert else \
            "no shared expert"
        return (f"{head} -> moe.experts %{self.node} ({self.experts}; weights "
                f"{', '.join(self.weights)}); {shared}")


@dataclasses.dataclass
class MoESummary:
    blocks: list[MoEBlockReport]

    @property
    def recognised(self) -> list[MoEBlockReport]:
        return [b for b in self.blocks if b.recognised]

    @property
    def dense(self) -> list[MoEBlockReport]:
        return [b for b in self.blocks if not b.recognised]

    def summary(self) -> str:
        return (f"{len(self.recognised)} of {len(self.blocks)} MoE blocks -> moe.experts "
                f"(dropless), {len(self.dense)} left dense")

    def lines(self) -> list[str]:
        return [f"block {i}: {b.describe()}" for i, b in enumerate(self.blocks)]
