"""The dispatch + experts + combine region behind one router, found by structure alone.

From the router's top-k outputs the matcher takes:
  y        the combine: the first [T, .] value after the top-k that depends on the top-k
           scores, the top-k ids and a parameter with a leading expert dim [E, ., .];
  params   those expert parameters (what y depends on among them);
  weights  the top-k scores as the region reads them: renormalised, cast, or gathered from
           the router's probabilities at the top-k ids;
  ids      the top-k ids as the region reads them;
  x        the one [T, d] activation the experts read (seen through views, permutes, expands);
  nodes    everything on a path from those inputs to y, plus the constants it reads (arange)
           and the values it reads for their shape only (zeros_like(probs) before a scatter).
The region must be closed (nothing inside is read from outside but y) or it cannot be replaced.
What it computes is not assumed: validate.py runs it against `moe.experts`.
"""

from __future__ import annotations

import dataclasses

from meshweave.ir.graph import Graph, Node, Value
from .graph_walk import (
    SHAPE_ONLY_OPS,
    Inputs,
    ancestors,
    constant_only,
    dependency_flags,
    is_state,
    pure_descendants,
    shape_of,
    through_shape_ops,
    users_of,
)
from .router import Router

MAX_COMBINE_CANDIDATES = 4


class NoMatch(Exception):
    """The structure is not an MoE block (the message says which piece is missing)."""


@dataclasses.dataclass
class Scope:
    """One router's search: the graph as it stands, with its node inputs and users indexed."""

    graph: Graph
    router: Router
    ins: Inputs
    order: list[Node] = dataclasses.field(init=False)
    users: dict[Value, list[Node]] = dataclasses.field(init=False)
    start: int = dataclasses.field(init=False)  # the first node after the top-k
    constants: dict[Node, bool] = dataclasses.field(default_factory=dict)  # constant_only memo
    scores: list[Value] = dataclasses.field(init=False)  # values made from the routing alone
    choices: list[Value] = dataclasses.field(init=False)  # values made from the top-k ids alone

    def __post_init__(self):
        self.order = list(self.graph.nodes)
        self.users = users_of(self.order, self.ins)
        self.start = self.order.index(self.router.topk) + 1
        # the values computed from the routing alone: the weights may renormalise the top-k
        # values, or gather the router's scores at the top-k ids
        r = self.router
        self.scores = pure_descendants([r.values, r.ids, r.scores], self.order, self.constants,
                                       self.ins)
        self.choices = pure_descendants([r.ids], self.order, self.constants, self.ins)


@dataclasses.dataclass
class Region:
    router: Router
    x: Value
    weights: Value
    ids: Value
    params: list[Value]  # expert parameters, in the order the region first reads them
    y: Value
    nodes: list[Node]  # in program order
    constants: list[Value]  # state inputs the region reads besides params (scalar tensors)
    shape_inputs: list[Value]  # read only for their shape (zeros_like(probs))
    hints: dict = dataclasses.field(default_factory=dict)  # symbol -> traced size
    # region nodes made from the routing alone whose values are read outside it too (a
    # load-balancing loss counting each expert's one-hot choices): they stay in the graph
    kept: list[Node] = dataclasses.field(default_factory=list)


def expert_params(graph: Graph, num_experts: int) -> set[Value]:
    return {v for v in graph.inputs if v.kind == "param" and shape_of(v) is not None
            and len(v.type.shape) == 3 and v.type.shape[0] == num_experts}


def combine_candidates(sc: Scope, experts: set[Value]):
    """Values that may be the combine output y, in program order."""
    router = sc.router
    after = sc.order[sc.start:]
    roots = {router.scores: "w", router.values: "w", router.ids: "i"}
    flags = dependency_flags(after, roots, experts, sc.ins)
    found = 0
    for n in after:
        for o in n.outputs:
            shape = shape_of(o)
            if shape is None or len(shape) != 2 or shape[0] != router.tokens:
                continue
            f = flags.get(o, frozenset())
            if "w" in f and "i" in f and f & experts:
                yield o, [p for p in f if p in experts]
                found += 1
                if found >= MAX_COMBINE_CANDIDATES:
                    return


def match_region(sc: Scope, y: Value, params: list[Value]) -> Region:
    """The region ending at `y`; raises NoMatch naming what does not fit."""
    anc = ancestors([y], sc.ins)
    w_cands = _routing_values(sc.scores, anc, sc.router, floating=True)
    i_cands = _routing_values(sc.choices, anc, sc.router, floating=False)
    if not w_cands or not i_cands:
        raise NoMatch(f"the combine %{y.name} does not read the top-k "
                      f"{'scores' if not w_cands else 'ids'} as a [T, k] tensor")
    last_error = None
    for w in w_cands:
        for i in i_cands:
            try:
                return _region_for(sc, y, params, w, i, anc)
            except NoMatch as e:
                last_error = last_error or e
    raise last_error


def _routing_values(values: list[Value], anc: set[Node], router: Router,
                    floating: bool) -> list[Value]:
    """Those of `values` that are [T, k] and that y depends on, the latest first."""
    want = (router.tokens, router.top_k)
    return [v for v in reversed(values) if shape_of(v) == want and v.producer in anc
            and v.type.dtype.is_floating_point == floating]


def _region_for(sc: Scope, y: Value, params, w: Value, i: Value, anc: set[Node]) -> Region:
    sources = {w, i, *params}
    routing = ancestors([w, i], sc.ins)  # the router's side: what makes the weights and ids
    inside: set[Node] = set()
    produced: set[Value] = set()
    for n in sc.order:
        if n in anc and n not in routing and any(v in sources or v in produced
                                                 for v in sc.ins[n]):
            inside.add(n)
            produced.update(n.outputs)
    routing = {*sc.scores, *sc.choices}
    extra_state: list[Value] = []
    externals: list[Value] = []
    shape_inputs: list[Value] = []
    for n in sc.order:
        if n not in inside:
            continue
        for v in sc.ins[n]:
            if v in sources or v in produced:
                continue
            if v.producer is not None and v.producer.op in SHAPE_ONLY_OPS:
                inside.add(v.producer)
                produced.update(v.producer.outputs)
                shape_inputs += [u for u in sc.ins[v.producer] if u not in shape_inputs]
            elif is_state(v):
                if v not in extra_state:
                    extra_state.append(v)
            elif v in routing:
                raise NoMatch(f"the region reads the top-k output through more than one "
                              f"value (%{v.name} besides %{w.name} and %{i.name})")
            elif v.producer is not None and constant_only(v.producer, sc.constants):
                _pull_constant(v.producer, inside, produced, extra_state)
            else:
                externals.append(v)
    x = _dispatch_input(externals, sc.router, inside, produced)
    if shape_of(x) != (sc.router.tokens, shape_of(y)[1]) or x.type.dtype != y.type.dtype:
        raise NoMatch(f"the combine %{y.name}: {y.type} does not match the expert input "
                      f"%{x.name}: {x.type}")
    nodes = [n for n in sc.order if n in inside]
    kept = _check_closed(sc, nodes, y, {x, *params})
    first_use = {}
    for n in nodes:
        for v in sc.ins[n]:
            if v in params:
                first_use.setdefault(v, len(first_use))
    return Region(sc.router, x, w, i, sorted(params, key=first_use.__getitem__), y, nodes,
                  extra_state, shape_inputs, sc.graph.hints(), kept)


def _pull_constant(n: Node, inside: set, produced: set, extra_state: list) -> None:
    if n in inside:
        return
    for v in n.inputs:
        if v.producer is not None:
            _pull_constant(v.producer, inside, produced, extra_state)
        elif v not in extra_state:
            extra_state.append(v)
    inside.add(n)
    produced.update(n.outputs)


def _dispatch_input(externals: list[Value], router: Router, inside: set, produced: set) -> Value:
    """The one [T, d] activation every external read of the region is a view of; the views
    between it and the reads join the region."""
    if not externals:
        raise NoMatch("the experts read no token activations")
    chains = [through_shape_ops(v) for v in externals]
    common = set(chains[0]).intersection(*map(set, chains[1:]))
    x = next((v for v in chains[0] if v in common and len(v.type.shape) == 2
              and v.type.shape[0] == router.tokens), None)
    if x is None:
        names = ", ".join(f"%{v.name}: {v.type}" for v in externals[:4])
        raise NoMatch(f"the experts read activations that are not views of one [T, d] tensor: "
                      f"{names}")
    for chain in chains:
        for v in chain[:chain.index(x)]:
            inside.add(v.producer)
            produced.update(v.producer.outputs)
    return x


def _check_closed(sc: Scope, nodes: list[Node], y: Value,
                  experts_side: set[Value]) -> list[Node]:
    """The region's nodes whose values must stay for readers outside it: only routing-only
    ones (made without the expert input or weights) may; any other outside read is NoMatch."""
    members = set(nodes)
    outs = set(sc.graph.outputs)
    tainted = set(experts_side)  # values made from x or the expert weights
    for n in nodes:
        if any(v in tainted for v in sc.ins[n]):
            tainted.update(n.outputs)
    kept: set[Node] = set()
    for n in nodes:
        if any(o in outs or any(u not in members for u in sc.users.get(o, ()))
               for o in n.outputs if o is not y) and not any(o in tainted for o in n.outputs):
            kept.add(n)
    for n in reversed(nodes):  # with the region nodes they read
        if n in kept:
            kept.update(v.producer for v in sc.ins[n] if v.producer in members)
    for n in nodes:
        if n in kept:
            continue
        for o in n.outputs:
            if o is y:
                continue
            if o in outs:
                raise NoMatch(f"%{o.name} inside the block is a graph output (a value saved "
                              f"for backward, or returned)")
            for u in sc.users.get(o, ()):
                if u not in members:
                    raise NoMatch(f"%{o.name} inside the block is also read by "
                                  f"%{u.outputs[0].name if u.outputs else '?'} = {u.op} "
                                  f"outside it")
    return [n for n in nodes if n in kept]
