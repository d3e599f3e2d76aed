"""Draft-and-verify decoding: draft sources, chain verification and the cache bookkeeping.

A decoding step drafts k tokens per sequence, runs one compiled verify program on the
[B, k + 1] chain (the pending token and the drafts) against a static KV cache, and keeps the
longest drafted prefix that matches the model's argmax plus the model's next token (the bonus
token), so greedy output is exactly plain greedy's. May import torch only: the compiled
programs and the loop that calls these pieces are runtime/generate.py's, the cached step
module models/kv_decoder.py.

  drafts.py   DraftSource (the interface), PromptLookup (n-gram match in the context) and
              Jacobi (the previous step's own guesses for the positions after the accepted ones)
  verify.py   verify_chain (exact argmax match, longest prefix + bonus), ChainState (per-sequence
              cached lengths: rollback is not advancing them; compaction is a no-op on a chain)
"""

from __future__ import annotations

from .drafts import DRAFT_SOURCES, DraftSource, Jacobi, PromptLookup, make_draft_source
from .verify import ChainState, verify_chain

__all__ = [
    "DRAFT_SOURCES",
    "ChainState",
    "DraftSource",
    "Jacobi",
    "PromptLookup",
    "make_draft_source",
    "verify_chain",
]
