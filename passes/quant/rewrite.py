"""The quantization pass: linear and matmul-with-parameter nodes -> `quant.linear`.

Each target's weight is quantized (round to nearest, or GPTQ from calibration batches), packed
(ir/packing.py), and replaced by three new parameter inputs, `<name>.qweight`, `.scales` and
`.zeros` (no zeros when symmetric); the floating weight leaves the graph unless another node
still reads it (a tied embedding). The pass is pure: it copies the graph first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, NameGen, Node, Value
from meshweave.ir.ops.quant import QUANT_LINEAR
from meshweave.ir.packing import dequantize, pack
from meshweave.ir.printer import format_node
from meshweave.ir.types import tensor_type_of
from .config import QuantConfig
from .gptq import HessianAccumulator, gptq
from .quantizer import rtn
from .targets import Site, find_sites


class QuantizationError(MeshweaveError):
    """A weight that cannot be quantized as asked; names the node, the weight and the fix."""


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    node: str
    target: str
    k: int
    n: int
    fp_bytes: int
    packed_bytes: int  # qweight + scales + zeros
    weight_is_nk: bool  # the parameter is [N, K] (linear) rather than [K, N] (mm)


@dataclasses.dataclass
class QuantSummary:
    """What explain() prints: the layers, and the weight bytes saved."""

    config: QuantConfig
    layers: list[QuantizedLayer]

    def summary(self) -> str:
        fp = sum(layer.fp_bytes for layer in self.layers)
        q = sum(layer.packed_bytes for layer in self.layers)
        ratio = fp / q if q else 0.0
        return (f"{self.config.tag} {self.config.method}"
                f"{' symmetric' if self.config.symmetric else ''}"
                f"{' act-order' if self.config.act_order else ''}: {len(self.layers)} layers "
                f"-> quant.linear; weight bytes {fp:,} -> {q:,} ({ratio:.2f}x smaller, "
                f"{fp - q:,} saved)")


def check_sites(graph: Graph, sites: Sequence[Site], config: QuantConfig) -> None:
    for s in sites:
        n_out, k = s.weight_nk(graph).shape
        group = config.group_for(k)
        where = f"{format_node(s.node, False)}" + (f" (from {s.node.source})"
                                                   if s.node.source else "")
        if k % group:
            raise QuantizationError(
                f"group_size={config.group_size} does not divide K={k} of weight "
                f"{s.weight.target!r} [{n_out}x{k}] at {where}: use a group size that divides "
                f"{k}, per-channel (group_size=None), or skip=({s.weight.target!r},)")
        if (k * config.bits) % 32:
            raise QuantizationError(
                f"K={k} of weight {s.weight.target!r} at {where}: {k} codes of "
                f"{config.bits} bits do not fill whole 32-bit words (K * bits must be a "
                f"multiple of 32); skip this weight")


def packed_weights(graph: Graph) -> dict[str, dict[str, torch.Tensor | None]]:
    """Weight target -> its packed tensors {"qweight", "scales", "zeros"} in a quantized graph:
    what a second compile of the same weights (generation's cached-decoder programs) reuses
    through `quantize_graph(given=)`, so GPTQ's choices are not redone without calibration."""
    out: dict[str, dict[str, torch.Tensor | None]] = {}
    for n in graph.nodes:
        if n.op != QUANT_LINEAR:
            continue
        target = n.args[1].target.rsplit(".", 1)[0]
        zeros = n.args[3] if len(n.args) > 3 else None
        out.setdefault(target, {
            "qweight": graph.tensors[n.args[1].name],
            "scales": graph.tensors[n.args[2].name],
            "zeros": graph.tensors[zeros.name] if isinstance(zeros, Value) else None,
        })
    return out


def _given_for(given: dict | None, target: str | None) -> dict | None:
    """`given`'s entry for `target`: the same name, or one that ends the name at a dot (a
    wrapper module adds a prefix: KVDecoder's `model.`)."""
    if not given or not target:
        return None
    if target in given:
        return given[target]
    hits = [k for k in given if target.endswith("." + k)]
    return given[max(hits, key=len)] if hits else None


def quantize_graph(graph: Graph, config: QuantConfig,
                   calibration: Sequence[Sequence[Any]] | None = None,
                   given: dict[str, dict[str, torch.Tensor | None]] | None = None) -> Graph:
    """The pass. `calibration`: flattened user-input leaves per batch (GPTQ only). `given`:
    packed tensors per weight target (`packed_weights` of an earlier compile) used as they are
    instead of quantizing those weights again."""
    g = graph.copy()
    sites = find_sites(g, config.skip)
    check_sites(g, sites, config)
    todo = [s for s in sites if _given_for(given, s.weight.target) is None]
    if config.method == "gptq" and todo and not calibration:
        raise QuantizationError(
            "QuantConfig(method='gptq') needs calibration data: pass "
            "CompileOptions(calibration=[args, ...]) with a few example batches (tuples of the "
            "model's arguments), or use method='rtn'")
    results: dict[Value, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if config.method == "gptq" and todo:
        results = _gptq_all(g, todo, config, calibration)
    else:
        for s in todo:
            if s.weight not in results:
                w = s.weight_nk(g)
                results[s.weight] = rtn(w, config.bits, config.group_for(w.shape[1]),
                                        config.symmetric)
    return _rewrite(g, sites, results, config, given)


def _gptq_all(g: Graph, sites, config: QuantConfig, calibration):
    from .calibrate import run_lockstep

    by_node = {s.node: s for s in sites}
    results: dict[Value, tuple] = {}

    def quantize(node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        s = by_node[node]
        w = s.weight_nk(g)
        if s.weight not in results:  # a weight shared by two nodes: the first one's inputs
            acc = HessianAccumulator(w.shape[1])
            for x in xs:
                acc.add(x)
            results[s.weight] = gptq(w, acc.h, config.bits, config.group_for(w.shape[1]),
                                     config.symmetric, damp=config.damp,
                                     block_size=config.block_size, act_order=config.act_order)
        codes, scales, zeros = results[s.weight]
        dq = _dequantized_nk(codes, scales, zeros, w.shape[1] // scales.shape[1]).to(w.dtype)
        return dq if s.weight_is_nk else dq.T

    run_lockstep(g, calibration, {s.node: s.weight for s in sites}, quantize)
    return results


def _dequantized_nk(codes, scales, zeros, group):
    n, k = codes.shape
    return ((codes.view(n, k // group, group) - zeros[..., None]) * scales[..., None]).view(n, k)


def _rewrite(g: Graph, sites, results, config: QuantConfig, given=None) -> Graph:
    names = NameGen(g)
    packed: dict[Value, tuple[Value, Value, Value | None]] = {}
    layers = []
    new_inputs: list[Value] = []
    for s in sites:
        w = g.tensors[s.weight.name]
        n_out, k = s.weight_nk(g).shape
        if s.weight not in packed:
            tensors = _given_for(given, s.weight.target)
            if tensors is None:
                codes, scales, zeros = results[s.weight]
                tensors = {
                    "qweight": pack(codes.T.to(torch.int32), config.bits),
                    "scales": scales.T.contiguous().to(w.dtype),
                    "zeros": None if config.symmetric else zeros.T.contiguous().to(torch.uint8),
                }
            vals = []
            for suffix, t in tensors.items():
                if t is None:
                    vals.append(None)
                    continue
                v = Value(names(f"{s.weight.name}_{suffix}"), tensor_type_of(t, w.device.type),
                          None, "param", f"{s.weight.target}.{suffix}")
                g.tensors[v.name] = t.to(w.device)
                new_inputs.append(v)
                vals.append(v)
            packed[s.weight] = tuple(vals)
        qw, sc, zr = packed[s.weight]
        node = Node(QUANT_LINEAR, (s.x, qw, sc, zr, s.bias),
                    {"bits": config.bits, "group_size": config.group_for(k)},
                    s.node.outputs, s.node.source, dict(s.node.attrs), False)
        for o in node.outputs:
            o.producer = node
        g.nodes[g.nodes.index(s.node)] = node
        q_bytes = sum(int(g.tensors[v.name].nbytes) for v in (qw, sc, zr) if v is not None)
        layers.append(QuantizedLayer(node.outputs[0].name, s.weight.target or s.weight.name,
                                     k, n_out, w.numel() * w.element_size(), q_bytes,
                                     s.weight_is_nk))
    used = {v for n in g.nodes for v in n.inputs} | set(g.outputs)
    kept = [v for v in g.inputs if v.kind == "user" or v in used]
    for v in g.inputs:
        if v not in kept:
            g.tensors.pop(v.name, None)
    g.inputs = kept + new_inputs
    g.meta["quant"] = QuantSummary(config, layers)
    return g


def dequantized_state(graph: Graph) -> dict[str, torch.Tensor]:
    """Original parameter name -> the floating weight the quantized graph computes with, in the
    parameter's own layout ([N, K] for linear, [K, N] for mm): load it into a copy of the model
    to get the eager oracle of the quantized model."""
    summary = graph.meta.get("quant")
    nk = {layer.target: layer.weight_is_nk for layer in (summary.layers if summary else ())}
    out = {}
    for n in graph.nodes:
        if n.op != QUANT_LINEAR:
            continue
        target = n.args[1].target.rsplit(".", 1)[0]
        if target in out:
            continue
        qw, sc, zr = (graph.tensors[v.name] if v is not None else None for v in n.args[1:4])
        w_kn = dequantize(qw, sc, zr, n.kwargs["bits"], n.kwargs["group_size"])
        out[target] = w_kn.T if nk.get(target, True) else w_kn
    return out


def dequantized_model(model: torch.nn.Module, graph: Graph) -> torch.nn.Module:
    """A deep copy of `model` whose quantized weights hold their dequantized values."""
    import copy

    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, w in dequantized_state(graph).items():
            params[name].copy_(w)
    return clone
