"""The pass pipeline: pure Graph -> Graph functions in one explicit, ordered list.

Each pass is timed and recorded in the graph's provenance; the verifier runs after each one;
with a dump directory set, the IR after every pass is written as NN_<pass>.mwir.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from ..ir.graph import Graph, PassRecord
from ..ir.printer import print_graph
from ..ir.verify import verify

PassFn = Callable[[Graph], Graph]


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    doc: str = ""


def default_pipeline() -> list[Pass]:
    """The default ordered list. Later issues insert their passes here, by position."""
    from .constant_fold import constant_fold
    from .cse import cse
    from .dce import dce
    from .moe import recognize_moe
    from .shape_prop import shape_prop

    return [
        Pass("shape_prop", shape_prop, "re-derive value types from the registry's rules"),
        Pass("moe", recognize_moe, "MoE blocks -> moe.experts (validated by execution)"),
        Pass("constant_fold", constant_fold, "evaluate nodes whose inputs are all constants"),
        Pass("cse", cse, "merge identical pure nodes"),
        Pass("dce", dce, "drop nodes whose outputs are unused"),
    ]


def dump_graph(graph: Graph, dump_dir: str, index: int, stage: str) -> str:
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"{index:02d}_{stage}.mwir")
    with open(path, "w") as f:
        f.write(print_graph(graph))
    return path


def run_pipeline(
    graph: Graph,
    passes: Sequence[Pass] | None = None,
    *,
    dump_dir: str | None = None,
    verify_each: bool = True,
) -> Graph:
    passes = default_pipeline() if passes is None else list(passes)
    if verify_each:
        verify(graph, after_pass="frontend")
    if dump_dir:
        dump_graph(graph, dump_dir, 0, "frontend")
    for i, p in enumerate(passes, start=1):
        before = len(graph.nodes)
        t0 = time.perf_counter()
        out = p.fn(graph)
        if out is graph:
            raise RuntimeError(f"pass {p.name} returned its input; passes must be pure")
        seconds = time.perf_counter() - t0
        out.provenance = list(graph.provenance) + [
            PassRecord(p.name, seconds, before, len(out.nodes))
        ]
        if verify_each:
            verify(out, after_pass=p.name)
        if dump_dir:
            dump_graph(out, dump_dir, i, p.name)
        graph = out
    return graph
