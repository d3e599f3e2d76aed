"""Validation at a smaller width, for blocks too large to run (mixtral-8x7b on the meta device).

A block's program does not depend on its width: d, f (and 2f for a fused gate-up) appear only
as sizes, in the types and in the shape arguments of its views, expands and splits. So the
same program with every such size divided by one common factor c is the block at width d/c,
and validating it there says what validating at full width would: which moe.experts call it
is. c divides every width (so 2f stays twice f, a split of [f, f] stays even) and leaves the
smallest at least MIN_WIDTH. The token count T and the expert count E are kept (the routing is
what validation exercises); when T equals a width it is scaled with it, together with T * k
and T * E, so that a shape argument means the same thing after scaling.

A size that coincides with an unrelated one (E equal to d / c, say) may be scaled wrongly;
then the smaller program computes something else, validation fails, and the block stays dense.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

MIN_WIDTH = 8


@dataclasses.dataclass(frozen=True)
class Scale:
    factor: int
    sizes: dict[int, int]  # full size -> scaled size

    def dim(self, v: int) -> int:
        return self.sizes.get(v, v)

    def shape(self, shape: Iterable[int]) -> tuple[int, ...]:
        return tuple(self.dim(s) for s in shape)

    def literals(self, tree):
        """Shape arguments with every known size scaled (ints only: bools and dims stay)."""
        if isinstance(tree, bool):
            return tree
        if isinstance(tree, int):
            return self.sizes.get(tree, tree)
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.literals(x) for x in tree)
        if isinstance(tree, dict):
            return {k: self.literals(v) for k, v in tree.items()}
        return tree


IDENTITY = Scale(1, {})


def width_scale(tokens: int, top_k: int, num_experts: int, d: int,
                param_shapes: Iterable[tuple[int, ...]]) -> Scale:
    """The largest common factor that keeps every width >= MIN_WIDTH (IDENTITY if none)."""
    widths = {d} | {s for shape in param_shapes for s in shape[1:]}
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    smallest = min(widths)
    factor = max((c for c in _divisors(g) if smallest // c >= MIN_WIDTH), default=1)
    if factor == 1:
        return IDENTITY
    sizes = {w: w // factor for w in widths}
    if tokens in widths:
        for product in (tokens * top_k, tokens * num_experts):
            sizes.setdefault(product, product // factor)
    return Scale(factor, sizes)


def _divisors(n: int) -> list[int]:
    small = [c for c in range(1, math.isqrt(n) + 1) if n % c == 0]
    return sorted(set(small + [n // c for c in small]))
