"""Draft sources: where the k tokens that one verify step checks come from.

Every source answers `propose(contexts, k)` with a [B, k] int64 tensor: contexts[b] is
sequence b's whole text so far (prompt, accepted tokens, and last the pending token that the
verify step feeds first). A source that learns from verification (Jacobi) reads each step's
outcome through `observe`. Drafts only change how many tokens a step accepts, never which:
verification keeps exactly the greedy tokens whatever is proposed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class DraftSource(ABC):
    """The interface of a draft source (training-free ones here; trained heads would be one)."""

    name: str = "draft"

    @abstractmethod
    def propose(self, contexts: list[list[int]], k: int) -> torch.Tensor:
        """[len(contexts), k] int64 drafted tokens following each context."""

    def observe(self, argmax: torch.Tensor, accepted: torch.Tensor) -> None:  # noqa: B027
        """After a verify step: the model's argmax [B, k + 1] at the chain's positions and the
        number of drafts accepted per sequence [B]. Stateless sources ignore it."""

    def reset(self) -> None:  # noqa: B027
        """Forget state from an earlier generate call."""


def _pad(tokens: list[int], k: int, filler: int) -> list[int]:
    return (tokens + [filler] * k)[:k]


class PromptLookup(DraftSource):
    """Prompt-lookup decoding: find the context's last `n` tokens earlier in the context (n
    from max_ngram down to min_ngram, the most recent match first) and draft the k tokens that
    followed them there. Training-free; it pays off where the output repeats the context (code
    edits, summaries, retrieval answers, loops)."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"PromptLookup: need 1 <= min_ngram <= max_ngram, got "
                             f"min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, context: list[int], k: int) -> list[int]:
        """The continuation (up to k tokens) of the most recent earlier match; [] if none."""
        size = len(context)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            tail = context[size - n:]
            for start in range(size - n - 1, -1, -1):  # earlier windows, the most recent first
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []

    def propose(self, contexts: list[list[int]], k: int) -> torch.Tensor:
        rows = [_pad(self.lookup(c, k), k, c[-1]) for c in contexts]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(contexts), k)


class Jacobi(DraftSource):
    """Jacobi decoding as a draft source: a verify step's argmax after the first rejected
    draft is the model's guess for the positions that follow (conditioned on wrong drafts,
    hence a guess), so the next step drafts it; Jacobi iteration's fixed point is the greedy
    sequence. Where no guess is left (the first step, or all accepted), prompt lookup fills."""

    name = "jacobi"

    def __init__(self, fallback: DraftSource | None = None) -> None:
        self.fallback = fallback or PromptLookup()
        self._guess: list[list[int]] | None = None

    def reset(self) -> None:
        self._guess = None

    def observe(self, argmax: torch.Tensor, accepted: torch.Tensor) -> None:
        rows = argmax.tolist()
        # argmax[b, n] is the new pending token; argmax[b, n + 1:] the guesses after it.
        self._guess = [row[int(n) + 1:] for row, n in zip(rows, accepted.tolist())]

    def propose(self, contexts: list[list[int]], k: int) -> torch.Tensor:
        guess = self._guess if self._guess is not None and len(self._guess) == len(contexts) \
            else [[] for _ in contexts]
        rows = []
        for ctx, g in zip(contexts, guess):
            if len(g) < k:
                g = g + self.fallback.propose([ctx + g], k - len(g))[0].tolist() if g \
                    else self.fallback.propose([ctx], k)[0].tolist()
            rows.append(g[:k])
        return torch.tensor(rows, dtype=torch.int64).reshape(len(contexts), k)


DRAFT_SOURCES = {"prompt_lookup": PromptLookup, "jacobi": Jacobi}


def make_draft_source(method: str, **kwargs) -> DraftSource:
    if method not in DRAFT_SOURCES:
        raise ValueError(f"unknown draft method {method!r}; choose from {sorted(DRAFT_SOURCES)}")
    return DRAFT_SOURCES[method](**kwargs)
