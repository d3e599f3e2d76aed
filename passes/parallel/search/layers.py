"""Find the repeated layers of a traced model and one representative of them.

Parameters name their layer: `blocks.3.attn.qkv.weight`, `model.layers.3...`, `transformer.h.3`.
The numbered container with the most distinct indices is the layer stack; a node belongs to
the layer of the layer parameters it reads, a node that reads only values from before the
layers (a rotary table's reshape, first used in layer 0) to `pre`, other nodes without
parameters to the layer being built when they appear, and everything before the first layer (embeddings) or from the first
use of a non-layer parameter after it (final norm, LM head) to `pre` / `post`.

Layers are fingerprinted (ops, shapes, constant arguments, where each input comes from) and
grouped by `clustering.cluster_layers`; the largest run of identical layers becomes the
*representative* cluster. The planner solves one copy of it, weighted by how many layers it
stands for, and copies the decision to every layer (`rep_of`). A graph traced with fewer
layers than the real model (planning a 96-layer model from a 2-layer trace) says so with
`repeats`, the real number of layers of the cluster.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from meshweave.ir.graph import Graph, Node, Value, iter_values
from ..intra_op.clustering import LayerCluster, cluster_layers

_NUMBERED = re.compile(r"(?:^|\.)([A-Za-z_][\w]*)\.(\d+)\.")


@dataclasses.dataclass
class LayerStructure:
    pre: list[Node]
    layers: list[list[Node]]  # traced layers in order
    post: list[Node]
    container: str | None
    cluster: LayerCluster | None  # main run of identical traced layers (period 1)
    repeats: int  # real number of layers the cluster stands for (>= cluster.repeats)
    rep_of: dict[Any, Any]  # node/value of a clustered layer -> the representative's
    loop_edges: list[tuple[Value, Node, int]]  # layer->next-layer edges on the representative:
    # (value, consumer, input index)

    @property
    def rep_layer(self) -> list[Node]:
        return self.layers[self.cluster.start] if self.cluster else []

    def segment_of(self, n: Node) -> tuple[str, int]:
        for i, layer in enumerate(self.layers):
            if n in self._sets[i]:
                return ("layer", i)
        return ("pre", -1) if n in self._pre else ("post", -1)

    def __post_init__(self) -> None:
        self._sets = [set(layer) for layer in self.layers]
        self._pre = set(self.pre)

    @property
    def num_layers(self) -> int:
        """Layers of the real model: unclustered traced layers plus the cluster's repeats."""
        extra = len(self.layers) - (self.cluster.num_layers if self.cluster else 0)
        return extra + (self.repeats if self.cluster else 0)


def _layer_container(targets: list[str]) -> str | None:
    seen: dict[str, set[str]] = {}
    for t in targets:
        for m in _NUMBERED.finditer(t):
            prefix = t[: m.start(2)].rstrip(".")
            seen.setdefault(prefix, set()).add(m.group(2))
    if not seen:
        return None
    best = max(seen, key=lambda p: (len(seen[p]), -len(p)))
    return best if len(seen[best]) >= 1 else None


def _param_layer(target: str | None, container: str | None) -> int | None:
    if not target or not container or not target.startswith(container + "."):
        return None
    rest = target[len(container) + 1 :]
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def find_layers(graph: Graph, repeats: int | None = None) -> LayerStructure:
    """Split `graph` into pre / layers / post and cluster the identical layers."""
    params = [v for v in graph.inputs if v.kind in ("param", "buffer")]
    container = _layer_container([v.target or "" for v in params])
    layer_of_input = {v: _param_layer(v.target, container) for v in params}
    index_of: dict[int, int] = {}
    for i in sorted({x for x in layer_of_input.values() if x is not None}):
        index_of[i] = len(index_of)
    pre: list[Node] = []
    post: list[Node] = []
    layers: list[list[Node]] = [[] for _ in index_of]
    current, in_post = -1, False
    shared = {v for v in graph.inputs if layer_of_input.get(v) is None}  # not a layer's own
    for n in graph.nodes:
        ins = [v for v in n.inputs if v in layer_of_input]
        lids = [index_of[layer_of_input[v]] for v in ins if layer_of_input[v] is not None]
        if not in_post and not ins and all(v in shared for v in n.inputs):
            # reads only what precedes the layers (rotary tables, masks): first used inside
            # layer 0 and shared by all after CSE; counted in layer 0 it would make layer 0
            # differ from the others and break the layer count
            pre.append(n)
            shared.update(n.outputs)
            continue
        if (
            not in_post
            and current >= 0
            and any(layer_of_input[v] is None for v in ins)
            and not lids
        ):
            in_post = True
        if in_post:
            post.append(n)
        elif lids:
            current = max(current, max(lids))
            layers[current].append(n)
        elif current >= 0:
            layers[current].append(n)
        else:
            pre.append(n)
            shared.update(n.outputs)
    return _cluster(graph, pre, [x for x in layers if x], post, container, repeats)


def _fingerprint(layer: list[Node]) -> tuple:
    pos = {o: (i, k) for i, n in enumerate(layer) for k, o in enumerate(n.outputs)}

    def ref(a: Any) -> Any:
        if isinstance(a, Value):
            if a in pos:
                return ("L", pos[a])
            return (a.kind, str(a.type))
        if isinstance(a, (list, tuple)):
            return tuple(ref(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, ref(x)) for k, x in a.items())
        return repr(a)

    return tuple(
        (n.op, ref(n.args), ref(n.kwargs), tuple(str(o.type) for o in n.outputs)) for n in layer
    )


def _cluster(
    graph: Graph,
    pre: list[Node],
    layers: list[list[Node]],
    post: list[Node],
    container: str | None,
    repeats: int | None,
) -> LayerStructure:
    fps = [_fingerprint(layer) for layer in layers]
    clusters = cluster_layers(fps) if fps else []
    main = max(clusters, key=lambda c: c.num_layers, default=None)
    if main is not None and main.num_layers < 1:
        main = None
    rep_of: dict[Any, Any] = {}
    loops: list[tuple[Value, Node, int]] = []
    if main is not None:
        rep = layers[main.start]
        for j in main.layers():
            for a, b in zip(layers[j], rep):
                rep_of[a] = b
                for x, y in zip(a.outputs, b.outputs):
                    rep_of[x] = y
                for x, y in zip(iter_values((a.args, a.kwargs)), iter_values((b.args, b.kwargs))):
                    if x.producer is None and x is not y:
                        rep_of.setdefault(x, y)
        if main.repeats >= 2:
            loops = _loop_edges(layers[main.start], layers[main.start + 1], rep_of)
    real = repeats if repeats is not None else (main.num_layers if main else 0)
    if main is not None and real < main.num_layers:
        raise ValueError(
            f"find_layers: repeats={real} is fewer than the {main.num_layers} "
            "traced identical layers"
        )
    return LayerStructure(pre, layers, post, container, main, real, rep_of, loops)


def _loop_edges(
    first: list[Node], second: list[Node], rep_of: dict
) -> list[tuple[Value, Node, int]]:
    """Edges from layer k to layer k + 1 on the representative: (value, consumer, index)."""
    inside = {o for n in first for o in n.outputs}
    out = []
    for n in second:
        for i, v in enumerate(n.inputs):
            if v in inside:
                out.append((rep_of.get(v, v), rep_of[n], i))
    return out
