"""Medusa as a draft source: trained heads propose a token tree instead of a chain.

The heads (models/medusa.py) run inside the compiled verify program on every tree node; after
a step, `observe_heads` keeps the head logits at each sequence's last accepted node (the node
whose argmax is the new pending token), and the next `propose` fills the tree from their top-k:
node (c_1, ..., c_d) gets head (d - 1)'s top-c_d token. The tree's verification and the cache
compaction are tree.py's; the loop is runtime/tree_generate.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .drafts import DraftSource
from .tree import TokenTree, build_tree, default_tree


class Medusa(DraftSource):
    """Tree drafts from Medusa heads. `heads` is a module with num_heads, hidden_size and
    vocab_size (models/medusa.py MedusaHeads); `tree` a spec (tree.py; default: default_tree)."""

    name = "medusa"
    needs_heads = True

    def __init__(self, heads=None, tree: Sequence[Sequence[int]] | None = None) -> None:
        if heads is None:
            raise ValueError("method='medusa' needs trained Medusa heads: pass medusa_heads= a "
                             "file written by `meshweave train-heads --out FILE` or a "
                             "MedusaHeads module")
        self.heads = heads
        spec = tree if tree is not None else default_tree(heads.num_heads)
        self.tree: TokenTree = build_tree(spec, num_heads=heads.num_heads)
        if self.tree.top_k > heads.vocab_size:
            raise ValueError(f"tree spec: choice {self.tree.top_k - 1} needs the top-"
                             f"{self.tree.top_k} tokens of a vocabulary of {heads.vocab_size}")
        self._topk: torch.Tensor | None = None

    def reset(self) -> None:
        self._topk = None

    def observe_heads(self, head_logits: torch.Tensor) -> None:
        """head_logits [B, heads, vocab] at each sequence's last accepted node."""
        self._topk = head_logits.topk(self.tree.top_k, dim=-1).indices

    def candidates(self, pending: torch.Tensor) -> torch.Tensor:
        """[B, W] tree tokens: the pending tokens [B] at the root, the heads' top-k below."""
        if self._topk is None or self._topk.shape[0] != pending.shape[0]:
            raise RuntimeError("Medusa.candidates: no head logits observed for this batch "
                               "(the prefill's observe_heads comes first)")
        return self.tree.candidates(pending, self._topk)

    def propose(self, contexts: list[list[int]], k: int) -> torch.Tensor:
        """The interface's view: [B, W - 1], the tree's non-root tokens in node order (k is the
        tree's size here, not a chain length)."""
        pending = torch.tensor([c[-1] for c in contexts], dtype=torch.int64)
        return self.candidates(pending)[:, 1:]
