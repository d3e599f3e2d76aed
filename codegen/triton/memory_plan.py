"""Buffer reuse: which freshly allocated kernel outputs can take the memory of a dead buffer.

Inductor's wrapper does the same ("buf3 = buf0; del buf0  # reuse"): at batch 1 a forward is
bound by the host, and every torch.empty is a few microseconds of it; at large batch the reuse
also lowers peak memory. The rule is simple liveness over the schedule:

  * a buffer's *last use* is the position of the last group that reads it, directly or through
    views of it (views alias their base: a view read later keeps the base alive); values that
    leave the graph are never dead;
  * outputs of nodes run by the reference executor may alias their inputs, so reading such an
    output also counts as reading those inputs;
  * a kernel group at position i may write into a buffer of the same shape and dtype whose last
    use is before i (never one it reads itself).

Only buffers the wrapper allocates (kernel group outputs) are pooled; inputs, parameters and
attention outputs are not.
"""

from __future__ import annotations

from meshweave.ir.graph import Graph, Value
from meshweave.ir.types import TensorType
from .indexing import to_expr
from .schedule import Schedule

_FOREVER = float("inf")


def plan_reuse(graph: Graph, sched: Schedule) -> dict[Value, Value]:
    """{output value: the dead buffer value whose memory it takes}, in schedule order."""
    roots_memo: dict[Value, frozenset] = {}

    def roots(v: Value) -> frozenset:
        """The values whose memory v may alias (itself included)."""
        if v in roots_memo:
            return roots_memo[v]
        roots_memo[v] = frozenset((v,))  # cycles are impossible in a DAG; this guards anyway
        n = v.producer
        out = {v}
        if n is not None:
            kind = sched.kinds.get(n)
            group = sched.group_of.get(n)
            aliasing = kind == "view" or (group is not None and not group.is_kernel)
            if aliasing:
                for u in n.inputs:
                    if isinstance(u.type, TensorType):
                        out |= roots(u)
        roots_memo[v] = frozenset(out)
        return roots_memo[v]

    last: dict[Value, float] = {}
    for i, g in enumerate(sched.groups):
        members = set(g.nodes)
        for n in g.nodes:
            for v in n.inputs:
                if not isinstance(v.type, TensorType) or v.producer in members:
                    continue
                for r in roots(v):
                    last[r] = max(last.get(r, -1), i)
    for v in graph.outputs:
        if isinstance(v.type, TensorType):
            for r in roots(v):
                last[r] = _FOREVER

    reuse: dict[Value, Value] = {}
    live: list[Value] = []  # allocated buffers not yet released to the pool
    pool: dict[tuple, list[Value]] = {}
    for i, g in enumerate(sched.groups):
        still = []
        for b in live:  # release the buffers nobody reads from position i on
            if last.get(b, -1) < i:
                pool.setdefault(_key(b), []).append(b)
            else:
                still.append(b)
        live = still
        if g.kind not in ("pointwise", "reduction", "matmul"):
            continue
        for v in g.outputs:
            free = pool.get(_key(v))
            if free:
                reuse[v] = free.pop()
            live.append(v)
    return reuse


def _key(v: Value) -> tuple:
    t = v.tensor_type
    return tuple(str(to_expr(d)) for d in t.shape), str(t.dtype)
