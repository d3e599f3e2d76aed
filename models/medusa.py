"""Medusa-1 heads on a frozen rotary decoder, their compiled step, and self-distillation.

`MedusaHeads(hidden, vocab, num_heads)`: head k is a residual SiLU block (x + silu(W x), W
zero-initialised so an untrained block is the identity) and a linear map to the vocabulary,
initialised from the backbone's lm_head (Medusa's choice: an untrained head predicts what
lm_head does). Read on the backbone's final normed hidden state at position t, head k predicts
the token at t + k + 2 (lm_head itself predicts t + 1).

`MedusaStep(decoder, heads)` is what one compiled tree-verify program computes: the backbone's
logits and every head's logits at all W tree nodes, with the caches (models/kv_decoder.py).

`self_distill` trains heads on the model's own greedy generations (the targets are the
backbone's own next-next tokens): the backbone is frozen, so its hidden states are computed
once and the heads train on them alone, which takes seconds for llama-tiny on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kv_decoder import KVDecoder


class ResidualSiLU(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads: [..., hidden] -> [..., K, vocab]."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int = 3,
                 num_layers: int = 1, lm_head: nn.Linear | None = None) -> None:
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"MedusaHeads: num_heads={num_heads}, num_layers={num_layers}: "
                             f"expected >= 1 each")
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)
        self.num_heads, self.num_layers = int(num_heads), int(num_layers)
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            out = nn.Linear(hidden_size, vocab_size, bias=False)
            if lm_head is not None:
                out.weight.data.copy_(lm_head.weight.data)
            self.heads.append(nn.Sequential(*[ResidualSiLU(hidden_size) for _ in
                                              range(num_layers)], out))

    @classmethod
    def for_model(cls, model: nn.Module, num_heads: int = 3, num_layers: int = 1
                  ) -> MedusaHeads:
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers,
                   lm_head=model.lm_head).to(param.dtype).to(param.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(hidden) for h in self.heads], dim=-2)

    def config(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_heads": self.num_heads, "num_layers": self.num_layers}


def check_heads_fit(heads: MedusaHeads, model: nn.Module) -> None:
    """Raise ValueError where the heads' hidden or vocab size is not the model's."""
    cfg = model.config
    for what, have, want in (("hidden size", heads.hidden_size, cfg.hidden_size),
                             ("vocab size", heads.vocab_size, cfg.vocab_size)):
        if have != want:
            raise ValueError(f"medusa_heads: the heads' {what} is {have}, the model's is "
                             f"{want}: train heads for this model (meshweave train-heads)")


class MedusaStep(nn.Module):
    """(logits [B, S, V], head logits [B, S, K, V], k_cache', v_cache') of one cached step
    over S tokens, a tree when tree_mask [S, S] is given (models/kv_decoder.py)."""

    def __init__(self, decoder: KVDecoder, heads: MedusaHeads) -> None:
        super().__init__()
        self.decoder, self.heads = decoder, heads

    def forward(self, input_ids, positions, k_cache, v_cache, tree_mask):
        hidden, k, v = self.decoder.hidden_states(input_ids, positions, k_cache, v_cache,
                                                  tree_mask)
        return self.decoder.model.lm_head(hidden), self.heads(hidden), k, v


def save_heads(heads: MedusaHeads, path: str) -> str:
    """safetensors with the config in its metadata (torch.save where safetensors is missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    meta = {k: str(v) for k, v in heads.config().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save({"config": meta, "state": state}, path)
        return path
    save_file(state, path, metadata=meta)
    return path


def load_heads(path: str) -> MedusaHeads:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medusa_heads: no file {path!r} (write one with `meshweave "
                                f"train-heads --out {path}`)")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # not safetensors: the torch.save fallback format
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = blob["config"], blob["state"]
    missing = {"hidden_size", "vocab_size", "num_heads", "num_layers"} - set(meta)
    if missing:
        raise ValueError(f"medusa_heads: {path} has no {sorted(missing)} in its metadata: "
                         f"not a file written by meshweave train-heads")
    heads = MedusaHeads(**{k: int(meta[k]) for k in ("hidden_size", "vocab_size",
                                                     "num_heads", "num_layers")})
    heads.load_state_dict(state)
    return heads.eval()


def distill_pairs(decoder: KVDecoder, sequences: Sequence[Sequence[int]],
                  prompt_lens: Sequence[int], num_heads: int, chunk: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, hidden], targets [N, K]) from the frozen backbone: for each position t from
    the last prompt token on, the hidden state at t and the generated tokens at t + 2 .. t + K
    + 1 (-100 past the end: ignored by the loss). Sequences run `chunk` at a time, right-padded
    (causal attention: padding after a token does not change its hidden state)."""
    feats, targets = [], []
    param = next(decoder.parameters())
    for lo in range(0, len(sequences), chunk):
        group = [list(map(int, q)) for q in sequences[lo:lo + chunk]]
        n = max(map(len, group))
        ids = torch.zeros(len(group), n, dtype=torch.int64)
        for b, q in enumerate(group):
            ids[b, :len(q)] = torch.tensor(q, dtype=torch.int64)
        k, v = decoder.empty_cache(len(group), n, param.dtype, param.device)
        pos = torch.arange(n).expand(len(group), n).contiguous()
        with torch.no_grad():
            hidden, _, _ = decoder.hidden_states(ids.to(param.device), pos.to(param.device),
                                                 k, v)
        for b, (q, plen) in enumerate(zip(group, prompt_lens[lo:lo + chunk])):
            for t in range(plen - 1, len(q) - 2):
                feats.append(hidden[b, t])
                targets.append([q[t + j + 2] if t + j + 2 < len(q) else -100
                                for j in range(num_heads)])
    feats = torch.stack(feats)
    return feats, torch.tensor(targets, dtype=torch.int64, device=feats.device)


def self_distill(generate: Callable[[list[list[int]], int], list[list[int]]],
                 model: nn.Module, prompts: list[list[int]], *, num_heads: int = 3,
                 steps: int = 300, new_tokens: int = 32, lr: float = 1e-2,
                 heads: MedusaHeads | None = None) -> tuple[MedusaHeads, list[float]]:
    """Train Medusa heads (new ones, or `heads`) on `generate(prompts, new_tokens)`: the
    model's own greedy tokens, e.g. a CompiledModel's generate. Full-batch Adam on the frozen
    backbone's hidden states (deterministic: the heads start from zeros and lm_head). Returns
    (heads, per-step losses)."""
    heads = heads or MedusaHeads.for_model(model, num_heads)
    outs = generate(prompts, new_tokens)
    seqs = [p + o for p, o in zip(prompts, outs)]
    decoder = KVDecoder(model).eval()
    feats, targets = distill_pairs(decoder, seqs, [len(p) for p in prompts], heads.num_heads)
    heads.train()
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = heads(feats)  # [N, K, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return heads.eval(), losses
