"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs.

H = 2 X^T X / n over the calibration inputs X of the layer. The algorithm works on the upper
Cholesky factor of H^-1 (after dampening H with `damp` x its mean diagonal) and processes
`block_size` columns at a time ("lazy batch updates"): errors update the block's remaining
columns at once, and the trailing columns in one matmul after the block. With act_order,
columns go in order of decreasing H diagonal; group scales are then fixed up front from the
unquantized weight ("static groups"), so groups stay contiguous along K.
"""

from __future__ import annotations

import torch

from .quantizer import grid, quantize_codes


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows x (of K features) of calibration inputs."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        total = self.rows + x.shape[0]
        self.h *= self.rows / total
        self.h += (2.0 / total) * (x.T @ x)
        self.rows = total


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool, *,
         damp: float = 0.01, block_size: int = 128, act_order: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w[N, K], H[K, K] -> (codes[N, K], scales[N, K/g], zeros[N, K/g]) in fp32."""
    n, k = w.shape
    w = w.detach().to(torch.float32).clone()
    h = h.to(torch.float32).clone()
    dead = torch.diag(h) == 0  # features never active in calibration: any code is exact
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = torch.zeros(n, k // group)
    zeros = torch.zeros(n, k // group)
    static = act_order and group < k
    if static or group == k:
        for gi in range(k // group):
            scales[:, gi], zeros[:, gi] = grid(w[:, gi * group:(gi + 1) * group], bits,
                                               symmetric)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = _inverse_cholesky_upper(h)
    codes = torch.zeros(n, k)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group
            if not (static or group == k) and col % group == 0:
                # The group's grid from its columns as updated so far (all inside w1, since
                # block_size is a multiple of group).
                scales[:, g], zeros[:, g] = grid(w1[:, i:i + group], bits, symmetric)
            q = quantize_codes(w1[:, i], scales[:, g], zeros[:, g], bits)
            codes[:, col] = q
            dq = scales[:, g] * (q - zeros[:, g])
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return codes[:, inverse], scales, zeros


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, with more dampening if H is not positive definite."""
    eye = torch.eye(h.shape[0])
    extra = 0.0
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + extra * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-4 * float(torch.mean(torch.diag(h))))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even after "
                     "dampening; raise QuantConfig.damp or give more calibration batches")
