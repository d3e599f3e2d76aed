"""MLIR text of the optimized IR, through torch-mlir's FX importer.

The graph is rebuilt as a torch.fx GraphModule (codegen/onnx_export.graph_to_module: one call
per IR node) and imported with `torch_mlir.fx.export_and_import`. Dialects:

  torch      the FX importer's output, before any torch-mlir pass: meshweave's ops one for one
             (what IREE and torch-mlir's own pipelines take as input)
  linalg     torch-mlir's linalg-on-tensors backend contract
  stablehlo  torch-mlir's StableHLO backend contract
  tosa       torch-mlir's TOSA backend contract

Weights are elided by default (literals keep their `dense_resource<...>` names, the blobs are
left out), so the text stays readable and small. torch-mlir is an optional extra
(`pip install meshweave[mlir]`); without it `dump_mlir` raises MlirUnavailableError whose
message is the install hint.

A rank's program (passes/parallel/lower/) holds `dist.*` collectives, whose eager forms need
a process group. For the dump each becomes a call of the placeholder op
`meshweave::collective(inputs, kind, group, out_shape, out_dtype)`, which the FX importer
keeps as `torch.operator "meshweave.collective"`; only --dialect torch can show it, since no
torch-mlir backend lowers it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph, Node, Value
from meshweave.ir.types import OpaqueType, TensorType

DIALECTS = {
    "torch": "raw",
    "linalg": "linalg-on-tensors",
    "stablehlo": "stablehlo",
    "tosa": "tosa",
}
INSTALL_HINT = (
    "MLIR output needs torch-mlir, an optional extra: pip install 'meshweave[mlir]' "
    "(or pip install torch-mlir)"
)
ELIDE_LIMIT = 16  # elements/characters above which a constant prints as __elided__


class MlirUnavailableError(MeshweaveError):
    """torch-mlir is not installed; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


class MlirLoweringError(MeshweaveError):
    """torch-mlir could not import or lower the graph to the requested dialect."""


def torch_mlir_available() -> bool:
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError:
        return False
    return True


def dump_mlir(
    graph: Graph,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    dialect: str = "torch",
    elide_weights: bool = True,
    func_name: str = "main",
) -> str:
    """The MLIR module text of `graph` in `dialect` (see the module docstring)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown MLIR dialect {dialect!r}; choose from {sorted(DIALECTS)}")
    try:
        from torch_mlir import fx as torch_mlir_fx
    except ImportError:
        raise MlirUnavailableError() from None
    from ..onnx.single import example_inputs, graph_to_module

    has_dist = any(n.op in COLLECTIVES for n in graph.nodes)
    if has_dist and dialect != "torch":
        raise MlirLoweringError(
            f"graph {graph.name} holds collectives ({', '.join(_dist_ops(graph))}); no "
            "torch-mlir backend lowers them: use --dialect torch for a rank's program"
        )
    if has_dist:
        graph = _with_send_tokens(graph)
    from ..onnx.translations import onnx_form  # static-shape stand-ins (moe.experts)

    stub = _collective_stub if has_dist else None
    gm = graph_to_module(graph, lambda n: (stub(n) if stub else None) or onnx_form(n))
    args = tuple(inputs) if inputs is not None else tuple(example_inputs(graph))
    try:
        module = torch_mlir_fx.export_and_import(
            gm, *args, output_type=DIALECTS[dialect], func_name=func_name
        )
    except Exception as e:  # torch-mlir raises plain RuntimeErrors from its pass pipelines
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise MlirLoweringError(
            f"torch-mlir could not produce --dialect {dialect} for graph {graph.name}: {first}"
        ) from e
    limit = ELIDE_LIMIT if elide_weights else None
    text = module.operation.get_asm(large_elements_limit=limit, large_resource_limit=limit)
    header = f"// meshweave graph {graph.name}, dialect {dialect}" + (
        ", weights elided" if elide_weights else ""
    )
    return header + "\n" + text


# --------------------------------------------------------------------------------- collectives
COLLECTIVES = (  # as codegen/onnx_partition.COLLECTIVES (not imported: that pulls in onnx)
    "dist.all_reduce",
    "dist.all_gather",
    "dist.reduce_scatter",
    "dist.all_to_all",
    "dist.send",
    "dist.recv",
)


def _dist_ops(graph: Graph) -> list[str]:
    return sorted({n.op for n in graph.nodes if n.op in COLLECTIVES})


@functools.cache
def _placeholder_op():
    """meshweave::collective: a stand-in with the collective's output type; never runs."""

    @torch.library.custom_op("meshweave::collective", mutates_args=())
    def collective(
        inputs: list[torch.Tensor],
        kind: str,
        group: list[int],
        out_shape: list[int],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        raise RuntimeError(f"meshweave::collective ({kind}) is a placeholder for MLIR dumps")

    @collective.register_fake
    def _(inputs, kind, group, out_shape, out_dtype):
        return torch.empty(out_shape, dtype=out_dtype)

    return collective


def _collective_stub(n: Node) -> Callable | None:
    if n.op not in COLLECTIVES:
        return None
    op = _placeholder_op()
    out = n.outputs[0].type
    shape = [int(d) for d in out.shape] if isinstance(out, TensorType) else [0]
    dtype = out.dtype if isinstance(out, TensorType) else torch.float32
    peer = n.kwargs.get("dst", n.kwargs.get("src"))
    group = list(n.kwargs.get("group") or ([peer] if peer is not None else []))
    kind = n.op.removeprefix("dist.")

    def call(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return op(tensors, kind, group, shape, dtype)

    call.__name__ = kind
    return call


def _with_send_tokens(graph: Graph) -> Graph:
    """A copy whose dist.send tokens are tensors and outputs, so the dump keeps the sends."""
    g = graph.copy()
    tokens: list[Value] = []
    for n in g.nodes:
        if n.op == "dist.send" and isinstance(n.outputs[0].type, OpaqueType):
            n.outputs[0].type = TensorType((0,), torch.float32)
            tokens.append(n.outputs[0])
    g.outputs = [*g.outputs, *(t for t in tokens if t not in g.outputs)]
    return g
