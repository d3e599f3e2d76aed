"""The zoo's rotary decoders (Llama, the trained small LM) as a functional KV-cache step.

``KVDecoder(model)(input_ids [B, S], positions [B, S], k_cache, v_cache)`` returns
``(logits [B, S, vocab], k_cache', v_cache')``; with a fifth input ``tree_mask [S, S]`` the S
tokens are a token tree (Medusa: passes/decoding/tree.py) scored in the same one program, and
``hidden_states`` gives the final hidden state that Medusa heads read. The caches are explicit
inputs and outputs, ``[layers, B, kv_heads, C, head_dim]``, so one torch.export trace holds the
whole step with no mutation: meshweave.compile turns it into the prefill program (S = the
padded prompt) and the decode program (S = 1, or k + 1 to verify k drafted tokens).

The cache is static and indexed by position: the token at position p of a sequence writes
slot p, and a query at position p sees slots 0..p. With prompts right-padded to one length,
that mask alone is right: a real token never sees the padding after it, and the slot a pad
token wrote is overwritten by the real token of that position before any query reaches it.
For the same reason a rejected draft needs no cleanup: the next step rewrites its slot before
reading it (rollback is not advancing the sequence's length). A tree's nodes write the W slots
after the cached length in node order; the accepted path is then copied down to consecutive
slots (passes/decoding/tree.py compact_kv) and the rest is overwritten later. The weights are
the wrapped model's own modules, so the step computes what the model computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import apply_rope, repeat_kv


def rope_at(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary (cos, sin) [B, S, 1, D] at per-sequence positions [B, S]: the same table as
    models/layers.py rope_cos_sin."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, S, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [B, S, 1, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def attend_cached(q, k, v, index, visible, k_cache, v_cache, n_rep: int):
    """One layer's cached attention: write k, v [B, S, KV, D] into the slots `index`
    ([B, KV, S, D] slot ids) of k_cache, v_cache [B, KV, C, D] (functionally), and attend
    q [B, S, H, D] over the visible slots (`visible` [B, 1, S, C]). Returns (y [B, S, H*D],
    k_cache', v_cache'). The hybrid runtime's device attention (runtime/offload/) is this
    same function."""
    b, s = q.shape[:2]
    kc = k_cache.scatter(2, index, k.transpose(1, 2))  # [B, KV, C, D]
    vc = v_cache.scatter(2, index, v.transpose(1, 2))
    keys = repeat_kv(kc.transpose(1, 2), n_rep).transpose(1, 2)  # [B, H, C, D]
    values = repeat_kv(vc.transpose(1, 2), n_rep).transpose(1, 2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible)
    return y.transpose(1, 2).reshape(b, s, -1), kc, vc


class KVDecoder(nn.Module):
    """One cached decoding step of a RotaryDecoder (models/llama.py: Llama, small_lm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = getattr(model, "config", None)
        needed = ("embed", "layers", "norm", "lm_head")
        if cfg is None or not all(hasattr(model, n) for n in needed):
            raise TypeError(
                f"KVDecoder wraps a rotary decoder (models/llama.py RotaryDecoder: embed, "
                f"layers, norm, lm_head and a config), got {type(model).__name__}")
        attn = model.layers[0].attn
        if not hasattr(attn, "q_proj"):
            raise TypeError(f"KVDecoder: {type(model).__name__}'s layers have no grouped-query "
                            f"attention (attn.q_proj/k_proj/v_proj/o_proj)")
        self.model = model
        self.num_layers = len(model.layers)
        self.num_heads = attn.num_heads
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.rope_theta = float(cfg.rope_theta)
        self.vocab_size = int(cfg.vocab_size)

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        return (self.num_layers, batch, self.num_kv_heads, capacity, self.head_dim)

    def empty_cache(self, batch: int, capacity: int, dtype=torch.float32, device="cpu"):
        shape = self.cache_shape(batch, capacity)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
            shape, dtype=dtype, device=device)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_at(positions, self.head_dim, self.rope_theta, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, tree_mask: torch.Tensor | None = None):
        hidden, k, v = self.hidden_states(input_ids, positions, k_cache, v_cache, tree_mask)
        return self.model.lm_head(hidden), k, v

    def _visibility(self, positions: torch.Tensor, capacity: int,
                    tree_mask: torch.Tensor | None):
        """(write slots [B, S], visible [B, 1, S, C]). Chain or prompt: token at position p
        writes slot p and sees slots 0..p. Tree: node i writes slot L + i (L = positions[:, 0],
        the root at the cached length; nodes of one depth share a position, not a slot) and
        sees the committed slots < L plus the slots of the nodes j with tree_mask[i, j]."""
        slots = torch.arange(capacity, device=positions.device)
        if tree_mask is None:
            return positions, slots[None, None, None, :] <= positions[:, None, :, None]
        b, s = positions.shape
        base = positions[:, :1]  # [B, 1]
        write = base + torch.arange(s, device=positions.device)[None, :]
        rel = slots[None, :] - base  # [B, C]: slot relative to the root's
        cols = rel.clamp(0, s - 1).reshape(-1)
        in_tree = tree_mask.to(torch.bool).index_select(1, cols).reshape(s, b, capacity)
        in_tree = in_tree.permute(1, 0, 2) & ((rel >= 0) & (rel < s))[:, None, :]
        return write, ((rel < 0)[:, None, :] | in_tree)[:, None]

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tree_mask: torch.Tensor | None = None):
        """(final normed hidden state [B, S, hidden], k_cache', v_cache'): what lm_head reads,
        and what Medusa heads (models/medusa.py) read. tree_mask [S, S] (bool: node i attends
        to node j; each node to itself and its ancestors) makes the S tokens a token tree whose
        per-token positions (RoPE) are `positions` (the cached length + depth)."""
        m = self.model
        b, s = input_ids.shape
        capacity = k_cache.shape[3]
        x = m.embed(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        write, visible = self._visibility(positions, capacity, tree_mask)
        index = write[:, None, :, None].expand(b, self.num_kv_heads, s, self.head_dim)
        n_rep = self.num_heads // self.num_kv_heads
        new_k, new_v = [], []
        for i, layer in enumerate(m.layers):
            attn, h = layer.attn, layer.attn_norm(x)
            q = attn.q_proj(h).view(b, s, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(b, s, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(b, s, self.num_kv_heads, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y, kc, vc = attend_cached(q, k, v, index, visible, k_cache[i], v_cache[i], n_rep)
            new_k.append(kc)
            new_v.append(vc)
            x = x + attn.o_proj(y)
            x = x + layer.mlp(layer.mlp_norm(x))
        return m.norm(x), torch.stack(new_k), torch.stack(new_v)
