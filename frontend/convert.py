"""Convert a (decomposed) ExportedProgram into a meshweave Graph.

Placeholders become graph inputs tagged user/param/buffer/constant; call_function nodes become
Nodes named by their torch op ('aten.add.Tensor'); getitem on multi-output ops resolves to the
producer's output Values; SymInt arithmetic becomes `sym.*` ops. Each Node keeps the user's
source line from the export stack trace.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from ..ir.errors import FrontendError, UnsupportedOpError
from ..ir.graph import Graph, Node, Value
from ..ir.registry import lookup, resolve_torch_op
from ..ir.types import OpaqueType, ScalarType, sym_to_dim, tensor_type_of

_PY_OPS = {
    operator.add: "sym.add",
    operator.sub: "sym.sub",
    operator.mul: "sym.mul",
    operator.floordiv: "sym.floordiv",
    operator.mod: "sym.mod",
    operator.neg: "sym.neg",
    operator.gt: "sym.gt",
    operator.lt: "sym.lt",
    operator.ge: "sym.ge",
    operator.le: "sym.le",
    operator.eq: "sym.eq",
    operator.ne: "sym.ne",
}
_INPUT_KIND = {
    InputKind.USER_INPUT: "user",
    InputKind.PARAMETER: "param",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)(?:\n[ \t]+(?![ \t]|File )([^\n]*))?')


def source_line(node: fx.Node) -> str:
    """The innermost user frame of a node's stack trace, as 'file:line in fn: code'."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    for path, line, fn, code in reversed(frames):
        if "/site-packages/torch/" in path or "/torch/_" in path or path.startswith("<eval_"):
            continue
        short = "/".join(path.split("/")[-2:])
        code = code.strip()
        return f"{short}:{line} in {fn}" + (f": {code}" if code else "")
    return ""


def op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if target in _PY_OPS:
        return _PY_OPS[target]
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.__name__}"
    return getattr(target, "__module__", "py") + "." + getattr(target, "__name__", str(target))


def _value_type(val):
    if isinstance(val, torch.Tensor):
        return tensor_type_of(val)
    if isinstance(val, torch.SymInt):
        return ScalarType("int", sym_to_dim(val))
    if isinstance(val, (bool, torch.SymBool)):
        return ScalarType("bool")
    if isinstance(val, int):
        return ScalarType("int", val)
    if isinstance(val, (float, torch.SymFloat)):
        return ScalarType("float")
    return OpaqueType(type(val).__name__)


class _Subgraph(str):
    """A control-flow branch referenced by a higher-order op; meshweave does not inline them."""


class _Converter:
    def __init__(self, ep: torch.export.ExportedProgram, eager_fallback: bool, name: str):
        self.ep = ep
        self.fallback = eager_fallback
        self.env: dict[fx.Node, object] = {}
        self.graph = Graph([], [], [], name=name)

    def run(self) -> Graph:
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, specs[node.name])
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "get_attr":
                # Only higher-order ops (cond, map) reference submodules here.
                self.env[node] = _Subgraph(str(node.target))
            elif node.op == "output":
                self._output(node)
            else:
                raise FrontendError(f"unexpected fx node kind {node.op} ({node.format_node()})")
        self._collect_symbols()
        return self.graph

    def _placeholder(self, node: fx.Node, spec) -> None:
        kind = _INPUT_KIND.get(spec.kind)
        if kind is None:
            raise UnsupportedOpError(f"input kind {spec.kind.name}", source_line(node),
                                     what="frontend", hint="custom objects are not supported")
        val = node.meta.get("val")
        v = Value(node.name, _value_type(val), None, kind, spec.target or node.name)
        if kind != "user":
            tensor = self.ep.state_dict.get(spec.target)
            if tensor is None:
                tensor = self.ep.constants[spec.target]
            self.graph.tensors[v.name] = tensor.detach() if tensor.requires_grad else tensor
        self.graph.inputs.append(v)
        self.env[node] = v

    def _call(self, node: fx.Node) -> None:
        if node.target is operator.getitem:
            src = self.env[node.args[0]]
            self.env[node] = src[node.args[1]]
            return
        name = op_name(node.target)
        src = source_line(node)
        fallback = lookup(name) is None
        if name.startswith("higher_order."):
            raise UnsupportedOpError(name, src, hint="data-dependent control flow "
                                     "(torch.cond/map) is not supported; make the branch static")
        if fallback:
            if not self.fallback:
                raise UnsupportedOpError(name, src)
            resolve_torch_op(name)  # fails early, with the op named, if torch cannot run it
        val = node.meta.get("val")
        multi = isinstance(val, (tuple, list))
        vals = list(val) if multi else [val]
        n = Node(name, self._lookup(tuple(node.args)), self._lookup(dict(node.kwargs)),
                 (), src, {"fallback": True} if fallback else {}, multi)
        base = node.name
        n.outputs = tuple(
            Value(base if not multi else f"{base}_{i}", _value_type(x), n)
            for i, x in enumerate(vals)
        )
        self.graph.nodes.append(n)
        self.env[node] = list(n.outputs) if multi else n.outputs[0]

    def _lookup(self, x):
        """Replace fx.Nodes by their Values inside (plain) lists, tuples and dicts."""
        if isinstance(x, fx.Node):
            return self.env[x]
        if isinstance(x, tuple):
            return tuple(self._lookup(y) for y in x)
        if isinstance(x, list):
            return [self._lookup(y) for y in x]
        if isinstance(x, dict):
            return {k: self._lookup(v) for k, v in x.items()}
        return x

    def _output(self, node: fx.Node) -> None:
        outs = node.args[0]
        mutations = []
        for i, (spec, arg) in enumerate(zip(self.ep.graph_signature.output_specs, outs)):
            if isinstance(arg, fx.Node):
                v = self.env[arg]
            else:
                v = self._constant_output(arg, i)
            self.graph.outputs.append(v)
            if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
                mutations.append((i, spec.kind.name.lower(), spec.target))
            elif spec.kind != OutputKind.USER_OUTPUT:
                raise UnsupportedOpError(f"output kind {spec.kind.name}", what="frontend",
                                         hint="only inference graphs are supported here")
        self.graph.meta["mutations"] = mutations

    def _constant_output(self, value, index: int) -> Value:
        n = Node("prim.constant", (value,), {}, (), "")
        n.outputs = (Value(f"const_out_{index}", _value_type(value), n),)
        self.graph.nodes.append(n)
        return n.outputs[0]

    def _collect_symbols(self) -> None:
        hints = {}
        for node in self.ep.graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder" and isinstance(val, torch.Tensor):
                for s in val.shape:
                    if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                        hints[s.node.expr] = s.node.hint
        for sym, vr in self.ep.range_constraints.items():
            if sym in hints:
                hi = vr.upper
                hi = None if not getattr(hi, "is_finite", True) or str(hi) in ("oo", "int_oo") \
                    else int(hi)
                self.graph.symbols[sym] = (int(hints[sym]), int(vr.lower), hi)


def convert(ep: torch.export.ExportedProgram, *, eager_fallback: bool = True,
            name: str = "graph") -> Graph:
    return _Converter(ep, eager_fallback, name).run()


class _ModuleConverter(_Converter):
    """A plain fx GraphModule (AOTAutograd's forward or backward graph): every placeholder is
    an input of the call (`targets` names what each one is, e.g. a parameter's fqn); outputs
    that are None (no gradient for that input) are left out and listed in meta["none_outputs"].
    """

    def __init__(self, gm: fx.GraphModule, targets: list[str], eager_fallback: bool, name: str,
                 rename: dict[str, str]):
        super().__init__(None, eager_fallback, name)
        self.gm, self.targets, self.rename = gm, targets, rename

    def run(self) -> Graph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        names: set[str] = set()
        for i, node in enumerate(placeholders):
            target = self.targets[i] if i < len(self.targets) else node.name
            name = self.rename.get(node.name, node.name)
            while name in names:  # one value the forward saved twice (after CSE)
                name += "_"
            names.add(name)
            v = Value(name, _value_type(node.meta.get("val")), None, "user", target)
            self.graph.inputs.append(v)
            self.env[node] = v
        taken = {v.name for v in self.graph.inputs}
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                before = len(self.graph.nodes)
                self._call(node)
                # a renamed input may take a name fx gave a node here: the node's value yields
                for n in self.graph.nodes[before:]:
                    for v in n.outputs:
                        while v.name in taken:
                            v.name += "_"
                        taken.add(v.name)
            elif node.op == "output":
                outs = node.args[0]
                none = [i for i, a in enumerate(outs) if a is None]
                for i, a in enumerate(outs):
                    if a is not None:
                        self.graph.outputs.append(
                            self.env[a] if isinstance(a, fx.Node) else self._constant_output(a, i)
                        )
                self.graph.meta["none_outputs"] = none
            elif node.op != "placeholder":
                raise FrontendError(f"unexpected fx node kind {node.op} ({node.format_node()})")
        return self.graph


def convert_module(gm: fx.GraphModule, targets: list[str] | None = None, *,
                   eager_fallback: bool = True, name: str = "graph",
                   rename: dict[str, str] | None = None) -> Graph:
    """An fx GraphModule whose placeholders are all call inputs, as an IR Graph. `targets`
    names what the first placeholders are; `rename` maps placeholder names to value names."""
    return _ModuleConverter(gm, list(targets or []), eager_fallback, name, rename or {}).run()
