"""Speculative sampling: the acceptance rule that keeps sampled output lossless.

A draft token x was drawn from a known distribution q; the target distribution at its position
is p. Accepting x with probability min(1, p(x) / q(x)) and, at the first rejection, drawing
from the residual norm(max(0, p - q)) emits a token distributed exactly as p (Leviathan et al.
2023, Chen et al. 2023); chaining it over drafts d_0 .. d_{k-1}, where d_i is drawn from q_i
given the history and d_0 .. d_{i-1}, emits tokens distributed as plain sampling's, one by
one. The rule is only as exact as q is: q must be the very distribution the draft was drawn
from (a deterministic draft has a one-hot q). `sampling_probs` is the target distribution,
the one method="sample" draws from, so both methods sample the same p. Pure torch.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits [..., V] / temperature) cut to the top_p nucleus (the fewest most likely
    tokens whose probability reaches top_p), not renormalised (torch.multinomial need not)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def _normalise(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)


def speculative_accept(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [B] int64, tokens [B, k + 1] int64) for drafts [B, k] drawn from q [B, k, V]
    against the target p [B, k + 1, V] (p[:, i] the distribution of the token that d_i
    proposes, p[:, k] the one after the last draft). Rows of q and p need not sum to 1.

    tokens[b, :accepted[b]] are the accepted drafts and tokens[b, accepted[b]] the token drawn
    at the first rejection from norm(max(0, p - q)), or after k acceptances from p[:, k] (the
    bonus token); sequence b emits tokens[b, :accepted[b] + 1]. Entries past that repeat the
    last emitted token."""
    if draft.dim() != 2 or q.dim() != 3 or p.dim() != 3:
        raise ValueError(f"speculative_accept: expected draft [B, k], q [B, k, V] and "
                         f"p [B, k + 1, V], got {tuple(draft.shape)}, {tuple(q.shape)} and "
                         f"{tuple(p.shape)}")
    batch, k = draft.shape
    if tuple(q.shape[:2]) != (batch, k) or tuple(p.shape[:2]) != (batch, k + 1) \
            or q.shape[2] != p.shape[2]:
        raise ValueError(f"speculative_accept: expected draft [B, k], q [B, k, V] and "
                         f"p [B, k + 1, V], got {tuple(draft.shape)}, {tuple(q.shape)} and "
                         f"{tuple(p.shape)}")
    p = _normalise(p.float())
    q = _normalise(q.float())
    q_draft = q.gather(-1, draft[..., None])[..., 0]
    if bool((q_draft <= 0).any()):
        b, i = (q_draft <= 0).nonzero()[0].tolist()
        raise ValueError(f"speculative_accept: draft token {int(draft[b, i])} (sequence {b}, "
                         f"position {i}) has probability 0 under q: q must be the "
                         f"distribution the draft was drawn from")
    ratio = p[:, :k].gather(-1, draft[..., None])[..., 0] / q_draft
    u = torch.rand(batch, k, generator=generator)
    accepted = (u < ratio).to(torch.int64).cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch)
    p_last = p[rows, accepted]
    # after k acceptances there is no draft to correct: q is zero and the residual is p itself
    q_last = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]
    residual = (p_last - q_last).clamp_min(0.0)
    # p == q up to rounding leaves no residual; a rejection there has probability ~0, draw p
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_last, residual)
    last = torch.multinomial(residual, 1, generator=generator)[:, 0]
    tokens = torch.cat([draft, draft[:, -1:]], dim=1)
    tokens[rows, accepted] = last
    pos = torch.arange(k + 1)[None, :]
    tokens = torch.where(pos > accepted[:, None], last[:, None], tokens)
    return accepted, tokens
