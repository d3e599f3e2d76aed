"""Compiled KV-cache generation (runtime/generate.py) and draft-and-verify decoding
(passes/decoding/) against a plain eager greedy loop that recomputes the whole sequence.

Reproduce one case: .venv/bin/pytest -q tests/test_generate.py -k NAME
"""

from __future__ import annotations

import pytest
import torch

import meshweave
from meshweave.models import build_model
from meshweave.passes.decoding import ChainState, Jacobi, PromptLookup, verify_chain
from meshweave.runtime.generate import GenerationError

from generate_helpers import eager_greedy, random_prompts

REPRO = "reproduce: .venv/bin/pytest -q tests/test_generate.py -k {}"


@pytest.fixture(scope="module")
def tiny():
    model, (ids,) = build_model("llama-tiny", batch=1, seq=8)
    with torch.no_grad():
        cm = meshweave.compile(model, (ids,))
    return model, cm


def test_greedy_batch1_equals_eager_greedy(tiny):
    model, cm = tiny
    prompt = random_prompts([7], seed=1)[0]
    out = cm.generate(torch.tensor([prompt]), 20, method="greedy")
    assert out.tokens[0] == eager_greedy(model, prompt, 20), REPRO.format("batch1")
    assert out.steps == 19 and out.accepted_per_step == 1.0
    assert tuple(out.sequences.shape) == (1, 20)


@pytest.mark.parametrize("method", ["greedy", "prompt_lookup", "jacobi"])
def test_batch4_mixed_lengths_equals_eager_greedy(tiny, method):
    model, cm = tiny
    prompts = random_prompts([3, 9, 14, 20], seed=2)
    out = cm.generate(prompts, 24, method=method)
    for b, p in enumerate(prompts):
        assert out.tokens[b] == eager_greedy(model, p, 24), (
            f"{method}, sequence {b} (prompt length {len(p)}); " + REPRO.format(method))


def test_left_padded_tensor_with_attention_mask(tiny):
    model, cm = tiny
    prompts = random_prompts([4, 10], seed=3)
    ids = torch.zeros(2, 10, dtype=torch.int64)
    mask = torch.zeros(2, 10, dtype=torch.int64)
    ids[0, 6:], mask[0, 6:] = torch.tensor(prompts[0]), 1
    ids[1], mask[1] = torch.tensor(prompts[1]), 1
    out = cm.generate(ids, 10, attention_mask=mask)
    assert out.tokens == [eager_greedy(model, p, 10) for p in prompts]


def test_per_sequence_eos_stop(tiny):
    model, cm = tiny
    prompts = random_prompts([5, 12], seed=4)
    ref = eager_greedy(model, prompts[0], 16)
    eos = ref[3]  # sequence 0 stops at its 4th token (or earlier, where it occurs first)
    for method in ("greedy", "prompt_lookup"):
        out = cm.generate(prompts, 16, method=method, eos_token_id=eos, pad_token_id=-1)
        for b, p in enumerate(prompts):
            expect = eager_greedy(model, p, 16, eos=eos)
            assert out.tokens[b] == expect, f"{method} sequence {b}; " + REPRO.format("eos")
        assert out.tokens[0][-1] == eos and len(out.tokens[0]) <= 4
        width = out.sequences.shape[1]
        assert (out.sequences[0, len(out.tokens[0]):] == -1).all() and width == max(
            len(t) for t in out.tokens)


def test_prompt_lookup_accepts_more_than_one_token_per_step_on_repetitive_output(tiny):
    """A prompt that repeats itself: random llama-tiny falls into a loop that copies it, so
    the n-gram drafts match and a verify step keeps several tokens; still exactly greedy."""
    model, cm = tiny
    prompt = [5, 17, 33, 2, 91] * 4
    greedy = cm.generate([prompt], 32, method="greedy")
    lookup = cm.generate([prompt], 32, method="prompt_lookup", num_draft=4)
    assert lookup.tokens == greedy.tokens == [eager_greedy(model, prompt, 32)]
    assert lookup.accepted_per_step > 1.5, lookup.per_step
    assert lookup.steps < greedy.steps


def test_sampling_is_reproducible_and_differs_from_greedy(tiny):
    _, cm = tiny
    prompts = random_prompts([6, 6], seed=5)
    a = cm.generate(prompts, 24, method="sample", temperature=1.0, seed=7)
    b = cm.generate(prompts, 24, method="sample", temperature=1.0, seed=7)
    c = cm.generate(prompts, 24, method="sample", temperature=1.0, seed=8)
    g = cm.generate(prompts, 24, method="greedy")
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens and a.tokens != g.tokens
    # a vanishing temperature and a tiny nucleus are greedy again
    cold = cm.generate(prompts, 24, method="sample", temperature=1e-4, seed=7)
    nucleus = cm.generate(prompts, 24, method="sample", top_p=1e-6, seed=7)
    assert cold.tokens == g.tokens == nucleus.tokens


def test_bad_inputs_say_what_and_expected(tiny):
    _, cm = tiny
    prompt = [1, 2, 3]
    cases = [
        (dict(input_ids=[list(range(65))], max_new_tokens=1), "longer than the cache of 64"),
        (dict(input_ids=[prompt], max_new_tokens=62), "lower max_new_tokens to 61"),
        (dict(input_ids=[prompt], max_new_tokens=0), "expected a positive int"),
        (dict(input_ids=[prompt], max_new_tokens=-3), "expected a positive int"),
        (dict(input_ids=[prompt], max_new_tokens=4, method="beam"), "unknown method 'beam'"),
        (dict(input_ids=[prompt], max_new_tokens=4, method="sample", temperature=0.0),
         "expected > 0"),
        (dict(input_ids=[prompt], max_new_tokens=4, top_p=1.5), "0 < top_p <= 1"),
        (dict(input_ids=[[1, 500]], max_new_tokens=4), "outside the vocabulary [0, 128)"),
        (dict(input_ids=[[]], max_new_tokens=4), "prompt 0 is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GenerationError, match=None) as err:
            cm.generate(**kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    with pytest.raises(GenerationError, match="beyond the cache's capacity of 2"):
        cm.generate([prompt] * 3, 4, max_batch=2)


def test_verify_chain_longest_prefix_plus_bonus():
    vocab = 10
    argmax = torch.tensor([[3, 4, 5, 6], [1, 2, 3, 4], [7, 7, 7, 7]])
    logits = torch.nn.functional.one_hot(argmax, vocab).float()
    draft = torch.tensor([[3, 4, 9], [0, 2, 3], [7, 7, 7]])
    accepted, got = verify_chain(draft, logits)
    assert accepted.tolist() == [2, 0, 3]  # a later match after a miss does not count
    assert got.tolist() == argmax.tolist()
    with pytest.raises(ValueError, match=r"expected drafts \[B, k\]"):
        verify_chain(draft, logits[:, :3])


def test_chain_state_rolls_back_rejected_drafts():
    state = ChainState([5, 8], [11, 12], capacity=20)
    assert state.positions(3).tolist() == [[5, 6, 7], [8, 9, 10]]
    assert state.emit(0, [1, 2, 3], limit=10, eos=None) == 3  # 2 drafts + bonus
    assert state.emit(1, [4], limit=10, eos=None) == 1  # all rejected: only the bonus
    assert state.cached == [8, 9] and state.pending == [3, 4]
    assert state.emit(1, [6, 0, 7], limit=10, eos=0) == 2 and state.done == [False, True]
    with pytest.raises(ValueError, match="do not fit the cache of 20 slots"):
        ChainState([18], [0], capacity=20).positions(3)


def test_prompt_lookup_and_jacobi_drafts():
    pl = PromptLookup(max_ngram=2)
    ctx = [1, 2, 3, 4, 9, 1, 2, 3, 8, 2, 3]
    # last bigram (2, 3): most recent earlier match at index 6 -> 8 2 3
    assert pl.lookup(ctx, 3) == [8, 2, 3]
    assert pl.propose([ctx, [5, 6]], 4).tolist() == [[8, 2, 3, 3], [6, 6, 6, 6]]
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)
    jac = Jacobi()
    jac.observe(torch.tensor([[4, 5, 6, 7]]), torch.tensor([1]))
    assert jac.propose([[1, 4, 5]], 3).tolist()[0][:2] == [6, 7]
