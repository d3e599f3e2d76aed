"""The served models, their checkpoint, and the expert-parallel copy of a MoEDecoder a rank runs.

    cfg = moe_config("moe-tiny")           # or "moe-large": seconds to load, not a test model
    model = reference_model(cfg, seed)     # the single-device eager reference
    save_checkpoint(model, path)           # one torch.save file of the state dict
    model, state = ep_model(cfg, path, rank, owner, pg)   # dense weights + this rank's experts

A rank's model is models/moe.py's MoEDecoder built on the meta device, its dense weights
(attention, norms, router, shared expert, embeddings, head) assigned from the checkpoint opened
with mmap (so the experts' pages of the file are never read), and each layer's StackedExperts
replaced by `EPExperts`, which holds only this rank's experts and dispatches through
exchange.ep_moe over the group in `state` (a `MeshState`, swapped whole at a re-scaling).
`ep_model(..., with_experts=False)` is what a joining rank uses: its experts arrive from their
old owners instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ....models.moe import MoEConfig, MoEDecoder
from ....models.registry import get_model_spec
from .exchange import ep_moe
from .placement import local_experts

EXPERT_PARAMS = ("w_in", "w_gate", "w_out")


def moe_config(name: str) -> MoEConfig:
    """moe-tiny from the zoo, or moe-large: the same decoder with 16 larger experts, 4 layers."""
    if name == "moe-tiny":
        return get_model_spec("moe-tiny").config
    if name == "moe-large":
        return MoEConfig(vocab_size=512, hidden_size=256, num_layers=4, num_heads=8,
                         num_kv_heads=4, num_experts=16, top_k=2, expert_ffn_size=2048,
                         shared_ffn_size=512, max_seq_len=64)
    raise ValueError(f"elastic MoE: unknown model {name!r}; expected 'moe-tiny' or 'moe-large'")


def reference_model(cfg: MoEConfig, seed: int = 0) -> MoEDecoder:
    torch.manual_seed(seed)
    return MoEDecoder(cfg).eval()


def save_checkpoint(model: nn.Module, path: str) -> None:
    torch.save(model.state_dict(), path)


def expert_key(layer: int, param: str) -> str:
    return f"layers.{layer}.moe.experts.{param}"


def is_expert_key(key: str) -> bool:
    return ".moe.experts." in key


@dataclasses.dataclass
class MeshState:
    """What the EP layers dispatch over: the group, the placement (owner per expert)."""

    pg: object
    owner: torch.Tensor
    timeout_s: float = 10.0


class EPExperts(nn.Module):
    """StackedExperts' drop-in: this rank's experts, dispatched with all-to-all."""

    def __init__(self, cfg: MoEConfig, holder) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.act = "silu" if cfg.expert_activation == "swiglu" else "gelu_tanh"
        self.holder = holder  # has .state: MeshState (the worker swaps it at a switch)
        self.local: dict[int, tuple] = {}

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        weights, ids = combine.topk(self.top_k, dim=-1)
        state = self.holder.state
        return ep_moe(x, weights, ids, state.owner, self.local, state.pg, act=self.act,
                      timeout_s=state.timeout_s)


class Holder:
    def __init__(self, state: MeshState | None = None):
        self.state = state


def open_checkpoint(path: str) -> dict:
    return torch.load(path, mmap=True, weights_only=True)


def expert_slices(ckpt: dict, cfg: MoEConfig, expert: int) -> list[tuple]:
    """(w_in, w_gate | None, w_out) of one expert in every layer, copied out of the file."""
    out = []
    for layer in range(cfg.num_layers):
        w = [ckpt[expert_key(layer, p)][expert].clone() if expert_key(layer, p) in ckpt else None
             for p in EXPERT_PARAMS]
        out.append(tuple(w))
    return out


class SkipInit(TorchFunctionMode):
    """Makes parameter initialisation a no-op while a model is built on the meta device: the
    weights are assigned from the checkpoint, and torch's meta normal_ imports torch._dynamo
    (seconds of a rank's start-up)."""

    FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_,
             torch.Tensor.fill_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS or getattr(func, "__module__", "") == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def ep_model(cfg: MoEConfig, path: str, rank: int, owner, holder: Holder,
             with_experts: bool = True) -> MoEDecoder:
    """This rank's model: dense weights from `path`, and its experts under `owner` when
    with_experts (a joining rank receives them instead)."""
    ckpt = open_checkpoint(path)
    with torch.device("meta"), SkipInit():
        model = MoEDecoder(cfg)
    for layer in model.layers:
        layer.moe.experts = EPExperts(cfg, holder)
    dense = {k: v.clone() for k, v in ckpt.items() if not is_expert_key(k)}
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"elastic MoE: checkpoint {path} does not match {cfg}: missing "
                         f"{missing}, unexpected {unexpected}")
    if with_experts:
        for e in local_experts(owner, rank):
            for layer, w in zip(model.layers, expert_slices(ckpt, cfg, e)):
                layer.moe.experts.local[e] = w
    return model.eval()


def ep_layers(model: MoEDecoder) -> list[EPExperts]:
    return [layer.moe.experts for layer in model.layers]
