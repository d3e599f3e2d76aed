"""Quantized linears in ONNX: `quant.linear` -> `com.microsoft::MatMulNBits`, or a fallback.

onnxruntime's MatMulNBits computes Y = A @ dequant(B)^T (+ bias) with
  B            uint8[N, K / block, block * bits / 8]: each output row's codes, a little-endian
               bit stream along K (low bits first; for 4 bits the low nibble is the first code),
  scales       [N, K / block] in A's dtype,
  zero_points  uint8[N, ceil(K / block * bits / 8)]: each row's block zero points, packed the
               same way and padded to a whole byte per row; absent means 2**(bits-1),
  attributes   K, N, bits, block_size (a power of two, at least 16).
meshweave's packed layout (ir/packing.py) is int32 words along K per column, so the export
unpacks the codes, transposes them to N-major and repacks them in bytes. A group that is not a
power of two (a per-channel group spanning K=176, say) is exported with the largest power-of-two
block dividing it, each scale and zero point repeated over the blocks of its group: the same
weights, a few more scale bytes.

onnxruntime's CPU kernel supports bits 2, 4 and 8 (1.32: "Only 2b, 4b and 8b quantization is
supported"). Other widths (3 bits), and groups with no power-of-two block of at least 16, are
exported as a dequantize subgraph (uint8 codes, one per byte: DequantizeLinear per axis) then
MatMul, and
`lower_quant_linears` returns a note naming each such layer.

Both forms are torch.library ops (so the rebuilt fx module traces to them) with translations
in ONNX_TRANSLATIONS; their eager bodies compute what the ONNX ops compute, which is how the
ONNX-side tensors are checked against `quant.linear` without onnxruntime.
"""

from __future__ import annotations

import warnings

import torch

from meshweave.ir.graph import Graph, NameGen, Node, Value
from meshweave.ir.ops.quant import QUANT_LINEAR
from meshweave.ir.packing import unpack
from meshweave.ir.types import tensor_type_of
from .translations import contrib_op, register_onnx_translation

MATMUL_NBITS = "meshweave_onnx.matmul_nbits.default"
DEQUANT_MATMUL = "meshweave_onnx.dequant_matmul.default"
ORT_NBITS = (2, 4, 8)  # the widths onnxruntime's CPU MatMulNBits kernel accepts
MIN_BLOCK = 16  # MatMulNBits: block_size is a power of two >= 16


class QuantExportWarning(UserWarning):
    """A quantized layer exported without MatMulNBits (see the note it carries)."""


# ----------------------------------------------------------------------------- byte packing
def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes[R, L] in [0, 2**bits) -> uint8[R, ceil(L * bits / 8)], each row a little-endian
    bit stream (code i at bits i*bits.. of the row; bits 2, 4, 8 never straddle a byte)."""
    if 8 % bits:
        raise ValueError(f"pack_rows: bits={bits}; expected 2, 4 or 8 (whole codes per byte)")
    per = 8 // bits
    r, length = codes.shape
    pad = (-length) % per
    q = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).view(r, -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """The inverse of pack_rows: uint8[R, bytes] -> int32 codes[R, length]."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    q = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :length]


def block_for(group: int) -> int | None:
    """The MatMulNBits block for a group of `group` codes: the largest power of two dividing
    it, or None when that is below 16."""
    block = group & -group
    return block if block >= MIN_BLOCK else None


def to_matmul_nbits(qweight, scales, zeros, bits: int, group: int, block: int):
    """quant.linear's (qweight[K*bits/32, N], scales[K/g, N], zeros[K/g, N] | None) ->
    MatMulNBits' (B uint8[N, K/block, block*bits/8], scales[N, K/block], zero_points | None)."""
    groups, n = scales.shape
    k = groups * group
    codes_nk = unpack(qweight, bits, k).T.contiguous()
    b = pack_rows(codes_nk, bits).view(n, k // block, block * bits // 8)
    rep = group // block
    sc = scales.T.repeat_interleave(rep, dim=1).contiguous()
    zp = None
    if zeros is not None:
        zp = pack_rows(zeros.T.repeat_interleave(rep, dim=1), bits)
    return b, sc, zp


# ----------------------------------------------------------------------------- the two ops
@torch.library.custom_op("meshweave_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, bias: torch.Tensor | None,
                 k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """What com.microsoft::MatMulNBits computes, from its own tensor layout."""
    blocks = k // block_size
    q = unpack_rows(b.reshape(n, -1), bits, k).to(torch.float32).view(n, blocks, block_size)
    z = (torch.full((n, blocks), float(1 << (bits - 1))) if zero_points is None
         else unpack_rows(zero_points, bits, blocks).to(torch.float32))
    w = ((q - z[..., None]) * scales.to(torch.float32).view(n, blocks, 1)).view(n, k)
    out = torch.matmul(x, w.to(x.dtype).T)
    return out if bias is None else out + bias.to(out.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("meshweave_onnx::dequant_matmul", mutates_args=())
def dequant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, bias: torch.Tensor | None,
                   k: int, n: int, bits: int, group_size: int) -> torch.Tensor:
    """The fallback, in DequantizeLinear's per-axis form: codes uint8[g, K/g * N] (one code a
    byte; column j is group j // N of output channel j % N), fp32 scales and uint8 zeros
    [K/g * N]; (codes - zero) * scale, back to [K, N], then matmul."""
    w = (codes.to(torch.float32) - zeros.to(torch.float32)) * scales
    w = w.view(group_size, k // group_size, n).transpose(0, 1).reshape(k, n)
    out = torch.matmul(x, w.to(x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


@dequant_matmul.register_fake
def _(x, codes, scales, zeros, bias, k, n, bits, group_size):
    return x.new_empty((*x.shape[:-1], n))


def to_dequantize_linear(qweight, scales, zeros, bits: int, group: int):
    """quant.linear's tensors -> the fallback's (codes uint8[g, K/g * N], fp32 scales, uint8
    zero points [K/g * N]); symmetric weights get the implied zero point 2**(bits-1)."""
    groups, n = scales.shape
    k = groups * group
    codes = unpack(qweight, bits, k).to(torch.uint8).view(groups, group, n)
    codes = codes.transpose(0, 1).reshape(group, groups * n).contiguous()
    z = (torch.full((groups * n,), 1 << (bits - 1), dtype=torch.uint8) if zeros is None
         else zeros.reshape(-1).to(torch.uint8))
    return codes, scales.reshape(-1).to(torch.float32), z


@register_onnx_translation(MATMUL_NBITS)
def matmul_nbits_onnx(x, b, scales, zero_points, bias, k, n, bits, block_size):
    op = contrib_op("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                    attributes={"K": "INT", "N": "INT", "bits": "INT", "block_size": "INT",
                                "accuracy_level": "INT"})
    return op(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size)


@register_onnx_translation(DEQUANT_MATMUL)
def dequant_matmul_onnx(x, codes, scales, zeros, bias, k, n, bits, group_size):
    # DequantizeLinear, not Cast/Sub/Mul: torch.onnx's constant folder keeps it (it folds the
    # arithmetic on small initializers, which would store the float weight in the file).
    from onnxscript import opset18 as op

    w = op.DequantizeLinear(codes, scales, zeros, axis=1)
    w = op.Reshape(w, op.Constant(value_ints=[group_size, k // group_size, n]))
    w = op.Reshape(op.Transpose(w, perm=[1, 0, 2]), op.Constant(value_ints=[k, n]))
    out = op.MatMul(x, op.CastLike(w, x))
    return out if bias is None else op.Add(out, op.CastLike(bias, out))


# ----------------------------------------------------------------------------- the rewrite
def lower_quant_linears(graph: Graph) -> tuple[Graph, list[str]]:
    """`quant.linear` nodes -> MatMulNBits (or the fallback) with their ONNX-layout weights.

    Returns the rewritten copy and one note per layer that did not become MatMulNBits (also
    issued as a QuantExportWarning). A graph without quant.linear is returned as is."""
    if not any(n.op == QUANT_LINEAR for n in graph.nodes):
        return graph, []
    g = graph.copy()
    g.tensors = dict(g.tensors)
    names = NameGen(g)
    done: dict[tuple, tuple] = {}  # (qweight, scales, zeros, form) -> new weight Values
    notes: list[str] = []
    for i, node in enumerate(g.nodes):
        if node.op != QUANT_LINEAR:
            continue
        x, qw, sc, zr, bias = (list(node.args) + [None] * 5)[:5]
        bits, group = node.kwargs["bits"], node.kwargs["group_size"]
        block = block_for(group)
        layer = (qw.target or qw.name).rsplit(".", 1)[0]
        key = (qw, sc, zr, bits in ORT_NBITS and block is not None)
        tensors = [g.tensors[v.name] if v is not None else None for v in (qw, sc, zr)]
        k, n = group * tensors[1].shape[0], tensors[0].shape[1]
        if key[-1]:
            if key not in done:
                done[key] = _add_weights(g, names, (qw, sc, zr),
                                         ("onnx_b", "onnx_scales", "onnx_zero_points"),
                                         to_matmul_nbits(*tensors, bits, group, block))
            op, kwargs = MATMUL_NBITS, {"k": k, "n": n, "bits": bits, "block_size": block}
        else:
            why = (f"bits={bits} (onnxruntime's MatMulNBits supports {ORT_NBITS})"
                   if bits not in ORT_NBITS else
                   f"group_size={group} has no power-of-two block of at least {MIN_BLOCK}")
            notes.append(f"{layer} [{n}x{k}] w{bits}: {why}; exported as dequantize (uint8 codes, "
                         "DequantizeLinear) then MatMul, not com.microsoft::MatMulNBits")
            if key not in done:
                done[key] = _add_weights(g, names, (qw, sc, qw),
                                         ("onnx_codes", "onnx_dq_scales", "onnx_dq_zeros"),
                                         to_dequantize_linear(*tensors, bits, group))
            op, kwargs = DEQUANT_MATMUL, {"k": k, "n": n, "bits": bits, "group_size": group}
        new = Node(op, (x, *done[key], bias), kwargs, node.outputs, node.source,
                   dict(node.attrs), False)
        for o in new.outputs:
            o.producer = new
        g.nodes[i] = new
    used = {v for n in g.nodes for v in n.inputs} | set(g.outputs)
    for v in [v for v in g.inputs if v.kind != "user" and v not in used]:
        g.inputs.remove(v)
        g.tensors.pop(v.name, None)
    if notes:
        warnings.warn(f"{len(notes)} quantized layer(s) exported without MatMulNBits; first: "
                      f"{notes[0]}", QuantExportWarning, stacklevel=2)
    return g, notes


def _add_weights(g: Graph, names: NameGen, old: tuple, suffixes: tuple, tensors: tuple):
    """New param inputs for the ONNX-layout tensors (None stays None), named after the old."""
    out = []
    for v, suffix, t in zip(old, suffixes, tensors):
        if t is None:
            out.append(None)
            continue
        base = (v.target or v.name).rsplit(".", 1)[0]
        nv = Value(names(f"{base.replace('.', '_')}_{suffix}"),
                   tensor_type_of(t, t.device.type), None, "param", f"{base}.{suffix}")
        g.tensors[nv.name] = t
        g.inputs.append(nv)
        out.append(nv)
    return tuple(out)
