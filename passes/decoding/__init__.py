"""Draft-and-verify decoding: draft sources, chain and tree verification, cache bookkeeping.

A decoding step drafts k tokens per sequence, runs one compiled verify program on the
[B, k + 1] chain (the pending token and the drafts) against a static KV cache, and keeps the
longest drafted prefix that matches the model's argmax plus the model's next token (the bonus
token), so greedy output is exactly plain greedy's. Medusa drafts a token tree instead: one
program scores all W nodes under a tree attention mask, and the longest accepted root-to-leaf
path is kept. May import torch only: the compiled programs and the loops that call these
pieces are runtime/generate.py's and runtime/tree_generate.py's, the cached step module
models/kv_decoder.py, the Medusa heads models/medusa.py.

  drafts.py   DraftSource (the interface), PromptLookup (n-gram match in the context) and
              Jacobi (the previous step's own guesses for the positions after the accepted ones)
  verify.py   verify_chain (exact argmax match, longest prefix + bonus), ChainState (per-sequence
              cached lengths: rollback is not advancing them; compaction is a no-op on a chain)
  tree.py     tree specs (Medusa's paths of top-k choices), TokenTree (mask, depths, retrieve
              indices, candidates), verify_tree (exact or typical), compact_kv
  medusa.py   Medusa: the draft source whose heads' top-k fill the tree
  speculative.py  sampling_probs (method="sample"'s p), speculative_accept (min(1, p/q), residual)
  sjd.py      SpeculativeJacobi: sampled Jacobi guesses with their q; lossless sampling
"""

from __future__ import annotations

from .drafts import DRAFT_SOURCES, DraftSource, Jacobi, PromptLookup, make_draft_source
from .medusa import Medusa
from .sjd import SpeculativeJacobi
from .speculative import sampling_probs, speculative_accept
from .tree import (
    ACCEPTANCE,
    TokenTree,
    TreeSpecError,
    build_tree,
    compact_kv,
    default_tree,
    parse_tree_spec,
    verify_tree,
)
from .verify import ChainState, verify_chain

DRAFT_SOURCES["medusa"] = Medusa  # registered here: medusa.py builds on drafts.py
DRAFT_SOURCES["sjd"] = SpeculativeJacobi  # as medusa; it verifies by speculative sampling

__all__ = [
    "ACCEPTANCE",
    "DRAFT_SOURCES",
    "ChainState",
    "DraftSource",
    "Jacobi",
    "Medusa",
    "PromptLookup",
    "SpeculativeJacobi",
    "TokenTree",
    "TreeSpecError",
    "build_tree",
    "compact_kv",
    "default_tree",
    "make_draft_source",
    "parse_tree_spec",
    "sampling_probs",
    "speculative_accept",
    "verify_chain",
    "verify_tree",
]
