"""Round-to-nearest quantization of one weight, and the grid (scales, zeros) of a group.

Weights here are [N, K] rows of output channels (torch's linear layout), the layout GPTQ
updates in; the pass transposes to the packed [K, N] layout at the end.
"""

from __future__ import annotations

import torch


def grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of w[N, g] (the group's columns), fp32.

    Asymmetric: the range [min, max] (widened to include 0) maps to [0, 2**bits - 1].
    Symmetric: [-max|w|, max|w|] maps around the fixed zero point 2**(bits-1).
    """
    maxq = (1 << bits) - 1
    w = w.float()
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale == 0, 1.0, scale))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero rows
    return scale, zero.clamp(0, maxq)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Codes of w[N] or w[N, c] against per-row scale/zero [N]: round, then clamp."""
    if w.dim() == 2 and scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1)


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w[N, K] -> (codes[N, K], scales[N, K/g], zeros[N, K/g]), fp32, by round to nearest."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    scales, zeros = grid(groups.permute(1, 0, 2).reshape(-1, group), bits, symmetric)
    scales = scales.view(k // group, n).T
    zeros = zeros.view(k // group, n).T
    codes = torch.clamp(torch.round(groups / scales[..., None]) + zeros[..., None], 0,
                        (1 << bits) - 1)
    return codes.reshape(n, k), scales.contiguous(), zeros.contiguous()
