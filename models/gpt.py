"""GPT decoder (GPT-2/3 layout) and the PanGu-alpha variant with a top query layer.

Layout: learned token + position embeddings, pre-LN blocks with causal
multi-head attention (``F.scaled_dot_product_attention(is_causal=True)``) and a
GELU MLP, final LayerNorm, LM head tied to the token embedding (optional).

PanGu-alpha (Zeng et al., 2021) appends a *top query layer*: one more
transformer layer whose attention query is not the hidden state but a
separate learned embedding of the position ("query-position embedding"),
while keys/values come from the hidden states. As in the reference
implementation the top query layer is counted in ``num_layers`` (so a
32-layer model has 31 ordinary blocks plus the query layer) and sits after the
final LayerNorm, directly before the tied output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_normal_, token_inputs
from .registry import register_model


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT / PanGu-alpha decoder."""

    vocab_size: int = 128
    max_seq_len: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size
    tie_embeddings: bool = True
    top_query_layer: bool = False  # PanGu-alpha; counted in num_layers
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def num_blocks(self) -> int:
        """Ordinary transformer blocks (excludes the top query layer)."""
        return self.num_layers - 1 if self.top_query_layer else self.num_layers

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.top_query_layer and self.num_layers < 1:
            raise ValueError("a top query layer needs num_layers >= 1")


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, _, s, _ = x.shape
    return x.transpose(1, 2).reshape(b, s, -1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection (with biases)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(_merge_heads(y))


class QueryAttention(nn.Module):
    """Causal attention whose queries come from a separate input (PanGu top query layer)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv_proj = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q_proj(query), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv_proj(x).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(_merge_heads(y))


class MLP(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TopQueryLayer(nn.Module):
    """PanGu-alpha top layer: pre-LN block whose attention query is a position embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = QueryAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), query)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """Decoder-only LM: ``forward(input_ids [B, S] int64) -> logits [B, S, vocab]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.top_query_layer:
            self.top_query_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            self.top_query_layer = TopQueryLayer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(lambda m: init_normal_(m, cfg.init_std))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.config.top_query_layer:
            query = self.top_query_emb(positions).expand(batch, seq, -1)
            x = self.top_query_layer(x, query)
        return self.lm_head(x)


def _gpt_inputs(cfg: GPTConfig, batch: int, seq: int, device: str | torch.device) -> tuple:
    return token_inputs(cfg.vocab_size, batch, seq, device, cfg.max_seq_len)


def _pangu(num_layers: int, hidden: int, heads: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=40000,
        max_seq_len=1024,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        top_query_layer=True,
    )


_CONFIGS: dict[str, tuple[Callable[[], GPTConfig], str]] = {
    "gpt-tiny": (
        lambda: GPTConfig(),
        "GPT decoder for tests: 2 layers, hidden 64, 4 heads, vocab 128, seq 32",
    ),
    "pangu-tiny": (
        lambda: GPTConfig(top_query_layer=True, num_layers=3),
        "PanGu-alpha layout for tests: 2 blocks + top query layer, hidden 64, vocab 128",
    ),
    "pangu-alpha-2.6b": (
        lambda: _pangu(32, 2560, 32),
        "PanGu-alpha 2.6B: 32 layers (incl. top query layer), hidden 2560, 32 heads",
    ),
    "pangu-alpha-13b": (
        lambda: _pangu(40, 5120, 40),
        "PanGu-alpha 13B: 40 layers (incl. top query layer), hidden 5120, 40 heads",
    ),
    "pangu-alpha-200b": (
        lambda: _pangu(64, 16384, 128),
        "PanGu-alpha 200B: 64 layers (incl. top query layer), hidden 16384, 128 heads",
    ),
    "gpt3-175b": (
        lambda: GPTConfig(
            vocab_size=50257, max_seq_len=2048, hidden_size=12288, num_layers=96, num_heads=96
        ),
        "GPT-3 175B: 96 layers, hidden 12288, 96 heads, vocab 50257, seq 2048",
    ),
}

for _name, (_factory, _desc) in _CONFIGS.items():
    register_model(_name, _factory, GPT, _gpt_inputs, _desc, family="gpt")
