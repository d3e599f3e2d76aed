"""Mixture-of-experts decoder with dense (static-shape) top-k dispatch.

Each block is Llama-style attention (RoPE, GQA, RMSNorm) followed by an MoE
feed-forward layer:

* a softmax router picks the top-k experts per token and renormalises their
  probabilities; the choice is turned into dense combine weights
  ``[tokens, experts]`` (zero for unselected experts) by comparing the top-k
  indices with ``arange(E)``, so no shape depends on routing decisions;
* every expert runs on every token as one batched matmul over stacked expert
  weights (``experts.w_in`` / ``experts.w_gate`` [E, d, f], ``experts.w_out``
  [E, f, d]); the leading expert dim is what an expert-parallel pass shards;
* optionally a shared dense expert is mixed in, as in DeepSpeed's PR-MoE
  "residual MoE" (``shared_gate="softmax"``): ``out = moe(x) * c0 + mlp(x) * c1`` with
  ``c = softmax(Linear(d, 2)(x))``; or as in Qwen2-MoE (``shared_gate="sigmoid"``):
  ``out = moe(x) + sigmoid(Linear(d, 1, bias=False)(x)) * mlp(x)``.

The zoo also holds meta-device configs of two published MoE models for the planner:
``mixtral-8x7b`` (46.7B parameters) and ``qwen2-moe-57b`` (Qwen2-57B-A14B's shapes, 57.4B;
its attention here has no q/k/v biases, 0.13M parameters fewer than the original).

Dense dispatch wastes FLOPs (E/k times) but keeps the graph free of
data-dependent shapes, which is what the exporter and planner need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, SwiGLU, init_normal_, rope_cos_sin
from .llama import GQAttention, RotaryDecoder, decoder_inputs
from .registry import register_model


SHARED_GATES = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """Hyper-parameters of the MoE decoder."""

    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 4
    top_k: int = 2
    expert_ffn_size: int = 128
    expert_activation: str = "swiglu"  # "swiglu" or "gelu"
    shared_expert: bool = True  # PR-MoE residual expert
    shared_ffn_size: int = 128
    shared_gate: str = "softmax"  # "softmax" (PR-MoE coefficients) or "sigmoid" (Qwen2-MoE)
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # > 0: forward returns (logits, coef x the load-balancing loss summed over layers), as HF's
    # MoE models do with output_router_logits (Switch Transformer's auxiliary loss)
    router_aux_loss_coef: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.expert_activation not in ("swiglu", "gelu"):
            raise ValueError(f"unknown expert_activation {self.expert_activation!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("need 1 <= top_k <= num_experts")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"MoEConfig: router_aux_loss_coef must be >= 0 (0 turns the "
                             f"load-balancing loss off), got {self.router_aux_loss_coef!r}")
        if self.shared_gate not in SHARED_GATES:
            raise ValueError(f"MoEConfig: unknown shared_gate {self.shared_gate!r}; expected "
                             f"one of {SHARED_GATES}")


class TopKRouter(nn.Module):
    """Softmax router returning dense combine weights [T, E] with k non-zeros per row."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """Combine weights [T, E]; with_aux: (them, the load-balancing loss of this routing)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [T, k]
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        expert_ids = torch.arange(self.num_experts, device=x.device)
        one_hot = (top_i[..., None] == expert_ids).to(top_p.dtype)  # [T, k, E]
        combine = (one_hot * top_p[..., None]).sum(dim=1).to(x.dtype)  # [T, E]
        return (combine, load_balancing_loss(probs, one_hot)) if with_aux else combine


def load_balancing_loss(probs: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_e f_e * P_e: f_e the fraction of the
    routing slots that chose expert e (no gradient), P_e its mean router probability. 1 when
    routing is uniform, up to E when every token goes to one expert."""
    e = probs.shape[-1]
    f = one_hot.sum(dim=(0, 1)) / (one_hot.shape[0] * one_hot.shape[1])
    return e * (f.detach() * probs.mean(dim=0)).sum()


class StackedExperts(nn.Module):
    """E expert MLPs stored as stacked weights; every expert processes every token."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden))
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def reset_parameters(self, std: float) -> None:
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """``x`` [T, d], ``combine`` [T, E] -> weighted sum of expert outputs [T, d]."""
        xe = x.unsqueeze(0).expand(self.w_in.shape[0], -1, -1)  # [E, T, d]
        h = torch.bmm(xe, self.w_in)  # [E, T, f]
        if self.activation == "swiglu":
            h = F.silu(torch.bmm(xe, self.w_gate)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        y = torch.bmm(h, self.w_out)  # [E, T, d]
        return (combine.t().unsqueeze(-1) * y).sum(dim=0)


class MoEFeedForward(nn.Module):
    """Router + stacked experts, with an optional PR-MoE shared (residual) expert."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = TopKRouter(cfg.hidden_size, cfg.num_experts, cfg.top_k)
        self.experts = StackedExperts(
            cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size, cfg.expert_activation
        )
        self.shared_gate = cfg.shared_gate
        self.shared_expert = None
        if cfg.shared_expert:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_ffn_size)
            if cfg.shared_gate == "softmax":
                self.coefficient = nn.Linear(cfg.hidden_size, 2)
            else:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        return self._mix(tokens, self.router(tokens)).reshape(b, s, d)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        combine, aux = self.router(tokens, with_aux=True)
        return self._mix(tokens, combine).reshape(b, s, d), aux

    def _mix(self, tokens: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        out = self.experts(tokens, combine)
        if self.shared_expert is not None and self.shared_gate == "softmax":
            coef = F.softmax(self.coefficient(tokens), dim=-1)
            out = out * coef[:, 0:1] + self.shared_expert(tokens) * coef[:, 1:2]
        elif self.shared_expert is not None:  # Qwen2-MoE's sigmoid gate
            gate = torch.sigmoid(self.shared_expert_gate(tokens))
            out = out + gate * self.shared_expert(tokens)
        return out


class MoEBlock(nn.Module):
    """Pre-norm block: GQA attention then MoE feed-forward."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = GQAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoEFeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.moe(self.moe_norm(x))

    def forward_with_aux(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, aux = self.moe.forward_with_aux(self.moe_norm(x))
        return x + y, aux


class MoEDecoder(RotaryDecoder):
    """MoE LM: Llama's skeleton with MoE feed-forward blocks."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg, MoEBlock)
        for module in self.modules():
            init_normal_(module, cfg.init_std)
            if isinstance(module, StackedExperts):
                module.reset_parameters(cfg.init_std)

    def forward(self, input_ids: torch.Tensor):
        """Logits; with config.router_aux_loss_coef > 0, (logits, the weighted load-balancing
        loss summed over layers), which training adds to its loss."""
        coef = self.config.router_aux_loss_coef
        if not coef:
            return super().forward(input_ids)
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device, x.dtype
        )
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, a = layer.forward_with_aux(x, cos, sin)
            aux = aux + a
        return self.lm_head(self.norm(x)), coef * aux


register_model(
    "moe-tiny",
    MoEConfig,
    MoEDecoder,
    decoder_inputs,
    "MoE decoder for tests: 2 layers, hidden 64, 4 SwiGLU experts top-2, shared PR-MoE expert",
    family="moe",
)
register_model(
    "mixtral-8x7b",
    lambda: MoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        num_experts=8,
        top_k=2,
        expert_ffn_size=14336,
        shared_expert=False,
        max_seq_len=32768,
        rope_theta=1e6,
    ),
    MoEDecoder,
    decoder_inputs,
    "Mixtral-8x7B (46.7B): 32 layers, hidden 4096, 32 heads / 8 KV heads, 8 SwiGLU experts "
    "top-2 of ffn 14336, vocab 32000; for planning on the meta device",
    family="moe",
)
register_model(
    "qwen2-moe-57b",
    lambda: MoEConfig(
        vocab_size=151936,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        num_experts=64,
        top_k=8,
        expert_ffn_size=2560,
        shared_expert=True,
        shared_ffn_size=20480,
        shared_gate="sigmoid",
        max_seq_len=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    MoEDecoder,
    decoder_inputs,
    "Qwen2-57B-A14B-class MoE (57.4B): 28 layers, hidden 3584, 28 heads / 4 KV heads, 64 "
    "experts top-8 of ffn 2560, sigmoid-gated shared expert of ffn 20480, vocab 151936",
    family="moe",
)
