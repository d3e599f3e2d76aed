"""Custom ONNX translations: IR op name -> a function that emits ONNX for that op.

The ONNX exporter (codegen/onnx/export.py) hands every IR node to torch.onnx's dynamo exporter,
which knows the ATen ops through torchlib. Ops it does not know (meshweave's own torch.library
ops, quantized matmuls that should become `com.microsoft::MatMulNBits`, ...) get an entry here,
registered next to the code that defines the op:

    from onnxscript import opset18 as op
    from meshweave.codegen.onnx.translations import ONNX_TRANSLATIONS

    @ONNX_TRANSLATIONS.register("mylib.twice.default")
    def twice(x):
        return op.Mul(x, op.Constant(value_float=2.0))

A translation has torch.onnx's `custom_translation_table` form: a Python function (or an
onnxscript function) over onnxscript tensors with the op's arguments. The exporter passes it to
`torch.onnx.export(custom_translation_table={torch op: translation})`, so the op's IR name must
resolve to a torch op overload (a torch.library custom op, or an aten op to override).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshweave.ir.graph import Graph
from meshweave.ir.registry import RuleTable, resolve_torch_op

ONNX_TRANSLATIONS = RuleTable("onnx_translation")

# Where quantized ops get their ONNX form: onnxruntime's contrib domain (MatMulNBits lives here).
MICROSOFT_DOMAIN = "com.microsoft"


def register_onnx_translation(*ops: str) -> Callable[[Any], Any]:
    """Decorator: `fn` translates the IR ops `ops` (e.g. "mylib.twice.default") to ONNX."""
    return ONNX_TRANSLATIONS.register(*ops)


def microsoft_opset(version: int = 1):
    """The onnxscript opset object for `com.microsoft` contrib ops (MatMulNBits and friends)."""
    import onnxscript

    return onnxscript.values.Opset(MICROSOFT_DOMAIN, version)


_TENSOR_TYPES = [
    f"tensor({t})"
    for t in (
        "float",
        "float16",
        "bfloat16",
        "double",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
]


def contrib_op(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str] = ("Y",),
    attributes: Mapping[str, str] | None = None,
    *,
    type_from_input: int | None = 0,
    domain: str = MICROSOFT_DOMAIN,
    version: int = 1,
):
    """An onnxscript op for a runtime's contrib op, e.g. com.microsoft::MatMulNBits.

    The `onnx` package only knows the standard domains' schemas, and onnxscript needs a schema
    to build a call, so this registers a permissive one (each input its own type variable; the
    runtime checks the real signature). `inputs` ending in "?" are optional; `attributes` maps
    attribute names to onnx AttrType names ("INT", "FLOAT", "STRING", "INTS", ...). Outputs take
    the element type of input `type_from_input` (shape unknown), so onnx.checker's full check
    and shape inference downstream still see typed values:

        MatMulNBits = contrib_op("MatMulNBits", ["A", "B", "scales", "zero_points?"],
                                 attributes={"K": "INT", "N": "INT", "bits": "INT",
                                             "block_size": "INT"})
    """
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    try:
        schema = onnx.defs.get_schema(name, version, domain)
    except onnx.defs.SchemaError:
        param = OpSchema.FormalParameter
        opt = OpSchema.FormalParameterOption
        ins = [
            param(
                n.rstrip("?"), f"T{i}", param_option=opt.Optional if n.endswith("?") else opt.Single
            )
            for i, n in enumerate(inputs)
        ]
        outs = [param(n, f"O{i}") for i, n in enumerate(outputs)]
        types = [(f"T{i}", _TENSOR_TYPES, "") for i in range(len(inputs))]
        types += [(f"O{i}", _TENSOR_TYPES, "") for i in range(len(outputs))]
        attrs = [
            OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), required=False)
            for a, t in (attributes or {}).items()
        ]
        schema = OpSchema(
            name,
            domain,
            version,
            f"meshweave: {domain}::{name}",
            inputs=ins,
            outputs=outs,
            type_constraints=types,
            attributes=attrs,
        )
        if type_from_input is not None:
            schema.set_type_and_shape_inference_function(
                lambda ctx: _output_types_like(ctx, type_from_input, len(outputs))
            )
        onnx.defs.register_schema(schema)
    return onnxscript.values.Op(onnxscript.values.Opset(domain, version), name, schema)


def translation_table(graph: Graph) -> dict[Callable, Callable]:
    """torch.onnx's custom_translation_table for the ops of `graph` that have a translation."""
    table: dict[Callable, Callable] = {}
    for op in sorted({n.op for n in graph.nodes}):
        fn = ONNX_TRANSLATIONS.get(op)
        if fn is not None:
            table[resolve_torch_op(op)] = fn
    return table


def _output_types_like(ctx, index: int, n_outputs: int) -> None:
    import onnx

    src = ctx.get_input_type(index)
    if src is None or not src.HasField("tensor_type"):
        return
    for i in range(n_outputs):
        t = onnx.TypeProto()
        t.tensor_type.elem_type = src.tensor_type.elem_type
        ctx.set_output_type(i, t)


# ----------------------------------------------------------------------------- traced forms
# Some IR ops have an eager rule torch.export cannot trace to a static graph (moe.experts sorts
# tokens by expert: data-dependent shapes). ONNX_FORMS gives such an op a torch function with
# static shapes that computes the same thing; graph_to_module calls it in the op's place, so
# torch.onnx sees ATen ops torchlib knows.
ONNX_FORMS = RuleTable("onnx_form")


def onnx_form(node) -> Callable | None:
    """graph_to_module's override for the ONNX export: the node's traced form, if it has one."""
    return ONNX_FORMS.get(node.op)


@ONNX_FORMS.register("moe.experts")
def moe_experts_dense(x, weights, ids, w_in, w_gate, w_out, *, act="silu", layout="kn",
                      fused_gate_up=False, capacity_factor=None):
    """moe.experts, dense and exact: every expert on every token (E/k times the FLOPs of the
    sparse rule), each token's combine weights scattered from its ids into [T, E] (zero for
    experts it did not pick). Capacity drops the pairs past an expert's capacity in token
    order, as the eager rule does, via a running count of each expert's pairs."""
    import torch

    from meshweave.ir.ops.moe import ACTIVATIONS, capacity, check_args

    check_args(x, weights, ids, w_in, w_gate, w_out, act, layout, fused_gate_up)
    t, k = ids.shape
    e = w_in.shape[0]
    pair_w = weights.to(torch.float32)
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    cap = capacity(t, k, e, capacity_factor)
    if cap is not None:  # rank of each (token, slot) among its expert's pairs, in flat order
        one_hot = torch.nn.functional.one_hot(ids.reshape(-1), e)
        rank = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).reshape(t, k)
        kept = rank < cap
        pair_w = pair_w * kept
        dropped = (t * k - kept.sum()).to(torch.int64)
    combine = torch.zeros((t, e), dtype=torch.float32, device=x.device).scatter_add(
        1, ids, pair_w)

    def proj(h, w):
        return torch.bmm(h, w if layout == "kn" else w.transpose(1, 2))

    xe = x.unsqueeze(0).expand(e, t, x.shape[1])
    fn = ACTIVATIONS[act]
    up = proj(xe, w_in)
    if fused_gate_up:
        gate, up = up.chunk(2, dim=-1)
        inner = fn(gate) * up
    elif w_gate is not None:
        inner = fn(proj(xe, w_gate)) * up
    else:
        inner = fn(up)
    y = proj(inner, w_out)  # [E, T, d]
    y = (combine.t().unsqueeze(-1).to(y.dtype) * y).sum(dim=0)
    return y.to(x.dtype), dropped
