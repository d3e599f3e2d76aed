"""Validation by execution: a region is replaced only where it computes what moe.experts does.

The region is copied into a graph of its own (inputs x, weights, ids, the expert parameters)
and run with the reference executor on random data of its shapes, twice: with uniform random
routing, and with skewed routing where every token picks the same k experts (which catches
blocks that drop tokens over a capacity). The expert weights are random too, so a block whose
weights happen to be degenerate (zero-initialised) cannot pass by accident. Each candidate call
(patterns.py) runs through the op's eager rule on the same data; the first that agrees within
the dtype's tolerance wins. A block too large to run is validated at a smaller width
(shrink.py).
"""

from __future__ import annotations

import dataclasses

import sympy
import torch

from meshweave.ir.graph import Graph, Node, Value, map_values
from meshweave.ir.ops.moe import moe_experts
from meshweave.ir.registry import node_cost
from meshweave.runtime.reference import run_graph
from .patterns import ExpertsCall
from .region import Region
from .shrink import IDENTITY, Scale, width_scale

# Relative tolerance (of the largest output magnitude) by dtype: the dense and the sparse
# forms sum the same products in a different order.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Regions above this many FLOPs, or bytes of values, run at a smaller width (shrink.py):
# validation must stay cheap beside compilation.
MAX_VALIDATION_FLOPS = 2e9
MAX_VALIDATION_BYTES = 5e8
SEED = 0


class ValidationFailed(Exception):
    """The region does not compute any candidate moe.experts call (message says how far)."""


def region_graph(region: Region, device: str, scale: Scale = IDENTITY) -> Graph:
    """The region as a stand-alone graph: user inputs x, weights, ids; state: the expert
    parameters and any constants it reads; output y. Tensors it creates (arange) are made on
    `device`, where validation runs (the CPU for a meta-device model); shape arguments are
    scaled by `scale` (the types are left as traced: the executor does not read them)."""
    vmap: dict[Value, Value] = {}

    def clone(v: Value, producer=None, kind=None) -> Value:
        nv = Value(v.name, v.type, producer, kind or v.kind, v.target)
        vmap[v] = nv
        return nv

    inputs = [clone(v, kind="user")
              for v in (region.x, region.weights, region.ids, *region.shape_inputs)]
    inputs += [clone(v) for v in (*region.params, *region.constants)]
    nodes = []
    for n in region.nodes:
        kwargs = scale.literals(map_values(n.kwargs, vmap.__getitem__))
        if "device" in kwargs:
            kwargs["device"] = torch.device(device)
        args = scale.literals(map_values(n.args, vmap.__getitem__))
        nn = Node(n.op, args, kwargs, (), n.source, dict(n.attrs), n.multi_output)
        nn.outputs = tuple(clone(o, nn) for o in n.outputs)
        nodes.append(nn)
    return Graph(inputs, nodes, [vmap[region.y]], name="moe_region")


def _static(shape, what: str, hints: dict) -> tuple[int, ...]:
    """`shape` at the traced sizes: a dynamic dim takes its symbols' hints (the region's own
    arguments hold no symbols, so its program is the same at every size)."""
    out = []
    for s in shape:
        if not isinstance(s, int):
            try:
                s = int(sympy.sympify(s).subs(hints))
            except TypeError as e:
                raise ValidationFailed(f"{what} has a dynamic shape {tuple(shape)} with no "
                                       f"hint for its symbols") from e
        out.append(s)
    return tuple(out)


def random_inputs(region: Region, skewed: bool, gen: torch.Generator, device: str,
                  scale: Scale = IDENTITY):
    t, k = scale.shape(_static(region.ids.type.shape, "the top-k ids", region.hints))
    d = scale.dim(_static(region.x.type.shape, "the expert input", region.hints)[1])
    e = region.router.num_experts
    x = torch.randn(t, d, generator=gen).to(region.x.type.dtype)
    weights = (torch.rand(t, k, generator=gen) + 0.1).to(region.weights.type.dtype)
    if skewed:
        ids = torch.stack([torch.randperm(k, generator=gen) for _ in range(t)])
    else:
        ids = torch.rand(t, e, generator=gen).argsort(dim=-1)[:, :k].contiguous()
    params = {}
    for p in region.params:
        shape = scale.shape(_static(p.type.shape, f"parameter {p.target}", region.hints))
        params[p.name] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(
            device, p.type.dtype)
    shaped = [torch.zeros(scale.shape(_static(v.type.shape, f"%{v.name}", region.hints)),
                          dtype=v.type.dtype, device=device) for v in region.shape_inputs]
    return (x.to(device), weights.to(device), ids.to(device, region.ids.type.dtype), params,
            shaped)


def region_cost(region: Region) -> tuple[float, float]:
    """(FLOPs, bytes of the values it makes) of running the region once."""
    flops = made = 0.0
    for n in region.nodes:
        f, _ = node_cost(n)
        try:
            flops += float(sympy.sympify(f).subs(region.hints))
            made += sum(float(sympy.sympify(o.type.nbytes()).subs(region.hints))
                        for o in n.outputs if hasattr(o.type, "nbytes"))
        except TypeError as e:  # a symbol with no hint
            raise ValidationFailed(f"the block has dynamic shapes (%{n.outputs[0].name}: "
                                   f"{n.outputs[0].type}) with no hint for its symbols") from e
    return flops, made


def choose_scale(region: Region, max_flops: float, max_bytes: float = MAX_VALIDATION_BYTES):
    """IDENTITY when the region is cheap to run, else the width scale that makes it so."""
    flops, made = region_cost(region)
    if flops <= max_flops and made <= max_bytes:
        return IDENTITY
    t, k = _static(region.ids.type.shape, "the top-k ids", region.hints)
    d = _static(region.x.type.shape, "the expert input", region.hints)[1]
    scale = width_scale(t, k, region.router.num_experts, d,
                        [_static(p.type.shape, p.target, region.hints) for p in region.params])
    shrink = scale.factor ** 2  # every expert matmul (and gathered weight) is d x f
    sized = [c for c in region.constants if scale.shape(c.type.shape) != tuple(c.type.shape)]
    if flops / shrink > max_flops or made / shrink > max_bytes or sized:
        raise ValidationFailed(
            f"the block is too large to validate by execution ({flops:.3g} FLOPs, "
            f"{made:.3g} bytes; limits {max_flops:.3g}, {max_bytes:.3g}), even at "
            f"1/{scale.factor} of its width" + (f" (it reads %{sized[0].name}, a constant "
                                                f"whose size does not scale)" if sized else ""))
    return scale


def _close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    scale = want.abs().max().item() or 1.0
    err = (got.to(want.dtype) - want).abs().max().item() / scale
    return err <= RTOL.get(want.dtype, 1e-4), err


def _trials(region: Region, tensors: dict[str, torch.Tensor], scale: Scale) -> list[tuple]:
    """(x, weights, ids, params, the region's y) on uniform, then skewed, random routing."""
    constants = {c.name: tensors[c.name] for c in region.constants}
    for name, t in constants.items():
        if t.is_meta:
            raise ValidationFailed(f"the block reads %{name}, which is on the meta device")
    device = "cpu" if region.x.type.device == "meta" else region.x.type.device
    sub = region_graph(region, device, scale)
    gen = torch.Generator().manual_seed(SEED)
    trials = []
    for skewed in (False, True):
        x, w, ids, params, shaped = random_inputs(region, skewed, gen, device, scale)
        try:
            (want,) = run_graph(sub, [x, w, ids, *shaped], {**params, **constants})
        except Exception as e:  # the region's own ops on data of its shapes: report, stay dense
            raise ValidationFailed(f"running the region raised {type(e).__name__}: {e}") from e
        trials.append((x, w, ids, params, want))
    return trials


def fingerprint(region: Region) -> tuple:
    """The region's program with its values numbered locally: equal for the identical blocks
    of a model's layers (whose validation, seeded the same, must come out the same)."""
    local: dict[Value, int] = {}
    for v in (region.x, region.weights, region.ids, *region.shape_inputs, *region.params,
              *region.constants):
        local[v] = len(local)

    def enc(tree):
        if isinstance(tree, Value):
            return ("%", local[tree])
        if isinstance(tree, (list, tuple)):
            return tuple(enc(x) for x in tree)
        if isinstance(tree, dict):
            return tuple((k, enc(v)) for k, v in tree.items())
        return (type(tree).__name__, repr(tree))

    body = []
    for n in region.nodes:
        body.append((n.op, enc(n.args), enc(n.kwargs), n.multi_output))
        for o in n.outputs:
            local[o] = len(local)
    inputs = tuple(str(v.type) for v in list(local)[:len(local) - len(region.constants)])
    return inputs, tuple(c.name for c in region.constants), tuple(body), local[region.y]


def validate_cached(region: Region, calls: list[ExpertsCall], tensors, max_flops: float,
                    cache: dict) -> tuple[ExpertsCall, Scale]:
    """validate(), run once per distinct region program (`cache`: the pass's, per graph)."""
    key = fingerprint(region)
    if key not in cache:
        try:
            call, scale = validate(region, calls, tensors, max_flops)
        except ValidationFailed as e:
            cache[key] = e
        else:
            index = {p: i for i, p in enumerate(region.params)}
            roles = tuple(None if w is None else index[w]
                          for w in (call.w_in, call.w_gate, call.w_out))
            cache[key] = (roles, call, scale)
    hit = cache[key]
    if isinstance(hit, ValidationFailed):
        raise ValidationFailed(str(hit))
    (w_in, w_gate, w_out), call, scale = hit
    p = region.params
    return dataclasses.replace(call, w_in=p[w_in], w_gate=None if w_gate is None else p[w_gate],
                               w_out=p[w_out]), scale


def validate(region: Region, calls: list[ExpertsCall], tensors: dict[str, torch.Tensor],
             max_flops: float = MAX_VALIDATION_FLOPS) -> tuple[ExpertsCall, Scale]:
    """The first of `calls` that matches the region on both routings, and the width scale it
    was validated at; raises ValidationFailed with the closest error otherwise. `tensors`: the
    graph's, for the constants the region reads (the expert weights themselves are random)."""
    if not calls:
        raise ValidationFailed("no moe.experts call fits the expert parameters' shapes "
                               + ", ".join(f"{p.target} {tuple(p.type.shape)}"
                                           for p in region.params))
    scale = choose_scale(region, max_flops)
    trials = _trials(region, tensors, scale)
    best = None
    for call in calls:
        worst = 0.0
        for x, w, ids, params, want in trials:
            got, _ = moe_experts(x, w, ids, params[call.w_in.name],
                                 params[call.w_gate.name] if call.w_gate is not None else None,
                                 params[call.w_out.name], **call.kwargs())
            ok, err = _close(got, want)
            worst = max(worst, err)
            if not ok:
                break
        else:
            return call, scale
        if best is None or worst < best[0]:
            best = (worst, call)
    raise ValidationFailed(f"no candidate moe.experts call computes what the block does "
                           f"({len(calls)} tried; closest: {best[1].describe()}, relative "
                           f"error {best[0]:.2g})")
