"""ONNX export of one Graph: the IR rebuilt as torch.fx, handed to torch.onnx, checked.

meshweave does not write ONNX protos by hand. Each Graph is rebuilt as a torch.fx GraphModule
(one call per IR node, the same callable the reference executor runs, weights as parameters and
buffers under their original names) and handed to torch.onnx's dynamo exporter at a pinned
opset. So the ONNX file computes what the reference executor computes, op for op. `verify_onnx`
checks a file with onnx.checker and runs it in onnxruntime against expected outputs.

Ops torchlib cannot translate raise OnnxUnsupportedOpError naming the op and its source line;
custom translations go in translations.py (ONNX_TRANSLATIONS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import sympy
import torch
from torch import fx

from meshweave.ir.errors import MeshweaveError, UnsupportedOpError
from meshweave.ir.graph import Graph, Node, Value, map_values
from meshweave.ir.printer import format_node
from meshweave.ir.types import TensorType, dtype_short
from meshweave.runtime.compare import ComparisonError, max_errors
from meshweave.runtime.reference import node_callable
from .matmul_nbits import lower_quant_linears
from .translations import onnx_form, translation_table

OPSET = 18  # pinned: every file meshweave writes uses this opset
# Protobuf cannot serialize a message over 2 GiB; above this the weights go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**20
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "meshweave-onnx/1"


class OnnxExportError(MeshweaveError):
    """torch.onnx could not export a graph; names the graph and the file it was writing."""


class OnnxUnsupportedOpError(UnsupportedOpError):
    """An IR op has no ONNX form: torchlib has no function for it and no custom translation."""

    def __init__(self, op: str, source: str = "", node: str = ""):
        self.node = node
        hint = (
            "torch.onnx (torchlib) has no ONNX function for it; register a translation with "
            "meshweave.codegen.onnx_translations.register_onnx_translation("
            f"{op!r})" + (f"; IR node: {node}" if node else "")
        )
        super().__init__(op, source, what="ONNX translation table", hint=hint)


class OnnxVerificationError(MeshweaveError):
    """onnxruntime's result differs from the reference executor's."""


@dataclasses.dataclass
class OnnxFile:
    """One written .onnx file and the names of its ONNX inputs and outputs, in order."""

    path: str  # relative to the export directory
    inputs: list[str]
    outputs: list[str]
    rank: int = 0
    segment: int = 0
    external_data: str | None = None  # the weights file, when written as external data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class OnnxExport:
    """What export_onnx wrote: the files, the manifest, and the largest verified error."""

    directory: str
    files: list[OnnxFile]
    manifest: dict
    max_error: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. layers not MatMulNBits

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    @property
    def paths(self) -> list[str]:
        return [os.path.join(self.directory, f.path) for f in self.files]

    def summary(self) -> str:
        ranks = len({f.rank for f in self.files})
        err = (
            ""
            if self.max_error is None
            else f", max |onnxruntime - reference| {self.max_error:.2e}"
        )
        lines = [
            f"ONNX opset {self.manifest['opset']}: {len(self.files)} file(s) for {ranks} "
            f"rank(s) in {self.directory}{err}"
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def dump(self, directory: str) -> list[str]:  # CompiledModel.dump hook: already on disk
        return []


# --------------------------------------------------------------------------------- IR -> fx
def graph_to_module(
    graph: Graph, override: Callable[[Node], Callable | None] | None = None
) -> fx.GraphModule:
    """The graph as a torch.fx GraphModule: one call per node, weights as params/buffers.

    Weights keep their fully-qualified names ("blocks.0.attn.qkv.weight"), so the ONNX
    initializers are named as in the user's state_dict. `override(node)` may return another
    callable for a node (the MLIR dump stands collectives in with placeholder ops).
    """
    root = torch.nn.Module()
    fg = fx.Graph()
    env: dict[Value, Any] = {}
    for v in graph.inputs:
        if v.kind == "user":
            if not isinstance(v.type, TensorType):
                raise OnnxExportError(
                    f"graph {graph.name}: user input %{v.name} is {v.type}, "
                    "not a tensor; ONNX graph inputs must be tensors"
                )
            env[v] = fg.placeholder(_identifier(v.name))
        else:
            env[v] = fg.get_attr(_install_tensor(root, v, graph.tensors[v.name]))
    for n in graph.nodes:
        fn = override(n) if override is not None else None
        call = fg.call_function(
            fn or node_callable(n),
            map_values(n.args, env.__getitem__),
            map_values(n.kwargs, env.__getitem__),
        )
        if n.source:
            call.meta["stack_trace"] = f"  {n.source}"
        if n.multi_output:
            for k, o in enumerate(n.outputs):
                env[o] = fg.call_function(operator.getitem, (call, k))
        else:
            env[n.outputs[0]] = call
    fg.output(tuple(env[v] for v in graph.outputs))
    gm = fx.GraphModule(root, fg, class_name=_identifier(graph.name))
    return gm.eval()


def _identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"v_{ident}"


def _install_tensor(root: torch.nn.Module, v: Value, tensor: torch.Tensor) -> str:
    """Register `tensor` under its FQN (v.target) when that path is free, else under v.name."""
    for path in (v.target or "", _identifier(v.name)):
        parts = path.split(".")
        if not path or not all(p.isidentifier() for p in parts):
            continue
        mod = root
        for p in parts[:-1]:
            sub = getattr(mod, p, None)
            if sub is None:
                sub = torch.nn.Module()
                mod.add_module(p, sub)
            if not isinstance(sub, torch.nn.Module):
                break
            mod = sub
        else:
            if hasattr(mod, parts[-1]):
                continue  # tied or clashing name: fall back to the value's own name
            if v.kind == "param" and tensor.is_floating_point():
                mod.register_parameter(parts[-1], torch.nn.Parameter(tensor, requires_grad=False))
            else:
                mod.register_buffer(parts[-1], tensor)
            return path
    raise OnnxExportError(f"cannot place weight %{v.name} ({v.target}) in the export module")


# --------------------------------------------------------------------------------- one graph
def example_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of the traced shapes (symbols at their hints): zeros for ints, randn for floats;
    a non-tensor input takes its traced value (None when the trace did not record one)."""
    gen = torch.Generator().manual_seed(seed)
    hints = graph.hints()
    out = []
    for v in graph.user_inputs:
        if not isinstance(v.type, TensorType):
            out.append(getattr(v.type, "expr", None))
            continue
        t = v.tensor_type
        shape = t.concrete_shape(hints)
        if t.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype))
        else:
            out.append(torch.zeros(shape, dtype=t.dtype))
    return out


def _dynamic_shapes(graph: Graph) -> tuple | None:
    """torch.export dynamic_shapes for the graph's symbolic input dims (None when static)."""
    if not graph.symbols:
        return None
    dims: dict[sympy.Symbol, Any] = {}
    specs = []
    for v in graph.user_inputs:
        spec = {}
        for i, d in enumerate(v.tensor_type.shape):
            if isinstance(d, sympy.Symbol) and d in graph.symbols:
                _, lo, hi = graph.symbols[d]
                if d not in dims:
                    kw = {"min": max(lo, 2)} | ({"max": hi} if hi is not None else {})
                    dims[d] = torch.export.Dim(str(d), **kw)
                spec[i] = dims[d]
        specs.append(spec or None)
    return tuple(specs) if dims else None


def _tensor_bytes(graph: Graph) -> int:
    return sum(
        t.numel() * t.element_size()
        for v in graph.state_inputs
        if isinstance(t := graph.tensors.get(v.name), torch.Tensor)
    )


def use_external_data(graph: Graph, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Whether the weights of `graph` must go to an external data file (over `threshold`)."""
    return _tensor_bytes(graph) > threshold


def export_graph_program(
    graph: Graph,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    opset: int = OPSET,
    path: str = "",
    optimize: bool = True,
) -> Any:
    """torch.onnx's ONNXProgram for `graph`; inputs/outputs are named after the IR values.
    `optimize=False` skips torch.onnx's optimizer, so the weights stay the initializers as
    given, under their state_dict names (it would fold a linear's transpose into a new one)."""
    inputs = list(inputs) if inputs is not None else example_inputs(graph)
    graph, _ = lower_quant_linears(graph)  # a no-op when export_onnx lowered it already
    for v in graph.outputs:
        if not isinstance(v.type, TensorType):
            raise OnnxExportError(
                f"graph {graph.name}: output %{v.name} is {v.type}; "
                "ONNX graph outputs must be tensors"
            )
    gm = graph_to_module(graph, onnx_form)  # static-shape stand-ins (moe.experts)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" noise on every export
    try:
        with _reuse_torchlib_registry():
            return torch.onnx.export(
                gm,
                tuple(inputs),
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=[v.name for v in graph.user_inputs],
                output_names=_unique_names([v.name for v in graph.outputs]),
                dynamic_shapes=_dynamic_shapes(graph),
                custom_translation_table=translation_table(graph) or None,
                optimize=optimize,
            )
    except Exception as e:  # torch.onnx raises a variety; map what we can to the IR node
        unsupported = _unsupported_op(e, graph)
        if unsupported is not None:
            raise unsupported from e
        where = f" to {path}" if path else ""
        raise OnnxExportError(
            f"torch.onnx could not export graph {graph.name}{where}: "
            f"{type(e).__name__}: {_first_lines(str(e))}"
        ) from e
    finally:
        quiet.setLevel(level)


_TORCHLIB_REGISTRIES: dict[str, Any] = {}


@contextlib.contextmanager
def _reuse_torchlib_registry() -> Iterator[None]:
    """Build torch.onnx's torchlib registry once per opset instead of once per export.

    torch.onnx.export rebuilds it on every call (about 1.5 s, most of a small export); each
    export here gets a copy of a cached one, so custom translations never leak between exports.
    This touches a private torch API; if it has moved, exports simply run uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        base = _TORCHLIB_REGISTRIES.get(key)
        if base is None:
            base = _TORCHLIB_REGISTRIES[key] = build(klass, *args, **kwargs)
        copy = klass()
        copy.__dict__.update(base.__dict__)
        copy.functions = {k: list(v) for k, v in base.functions.items()}
        return copy

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def export_graph(
    graph: Graph,
    path: str,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    opset: int = OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    optimize: bool = True,
) -> OnnxFile:
    """Write `graph` to `path` as ONNX; weights over the threshold go to `path`.data."""
    program = export_graph_program(graph, inputs, opset=opset, path=path, optimize=optimize)
    external = use_external_data(graph, external_data_threshold)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path, external_data=external)
    data = os.path.basename(path) + ".data" if external else None
    return OnnxFile(
        os.path.basename(path),
        [v.name for v in graph.user_inputs],
        _unique_names([v.name for v in graph.outputs]),
        external_data=data,
    )


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_out{k}")
    return out


_NO_FUNCTION = re.compile(
    r"No ONNX function found for <OpOverload\(op='([\w.]+)', "
    r"overload='(\w+)'\)>"
)
_TRANSLATING = re.compile(r"target=torch\.ops\.([\w.]+)\]")


def _unsupported_op(exc: BaseException, graph: Graph) -> OnnxUnsupportedOpError | None:
    text = ""
    e: BaseException | None = exc
    while e is not None:
        text += str(e) + "\n"
        e = e.__cause__ or e.__context__
    if (m := _NO_FUNCTION.search(text)) is not None:
        op = f"{m.group(1)}.{m.group(2)}"
    elif "No ONNX function found" in text and (m := _TRANSLATING.search(text)) is not None:
        op = m.group(1)
    else:
        return None
    node = next((n for n in graph.nodes if n.op == op), None)
    if node is None:  # produced by one of torch.onnx's decompositions of an IR op
        return OnnxUnsupportedOpError(op, "", f"(from torch.onnx's decomposition in {graph.name})")
    return OnnxUnsupportedOpError(op, node.source, format_node(node, False))


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:n])


# --------------------------------------------------------------------------------- checking
def verify_onnx(
    path: str,
    inputs: Sequence[Any],
    expected: Sequence[Any],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> float:
    """onnx.checker, then onnxruntime on `inputs`, compared with `expected`; the max error.

    Raises OnnxVerificationError naming the output and the file when a value is off.
    """
    import onnx

    onnx.checker.check_model(path, full_check=True)  # by path: works with external data
    got = run_onnx(path, inputs)
    want = [_to_numpy(x) for x in expected]
    return compare_outputs(got, want, rtol, atol, path)


def run_onnx(path: str, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Run one .onnx file in onnxruntime (CPU) on positional inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise OnnxVerificationError(f"{path} takes inputs {names}, got {len(inputs)} values")
    return sess.run(None, {n: _to_numpy(x) for n, x in zip(names, inputs)})


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def compare_outputs(got, want, rtol, atol, where: str) -> float:
    """The max error of onnxruntime's outputs against the expected ones, output by output.

    A missing or extra output, a shape that differs, or a value outside rtol/atol raises
    OnnxVerificationError naming the output and `where`.
    """
    try:
        errs = max_errors(want, got, what="output", where=where)
    except ComparisonError as e:
        raise OnnxVerificationError(str(e)) from None
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        if g.size and not np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            raise OnnxVerificationError(
                f"{where}: output {i} differs from the reference by up "
                f"to {errs[f'output {i}']:.3e} (rtol={rtol}, atol={atol})"
            )
    return max(errs.values())


def io_entry(v: Value, micro_batch_dim: int = 0) -> dict:
    """A manifest entry for a model input: name, dtype, traced shape, micro-batch dim."""
    t = v.tensor_type
    shape = [d if isinstance(d, int) else str(d) for d in t.shape]
    return {
        "name": v.name,
        "dtype": dtype_short(t.dtype),
        "shape": shape,
        "micro_batch_dim": micro_batch_dim,
    }


def single_manifest(graph: Graph, f: OnnxFile, name: str, opset: int) -> dict:
    """The manifest of an unpartitioned export: one rank, one file, one step."""
    return {
        "format": MANIFEST_FORMAT,
        "model": name,
        "opset": opset,
        "mesh": {"shape": [1], "axis_names": ["d0"]},
        "num_stages": 1,
        "world_size": 1,
        "micro_batches": 1,
        "inputs": [io_entry(v) for v in graph.user_inputs],
        "outputs": [
            {"name": n, "ranks": [0], "local": [n], "placements": ["R"], "micro_batch_dim": 0}
            for n in f.outputs
        ],
        "ranks": [
            {
                "rank": 0,
                "stage": 0,
                "coords": [0],
                "inputs": {n: {"from": n, "shard": []} for n in f.inputs},
                "outputs": f.outputs,
            }
        ],
        "files": [f.to_dict()],
        "steps": [{"op": "run", "file": f.path, "rank": 0}],
    }
