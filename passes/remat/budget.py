"""The memory budget of the rematerialization pass: a fraction or an absolute size.

    MemoryBudget.parse(0.5)       # half the activation bytes that saving everything needs
    MemoryBudget.parse("2GiB")    # an absolute number of saved bytes
    budget.bytes_for(full)        # the byte limit, given what saving everything needs

The fraction is what torch's `activation_memory_budget` means: 1.0 keeps every value the
backward reads (no recomputation), 0 recomputes all it can.
"""

from __future__ import annotations

import dataclasses
import re

from ...ir.errors import MeshweaveError


class RematError(MeshweaveError):
    """A memory budget that cannot be read or cannot be met."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    fraction: float | None = None  # of the bytes that saving everything needs
    nbytes: int | None = None  # absolute
    # a plan's stage budget (StagePlan.memory_budget), estimated on the planner's model: the
    # pass raises it to the smallest feasible budget instead of failing
    at_least_feasible: bool = False

    @classmethod
    def parse(cls, value: float | int | str | MemoryBudget) -> MemoryBudget:
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool):
            raise RematError(f"memory_budget={value!r}: expected a fraction in (0, 1] or a "
                             f"size such as '2GiB', not a bool")
        if isinstance(value, (int, float)):
            if not 0 < value <= 1:
                raise RematError(
                    f"memory_budget={value!r}: a number is a fraction of the activation bytes "
                    f"that saving everything needs and must lie in (0, 1]; give an absolute "
                    f"size as a string, e.g. memory_budget='2GiB'")
            return cls(fraction=float(value))
        if isinstance(value, str):
            m = _SIZE.match(value)
            unit = m.group(2).lower() if m else None
            if m is None or unit not in _UNITS:
                raise RematError(
                    f"memory_budget={value!r}: cannot read this size; expected a number and a "
                    f"unit among B, KB, KiB, MB, MiB, GB, GiB, TB, TiB (e.g. '512MiB')")
            n = float(m.group(1)) * _UNITS[unit]
            if n <= 0:
                raise RematError(f"memory_budget={value!r}: the size must be positive")
            return cls(nbytes=int(n))
        raise RematError(f"memory_budget={value!r}: expected a fraction in (0, 1] or a size "
                         f"string such as '2GiB', got {type(value).__name__}")

    def bytes_for(self, full: float) -> float:
        return self.fraction * full if self.fraction is not None else float(self.nbytes)

    def __str__(self) -> str:
        text = f"{self.fraction:g}" if self.fraction is not None else f"{self.nbytes:,} B"
        return text + (" (the plan's, or the smallest feasible)" if self.at_least_feasible
                       else "")
