"""Speculative Jacobi decoding (SJD; Teng et al. 2024): Jacobi drafts with sampling kept.

Each verify step gives the target distribution p_j at every chain position j (the pending
token, then the drafts). After the step has accepted n drafts and emitted n + 1 tokens, the
positions after them, chain positions n + 1 .. k, were conditioned on a rejected draft: SJD
samples each one from its p_j (Jacobi iteration with sampling in place of argmax) and drafts
those tokens next step with q = p_j, the exact distribution each was drawn from. Acceptance is
speculative sampling's (speculative.py), so output is distributed as plain sampling's.

Positions that no iteration has sampled yet (the first step, and the n slots a step frees at
the end of the window) start from `init`:
  "lookup"  (the default) prompt lookup's continuation: deterministic given the context and
            the earlier drafts, so q is one-hot at the drafted token; accepting it with
            probability p(x) and drawing a rejection from p with x removed is exact;
  "uniform" the paper's random initialisation: a token drawn uniformly, q = 1 / V.
The draft source owns verification (`verify`), which it needs for p; the Generator feeds the
chain's logits to it in place of verify_chain's argmax match.
"""

from __future__ import annotations

import torch

from .drafts import DraftSource, PromptLookup
from .speculative import sampling_probs, speculative_accept

INITS = ("lookup", "uniform")


class SpeculativeJacobi(DraftSource):
    """SJD drafts and their draft distributions. vocab_size: V of the model's logits;
    temperature / top_p: the target distribution (as method="sample"); generator: the torch
    RNG that draws guesses, uniform inits and acceptances (seeded: reproducible)."""

    name = "sjd"

    def __init__(self, vocab_size: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, init: str = "lookup",
                 fallback: DraftSource | None = None) -> None:
        if init not in INITS:
            raise ValueError(f"SpeculativeJacobi: init={init!r}; choose from {INITS}")
        if not (temperature > 0 and temperature < float("inf")):
            raise ValueError(f"SpeculativeJacobi: temperature={temperature!r}: expected > 0")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"SpeculativeJacobi: top_p={top_p!r}: expected 0 < top_p <= 1")
        self.vocab_size, self.temperature, self.top_p = int(vocab_size), temperature, top_p
        self.generator, self.init = generator, init
        self.fallback = fallback or PromptLookup()
        self.reset()

    def reset(self) -> None:
        self._guess: list[list[int]] | None = None  # sampled guesses per sequence
        self._guess_q: list[torch.Tensor] = []  # [len(guess), V] what each guess was drawn from
        self._q: torch.Tensor | None = None  # [B, k, V] of the last proposal
        self._p: torch.Tensor | None = None  # [B, k + 1, V] of the last verify step

    def _fill(self, ctx: list[int], n: int) -> tuple[list[int], torch.Tensor]:
        """n fresh drafts after ctx and the one-hot or uniform q they were drawn from."""
        if self.init == "uniform":
            tokens = torch.randint(self.vocab_size, (n,), generator=self.generator)
            return tokens.tolist(), torch.full((n, self.vocab_size), 1.0 / self.vocab_size)
        tokens = self.fallback.propose([ctx], n)[0]
        return tokens.tolist(), torch.nn.functional.one_hot(tokens, self.vocab_size).float()

    def propose(self, contexts: list[list[int]], k: int) -> torch.Tensor:
        have = self._guess is not None and len(self._guess) == len(contexts)
        rows, qs = [], []
        for b, ctx in enumerate(contexts):
            g = self._guess[b][:k] if have else []
            gq = self._guess_q[b][:k] if have else torch.zeros(0, self.vocab_size)
            if len(g) < k:
                extra, extra_q = self._fill(ctx + g, k - len(g))
                g, gq = g + extra, torch.cat([gq, extra_q])
            rows.append(g)
            qs.append(gq)
        self._q = torch.stack(qs)
        return torch.tensor(rows, dtype=torch.int64).reshape(len(contexts), k)

    def verify(self, draft: torch.Tensor, logits: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted [B], tokens [B, k + 1]) as verify_chain's, by speculative sampling of the
        drafts this source proposed last against the chain's logits [B, k + 1, V]."""
        if self._q is None or tuple(self._q.shape[:2]) != tuple(draft.shape):
            raise ValueError(f"SpeculativeJacobi.verify: drafts {tuple(draft.shape)} are not "
                             f"the last proposal of this source: call propose first")
        self._p = sampling_probs(logits, self.temperature, self.top_p)
        return speculative_accept(draft, self._q, self._p, self.generator)

    def observe(self, argmax: torch.Tensor, accepted: torch.Tensor) -> None:
        """Sample the Jacobi guesses for the positions after the emitted tokens."""
        p = self._p
        if p is None:
            return
        batch, width, vocab = p.shape
        drawn = torch.multinomial(p.reshape(-1, vocab), 1, generator=self.generator)
        drawn = drawn.reshape(batch, width)
        self._guess, self._guess_q = [], []
        for b, n in enumerate(accepted.tolist()):
            self._guess.append(drawn[b, n + 1:].tolist())
            self._guess_q.append(p[b, n + 1:])
        self._p = None
