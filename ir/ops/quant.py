"""The quantized linear op, `quant.linear`: y = x @ dequantize(qweight, scales, zeros) + bias.

    quant.linear(x[..., K], qweight: i32[K*bits/32, N], scales[K/g, N], zeros: u8[K/g, N] | None,
                 bias[N] | None, bits=4, group_size=128) -> [..., N]

The packed format is ir/packing.py's. The eager rule (the reference semantics) dequantizes in
fp32 and multiplies in the activations' dtype, which is what the Triton kernels compute tile by
tile in registers. Bytes moved count the packed words, scales and zeros actually read, not an
fp16 weight: that is the point of the op, and what the planner's cost model sees. Sharding rules
(split along N freely, along K only at group boundaries) are in
passes/parallel/strategies/quant_rules.py.
"""

from __future__ import annotations

import torch

from ..packing import dequantize
from ..registry import register_op
from ..types import TensorType
from .common import numel

QUANT_LINEAR = "quant.linear"


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                 bits: int, group_size: int) -> torch.Tensor:
    w = dequantize(qweight, scales, zeros, bits, group_size, dtype=x.dtype)
    out = torch.matmul(x, w)
    return out if bias is None else out + bias.to(out.dtype)


def _shape(x, qweight, scales, zeros=None, bias=None, *, bits, group_size):
    n = qweight.shape[1]
    return [TensorType(tuple(x.shape[:-1]) + (n,), x.dtype, x.device)]


def _flops(args, kwargs, outs):
    x = args[0]
    # the matmul, plus a subtract and a multiply per dequantized weight (once per tile row
    # of M in a real kernel; counted once here)
    return 2 * numel(x.shape) * args[1].shape[1]


def _bytes(args, kwargs, outs):
    x, qweight, scales = args[0], args[1], args[2]
    total = x.nbytes() + qweight.nbytes() + scales.nbytes() + outs[0].nbytes()
    for extra in args[3:5]:
        if isinstance(extra, TensorType):
            total = total + extra.nbytes()
    return total


register_op(QUANT_LINEAR, quant_linear, shape=_shape, flops=_flops, bytes=_bytes,
            category="matmul",
            doc="weight-only quantized linear: x @ dequant(qweight, scales, zeros) + bias")
