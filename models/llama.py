"""Llama-style decoder: RoPE, grouped-query attention, SwiGLU MLP, RMSNorm, no biases.

The rotary tables are computed inside ``forward`` from ``torch.arange`` over the
(possibly symbolic) sequence length, so the model has no position buffers and
no data-dependent control flow; it exports with ``torch.export`` including a
dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, SwiGLU, apply_rope, init_normal_, repeat_kv, rope_cos_sin, token_inputs
from .registry import register_model


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama decoder."""

    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 176
    max_seq_len: int = 64
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")


class GQAttention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # RoPE and the GQA head repeat work in the projections' own [B, S, H, D] layout; heads
        # move to dim 1 only for SDPA. (Repeating heads of the transposed view makes torch
        # 2.11's export reject a dynamic sequence length over a Min() stride guard.)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, D]: broadcast over heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = GQAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class RotaryDecoder(nn.Module):
    """The decoder skeleton shared by Llama and the MoE decoder: token embedding, blocks called
    with the RoPE tables, final RMSNorm, LM head.
    ``forward(input_ids [B, S] int64) -> logits [B, S, vocab]``."""

    def __init__(self, cfg, block: Callable[[Any], nn.Module]) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device, x.dtype
        )
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


class Llama(RotaryDecoder):
    """Llama LM: RoPE, grouped-query attention, SwiGLU, RMSNorm, no biases."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg, LlamaBlock)
        self.apply(lambda m: init_normal_(m, cfg.init_std))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight


def decoder_inputs(cfg, batch: int, seq: int, device: str | torch.device) -> tuple:
    """Token ids [batch, seq] for the rotary decoders (Llama, MoE)."""
    return token_inputs(cfg.vocab_size, batch, seq, device, cfg.max_seq_len)


register_model(
    "llama-tiny",
    LlamaConfig,
    Llama,
    decoder_inputs,
    "Llama for tests: 2 layers, hidden 64, 4 heads / 2 KV heads, ffn 176, vocab 128",
    family="llama",
)
register_model(
    "llama-8b",
    lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        max_seq_len=8192,
    ),
    Llama,
    decoder_inputs,
    "Llama-3 8B: 32 layers, hidden 4096, 32 heads / 8 KV heads, ffn 14336, vocab 128256",
    family="llama",
)
register_model(
    "llama-70b",
    lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        ffn_hidden_size=28672,
        max_seq_len=8192,
    ),
    Llama,
    decoder_inputs,
    "Llama-3 70B: 80 layers, hidden 8192, 64 heads / 8 KV heads, ffn 28672, vocab 128256",
    family="llama",
)
