"""Building blocks shared by the zoo models: init, RMSNorm, RoPE, SwiGLU, token inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: N(0, std) for Linear/Embedding weights, zero biases.

    Works on meta tensors too (the init ops are then no-ops), so it can be
    applied unconditionally from a model's ``__init__``.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP: ``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``cos, sin`` of shape [seq_len, head_dim], built from ``torch.arange``.

    ``seq_len`` may be a symbolic size; nothing here depends on tensor values.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [S, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [S, D], "rotate half" layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by position using the half-split convention; ``cos``/``sin`` broadcast
    against it ([S, D] for [B, H, S, D], [S, 1, D] for [B, S, H, D])."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand grouped K/V heads [B, S, KV, D] to [B, S, KV * n_rep, D] for GQA (each head
    repeated n_rep times in place, as Llama does)."""
    if n_rep == 1:
        return x
    b, s, kv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, kv, n_rep, d).reshape(b, s, kv * n_rep, d)


def token_inputs(
    vocab_size: int, batch: int, seq: int, device: str | torch.device, max_seq_len: int | None
) -> tuple[torch.Tensor]:
    """Deterministic int64 token ids [batch, seq] in ``[0, vocab_size)``."""
    if max_seq_len is not None and seq > max_seq_len:
        raise ValueError(f"seq={seq} exceeds the model's max_seq_len={max_seq_len}")
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
    return (ids.to(device),)
