"""Packing of int2/3/4/8 codes into int32 words, and the dequantization they stand for.

This is the format of the `quant.linear` op (ir/ops/quant.py), so it lives in ir/: the op's
eager rule, the quantization pass (passes/quant/), the Triton kernels and ONNX export all read it.

Layout (the one every consumer reads: the eager rule, the Triton kernels, ONNX export, the
sharding rules): a weight of K input features and N output features is quantized as codes
`q[K, N]` in [0, 2**bits); the codes of one column are a little-endian bit stream along K,
cut into int32 words, so the packed tensor is `int32[K * bits / 32, N]`.

Why this layout:
  - N is the contiguous axis, so a kernel tile loads whole 32-bit words per output column
    with coalesced accesses, and unpacks them in registers with shifts (as GPTQ's
    `qweight[K/8, N]`, which this is for 4 bits);
  - splitting along N is a plain column slice of the words (tensor parallel, column split);
  - a group of g codes along K is g * bits / 32 whole words for g in {32, 64, 128}
    (3 bits: 32 codes are exactly 3 words), so splitting along K at group boundaries is a
    row slice, with no repacking;
  - 2, 4 and 8 bits never straddle a word; 3 bits do (code 10 spans bits 30..32), which the
    bit-stream definition handles without a special case.
Codes are stored as int32 bit patterns of uint32 words (torch has no uint32 arithmetic on
every version we support); unpacking masks after the shift, so the sign bit is harmless.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def packed_rows(k: int, bits: int) -> int:
    """Rows of the packed tensor for K codes of `bits` bits (K * bits must fill whole words)."""
    if (k * bits) % WORD_BITS:
        raise ValueError(f"cannot pack K={k} codes of {bits} bits into whole 32-bit words: "
                         f"K * bits = {k * bits} is not a multiple of 32")
    return k * bits // WORD_BITS


def _positions(k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(k, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes[K, N] (integers in [0, 2**bits)) -> int32[K * bits / 32, N]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pack: bits={bits}; expected one of {SUPPORTED_BITS}")
    if codes.dim() != 2:
        raise ValueError(f"pack: codes must be 2-D [K, N], got shape {tuple(codes.shape)}")
    k, n = codes.shape
    q = codes.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"pack: codes outside [0, {1 << bits}) for {bits} bits "
                         f"(min {int(q.min())}, max {int(q.max())})")
    rows = packed_rows(k, bits)
    word, shift = _positions(k, bits, q.device)
    words = torch.zeros(rows + 1, n, dtype=torch.int64, device=q.device)
    # Bits of different codes are disjoint, so adding them is OR-ing them.
    words.index_add_(0, word, (q << shift[:, None]) & 0xFFFFFFFF)
    spill = (shift + bits) > WORD_BITS  # the high part of a code that straddles two words
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, q[spill] >> (WORD_BITS - shift[spill, None]))
    words = words[:rows]
    return (words - ((words >= 1 << 31).to(torch.int64) << 32)).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32[K * bits / 32, N] -> int32 codes[K, N]; the exact inverse of `pack`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unpack: bits={bits}; expected one of {SUPPORTED_BITS}")
    if packed.dim() != 2 or packed.shape[0] != packed_rows(k, bits):
        raise ValueError(f"unpack: expected int32[{packed_rows(k, bits)}, N] for K={k} at "
                         f"{bits} bits, got shape {tuple(packed.shape)}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:1])])
    word, shift = _positions(k, bits, packed.device)
    mask = (1 << bits) - 1
    lo = words[word] >> shift[:, None]
    hi = words[word + 1] << (WORD_BITS - shift[:, None])
    both = torch.where(((shift + bits) > WORD_BITS)[:, None], lo | hi, lo)
    return (both & mask).to(torch.int32)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [K, N] that packed codes stand for: (q - zero) * scale per group of K.

    scales[K / group_size, N]; zeros the same shape (integer zero points) or None for the
    symmetric scheme, whose zero point is 2**(bits-1). Computed in fp32 (as the kernels do in
    registers), then cast to `dtype` (default: the scales' dtype).
    """
    groups, n = scales.shape
    k = groups * group_size
    q = unpack(packed, bits, k).to(torch.float32)
    z = (torch.full_like(scales, 1 << (bits - 1), dtype=torch.float32) if zeros is None
         else zeros.to(torch.float32))
    w = (q.view(groups, group_size, n) - z[:, None, :]) * scales.to(torch.float32)[:, None, :]
    return w.reshape(k, n).to(dtype or scales.dtype)
