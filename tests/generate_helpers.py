"""Shared by the generation tests (test_generate, test_medusa, test_quant_generate): the eager
greedy oracle and seeded random prompts."""

from __future__ import annotations

import torch


def eager_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """The oracle: no cache, the eager model on the full sequence at every step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t == eos:
                break
    return out


def random_prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
