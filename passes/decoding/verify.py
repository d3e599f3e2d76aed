"""Chain verification by exact argmax match, and the per-sequence cache lengths it moves.

The verify program sees the chain [pending, d_0, ..., d_{k-1}] at positions L .. L + k of a
sequence whose first L tokens are cached. Its argmax g_i is the greedy token after chain
token i. Drafts d_0 .. d_{n-1} are accepted while d_i == g_i; the step emits g_0 .. g_n (the
accepted drafts and one bonus token, g_n), n + 1 tokens that plain greedy would have produced
one by one. The cache then holds valid K/V for pending and d_0 .. d_{n-1}: L advances by n + 1
and g_n becomes the pending token. Slots past that hold rejected drafts; they are rewritten
before any query can see them (models/kv_decoder.py), so rollback is only not advancing L and a
chain needs no compaction (a tree would: its accepted path is not contiguous in the slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def verify_chain(draft: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [B] int64, argmax [B, k + 1]): drafts [B, k] against the verify program's
    logits [B, k + 1, vocab]. The tokens emitted for sequence b are argmax[b, :accepted[b] + 1]."""
    if draft.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != (draft.shape[0],
                                                                      draft.shape[1] + 1):
        raise ValueError(f"verify_chain: expected drafts [B, k] and logits [B, k + 1, vocab], "
                         f"got {tuple(draft.shape)} and {tuple(logits.shape)}")
    argmax = logits.argmax(dim=-1)
    match = (draft == argmax[:, :-1]).to(torch.int64)
    accepted = match.cumprod(dim=1).sum(dim=1)  # length of the all-matching prefix
    return accepted, argmax


@dataclass
class ChainState:
    """Per-sequence decoding state over a static cache of `capacity` slots.

    cached[b]: tokens of sequence b whose K/V is in the cache (its next write slot);
    pending[b]: the last emitted token, fed first by the next step; done[b]: stopped;
    emitted[b]: the generated tokens so far."""

    cached: list[int]
    pending: list[int]
    capacity: int
    done: list[bool] = field(default_factory=list)
    emitted: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.cached)
        self.done = self.done or [False] * n
        self.emitted = self.emitted or [[] for _ in range(n)]

    @property
    def batch(self) -> int:
        return len(self.cached)

    def positions(self, width: int) -> torch.Tensor:
        """[B, width] positions of the next chain. A stopped sequence stays where it is (its
        rows still run in the static-shape program; their outputs are dropped)."""
        start = torch.tensor(self.cached, dtype=torch.int64)[:, None]
        pos = start + torch.arange(width, dtype=torch.int64)[None, :]
        if int(pos.max()) >= self.capacity:
            raise ValueError(f"ChainState: positions up to {int(pos.max())} do not fit the "
                             f"cache of {self.capacity} slots")
        return pos

    def emit(self, b: int, tokens: list[int], limit: int, eos: int | None) -> int:
        """Append sequence b's verified tokens, cut at `limit` new tokens in all and after an
        eos; advance its cache length by the tokens kept (the rest are rolled back). Returns the
        number kept."""
        room = limit - len(self.emitted[b])
        kept = tokens[:room]
        if eos is not None and eos in kept:
            kept = kept[:kept.index(eos) + 1]
        self.emitted[b] += kept
        self.cached[b] += len(kept)
        self.pending[b] = kept[-1] if kept else self.pending[b]
        if len(self.emitted[b]) >= limit or (eos is not None and kept and kept[-1] == eos):
            self.done[b] = True
        return len(kept)
