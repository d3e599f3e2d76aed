"""SJD (speculative Jacobi decoding) is lossless: its samples are distributed as plain
sampling's. Unit tests of the acceptance rule (passes/decoding/speculative.py) and the draft
source (passes/decoding/sjd.py), then chi-square tests of generated tokens on llama-tiny.

Power (scipy.stats.ncx2; alpha = 0.01, power 0.9). A shift of total variation d has chi-square
effect size w^2 = sum (p1 - p0)^2 / p0 >= 4 d^2 (Cauchy-Schwarz; equality when the shift is
spread in proportion to p0, the hardest case), and noncentrality N w^2 against the exact
distribution (goodness of fit) or (N / 2) w^2 for two samples of N each (SJD against plain).
On the model below, after merging categories with expected count < 5 (detectable d against
the exact distribution / against plain sampling; `detectable_tv` computes it, the tests check):
  temperature 1, N = 32768 per method (default run): 2nd token (df 40) 0.018 / 0.026,
      bigram of the 2nd and 3rd tokens (df 137) 0.023 / 0.033;
  top_p = 0.8, N = 8192 (default run): 2nd token (df 2) 0.023 / 0.033, bigram (df 11)
      0.029 / 0.041;
  N = 131072 (@pytest.mark.heavy, both cases): temperature 1: 0.010 / 0.014 and 0.013 / 0.018;
      top_p = 0.8: 0.006 / 0.008 and 0.007 / 0.010.
So the default run (~30 s on 2 idle cores) detects a worst-case 2% shift of the next token
against the exact law; the heavy one (~4x longer) detects 2% everywhere, the comparisons with
plain sampling included. A concentrated shift (2% moved between two tokens) is caught at far
smaller N.
The first new token comes from the prefill program in both methods; the 2nd is the first that
SJD's acceptance decides. Every run is seeded, so the tests are deterministic.

Reproduce: .venv/bin/pytest -q tests/test_sjd.py -k NAME  (heavy: add -m heavy)
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import meshweave
from meshweave.models import build_model
from meshweave.passes.decoding import SpeculativeJacobi, sampling_probs, speculative_accept
from meshweave.runtime.generate import GenerationError

REPRO = "reproduce: .venv/bin/pytest -q tests/test_sjd.py -k {}"
ALPHA = 0.01


def gof_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of integer samples to probs [C], categories with expected
    count < 5 merged into one (dropped if even merged they stay < 5)."""
    n, probs = samples.numel(), probs.double() / probs.sum()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    expected = n * probs
    keep = expected >= 5
    obs, exp = counts[keep].tolist(), expected[keep].tolist()
    if float(expected[~keep].sum()) >= 5:
        obs.append(float(counts[~keep].sum()))
        exp.append(float(expected[~keep].sum()))
    scale = sum(obs) / sum(exp)  # the dropped rare bin's share, so both totals agree
    return float(stats.chisquare(obs, [e * scale for e in exp]).pvalue)


def detectable_tv(df: int, n: int, two_sample: bool) -> float:
    """The smallest total-variation shift a chi-square test with df degrees of freedom over n
    samples (per method, if two_sample) detects at ALPHA with power 0.9, worst case (w^2 =
    4 d^2)."""
    crit, lo, hi = stats.chi2.ppf(1 - ALPHA, df), 0.0, 1000.0
    for _ in range(50):  # bisect the noncentrality that reaches power 0.9
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stats.ncx2.sf(crit, df, mid) < 0.9 else (lo, mid)
    return (hi / ((n / 2 if two_sample else n) * 4)) ** 0.5


def categories(probs: torch.Tensor, n: int) -> int:
    """Categories of gof_pvalue's test of n samples (the merged rare one included)."""
    expected = n * probs.double() / probs.sum()
    return int((expected >= 5).sum()) + int(float(expected[expected < 5].sum()) >= 5)


def two_sample_pvalue(a: torch.Tensor, b: torch.Tensor, categories: int) -> float:
    """chi2_contingency of two samples' category counts, categories whose pooled count gives
    an expected cell < 5 merged into one."""
    ca = torch.bincount(a.flatten(), minlength=categories).double()
    cb = torch.bincount(b.flatten(), minlength=categories).double()
    pooled = ca + cb
    share = min(ca.sum(), cb.sum()) / pooled.sum()
    keep = pooled * share >= 5
    rows = [torch.cat([c[keep], c[~keep].sum()[None]]) for c in (ca, cb)]
    table = torch.stack(rows)
    if float(table[:, -1].sum() * share) < 5:
        table = table[:, :-1]
    return float(stats.chi2_contingency(table.numpy()).pvalue)


# ---- the acceptance rule on synthetic p and q ----------------------------------------------

P0 = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
Q0 = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30])
# T[x] the target after token x (the second draft's p depends on the first draft)
T = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) * 2, dim=-1)


def two_draft_trials(n: int, seed: int, rule=speculative_accept) -> torch.Tensor:
    """[n] ids y0 * 6 + y1 of the first two tokens emitted with drafts d0 ~ Q0, d1 ~ Q0 and
    targets P0, T[d0] (y1 continued by plain sampling from T[y0] where d0 was rejected)."""
    g = torch.Generator().manual_seed(seed)
    draft = torch.multinomial(Q0.expand(n, 6), 2, replacement=True, generator=g)
    q = Q0.expand(n, 2, 6)
    p = torch.stack([P0.expand(n, 6), T[draft[:, 0]], T[draft[:, 1]]], dim=1)
    accepted, tokens = rule(draft, q, p, g)
    fresh = torch.multinomial(T[tokens[:, 0]], 1, generator=g)[:, 0]
    y1 = torch.where(accepted >= 1, tokens[:, 1], fresh)
    return tokens[:, 0] * 6 + y1


def always_accept(draft, q, p, g):
    """A biased rule, the negative control: every draft accepted."""
    k = draft.shape[1]
    bonus = torch.multinomial(p[:, k], 1, generator=g)
    return torch.full((draft.shape[0],), k), torch.cat([draft, bonus], dim=1)


def resample_from_p(draft, q, p, g):
    """A subtler bias: the min(1, p/q) test, but a rejection redrawn from p, not the residual."""
    accepted, tokens = speculative_accept(draft, q, p, g)
    rows = torch.arange(draft.shape[0])
    redraw = torch.multinomial(p[rows, accepted], 1, generator=g)[:, 0]
    full = accepted == draft.shape[1]
    tokens[rows, accepted] = torch.where(full, tokens[rows, accepted], redraw)
    return accepted, tokens


JOINT = (P0[:, None] * T).flatten()  # the exact law of (y0, y1) under plain sampling


def test_accept_rule_emits_the_target_distribution():
    ids = two_draft_trials(40000, seed=0)
    p_first = gof_pvalue(ids // 6, P0)
    p_joint = gof_pvalue(ids, JOINT)
    assert p_first > ALPHA and p_joint > ALPHA, (p_first, p_joint, REPRO.format("target"))


@pytest.mark.parametrize("rule", [always_accept, resample_from_p])
def test_negative_control_biased_rules_fail_the_same_test(rule):
    ids = two_draft_trials(40000, seed=0, rule=rule)
    assert gof_pvalue(ids, JOINT) < 1e-6, f"{rule.__name__} passed: the test has no power"


def test_accept_edge_cases():
    g = torch.Generator().manual_seed(0)
    n = 20000
    draft = torch.multinomial(P0.expand(n, 6), 3, replacement=True, generator=g)
    same = P0.expand(n, 3, 6)
    accepted, _ = speculative_accept(draft, same, P0.expand(n, 4, 6), g)
    assert bool((accepted == 3).all()), "q == p must accept every draft"
    # disjoint supports: drafts from {0, 1}, target on {2, 3, 4, 5}: never accepted, the
    # token is the residual, which is p itself
    q = torch.tensor([0.5, 0.5, 0, 0, 0, 0]).expand(n, 1, 6)
    p = torch.tensor([0, 0, 0.1, 0.2, 0.3, 0.4]).expand(n, 2, 6)
    draft = torch.multinomial(q[:, 0], 1, generator=g)
    accepted, tokens = speculative_accept(draft, q, p, g)
    assert bool((accepted == 0).all())
    assert gof_pvalue(tokens[:, 0], p[0, 0]) > ALPHA
    with pytest.raises(ValueError, match=r"draft token 1 .* probability 0 under q"):
        speculative_accept(torch.tensor([[1]]), torch.eye(6)[None, :1], P0.expand(1, 2, 6))
    with pytest.raises(ValueError, match=r"expected draft \[B, k\], q \[B, k, V\]"):
        speculative_accept(torch.tensor([[1]]), P0.expand(1, 1, 6), P0.expand(1, 1, 6))


# ---- the draft source on a synthetic second-order model -----------------------------------

V2 = 5
TABLE = torch.randn(V2, V2, V2, generator=torch.Generator().manual_seed(4)) * 1.5


def markov_logits(contexts: list[list[int]], chain: torch.Tensor) -> torch.Tensor:
    """[B, k + 1, V2] logits of a model whose next token depends on the last two tokens."""
    prev = torch.tensor([c[-2] for c in contexts])[:, None]
    before = torch.cat([prev, chain[:, :-1]], dim=1)
    return TABLE[before, chain]


@pytest.mark.parametrize("init", ["lookup", "uniform"])
def test_draft_source_loop_is_lossless(init):
    """The SJD loop (propose, verify, observe) with a known model: the joint law of the 2nd
    and 3rd new tokens is the exact one, with each initialisation."""
    n, k, prompt = 20000, 3, [1, 3, 1, 3]
    g = torch.Generator().manual_seed(11)
    source = SpeculativeJacobi(V2, generator=g, init=init)
    first = torch.multinomial(torch.softmax(TABLE[prompt[-2], prompt[-1]], -1).expand(n, V2),
                              1, generator=g)[:, 0].tolist()
    texts = [prompt + [t] for t in first]
    while min(len(t) for t in texts) < len(prompt) + 3:
        chain = torch.cat([torch.tensor([t[-1] for t in texts])[:, None],
                           source.propose(texts, k)], dim=1)
        accepted, tokens = source.verify(chain[:, 1:], markov_logits(texts, chain))
        source.observe(tokens, accepted)
        for b, t in enumerate(texts):
            t += tokens[b, :int(accepted[b]) + 1].tolist()
    got = torch.tensor([t[len(prompt) + 1] * V2 + t[len(prompt) + 2] for t in texts])
    probs = torch.softmax(TABLE, dim=-1)
    exact = torch.zeros(V2, V2)
    for t1, w in enumerate(torch.softmax(TABLE[prompt[-2], prompt[-1]], -1).tolist()):
        exact += w * probs[prompt[-1], t1][:, None] * probs[t1]
    assert gof_pvalue(got, exact.flatten()) > ALPHA, REPRO.format(init)


# ---- generation on llama-tiny ---------------------------------------------------------------

PROMPT = [1, 2, 3, 4, 5]
BATCH = 1024


@pytest.fixture(scope="module")
def peaked():
    """llama-tiny, random weights (seed 0), its output head scaled x30 so that p is peaked
    (top tokens ~0.4, 0.3, ...): p / q then varies widely and every branch of the rule runs."""
    torch.manual_seed(0)
    model, (ids,) = build_model("llama-tiny", batch=1, seq=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        cm = meshweave.compile(model, (ids,))
    return model, cm


def exact_law(model, top_p: float, temperature: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(law of the 2nd new token [V], of the (2nd, 3rd) bigram [V * V]) under plain sampling,
    from the eager model on every full sequence (no cache)."""
    vocab = model.config.vocab_size

    def probs(rows):
        with torch.no_grad():
            p = sampling_probs(model(torch.tensor(rows))[:, -1], temperature, top_p).double()
        return p / p.sum(-1, keepdim=True)

    p1 = probs([PROMPT])[0]
    p2 = probs([PROMPT + [a] for a in range(vocab)])
    p3 = probs([PROMPT + [a, b] for a in range(vocab) for b in range(vocab)])
    joint = (p1[:, None, None] * p2[:, :, None] * p3.reshape(vocab, vocab, vocab)).sum(0)
    return joint.sum(1), joint.flatten()


_SAMPLES: dict = {}  # the negative control reuses the default test's samples


def sampled(cm, method: str, n: int, top_p: float, seed: int) -> torch.Tensor:
    """[n, 3] new tokens from n sequences of PROMPT, in batches of BATCH, seeds seed, seed + 1..."""
    key = (id(cm), method, n, top_p, seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = torch.cat([
            cm.generate([PROMPT] * BATCH, 3, method=method, top_p=top_p, seed=seed + i,
                        num_draft=3, max_batch=BATCH, cache_len=16).sequences
            for i in range(n // BATCH)])  # a 16-slot cache: a third faster than the default 64
    return _SAMPLES[key]


def check_lossless(model, cm, n: int, top_p: float) -> tuple[float, float]:
    vocab = model.config.vocab_size
    law2, law23 = exact_law(model, top_p)
    sjd = sampled(cm, "sjd", n, top_p, seed=1000)
    plain = sampled(cm, "sample", n, top_p, seed=5000)
    big_sjd, big_plain = sjd[:, 1] * vocab + sjd[:, 2], plain[:, 1] * vocab + plain[:, 2]
    pvalues = {
        "sjd 2nd token vs exact": gof_pvalue(sjd[:, 1], law2),
        "sjd bigram vs exact": gof_pvalue(big_sjd, law23),
        "sjd vs plain, 2nd token": two_sample_pvalue(sjd[:, 1], plain[:, 1], vocab),
        "sjd vs plain, bigram": two_sample_pvalue(big_sjd, big_plain, vocab * vocab),
        "plain bigram vs exact": gof_pvalue(big_plain, law23),
    }
    print(f"top_p={top_p}, N={n}: p-values " + ", ".join(f"{k} {v:.3f}"
                                                       for k, v in pvalues.items()))
    failed = {k: v for k, v in pvalues.items() if v < ALPHA}
    assert not failed, f"top_p={top_p}, N={n}: {failed} (all: {pvalues}); " + REPRO.format(
        "lossless")
    # the power the docstring states, for the categories this run has
    return (detectable_tv(categories(law2, n) - 1, n, False),
            detectable_tv(categories(law23, n) - 1, n, False))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sjd_is_lossless_on_llama_tiny(peaked, top_p):
    tv_next, _ = check_lossless(*peaked, n=32 * BATCH if top_p == 1.0 else 8 * BATCH,
                                top_p=top_p)
    if top_p == 1.0:
        assert tv_next <= 0.02, f"the default run detects only a {tv_next:.3f} shift"


def test_negative_control_a_2_percent_shift_is_detected(peaked):
    """The same test of SJD's 2nd token, against the law at temperature 1.05 instead of 1: a
    shift of total variation 0.021 (bigram 0.031) must be rejected at the default N."""
    model, cm = peaked
    sjd = sampled(cm, "sjd", 32 * BATCH, 1.0, seed=1000)  # the default test's samples
    shifted2, shifted23 = exact_law(model, 1.0, temperature=1.05)
    law2, _ = exact_law(model, 1.0)
    assert 0.02 < float((shifted2 - law2).abs().sum() / 2) < 0.022
    vocab = model.config.vocab_size
    p_next = gof_pvalue(sjd[:, 1], shifted2)
    p_bigram = gof_pvalue(sjd[:, 1] * vocab + sjd[:, 2], shifted23)
    assert p_next < ALPHA and p_bigram < ALPHA, (p_next, p_bigram, REPRO.format("shift"))


@pytest.mark.heavy
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sjd_is_lossless_on_llama_tiny_full_size(peaked, top_p):
    tv_next, tv_bigram = check_lossless(*peaked, n=128 * BATCH, top_p=top_p)
    assert max(tv_next, tv_bigram) <= 0.015, (tv_next, tv_bigram)


def test_sjd_generation_is_seeded_and_drafts_get_accepted(peaked):
    _, cm = peaked
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [3, 1, 4, 1, 5]]
    a = cm.generate(prompts, 24, method="sjd", seed=0)
    b = cm.generate(prompts, 24, method="sjd", seed=0)
    c = cm.generate(prompts, 24, method="sjd", seed=1)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert [len(t) for t in a.tokens] == [24, 24]
    # some drafts are accepted (random weights: ~1.1 tokens per sequence-step; greedy Jacobi
    # gets 1.24 here), and a step never emits more than num_draft + 1 tokens
    assert 1.0 < a.accepted_per_step <= 5.0 and a.steps < 23, (a.steps, a.per_step)


def test_sjd_bad_inputs_say_what_and_expected(peaked):
    _, cm = peaked
    cases = [
        (dict(temperature=0.0), "temperature=0.0: expected > 0 for method='sjd'"),
        (dict(temperature=-1.0), "expected > 0 for method='sjd'"),
        (dict(top_p=0.0), "0 < top_p <= 1"),
        (dict(top_p=1.5), "0 < top_p <= 1"),
        (dict(num_draft=0), "num_draft=0: expected >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GenerationError) as err:
            cm.generate([[1, 2, 3]], 4, method="sjd", **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    with pytest.raises(ValueError, match="init='zeros'; choose from"):
        SpeculativeJacobi(8, init="zeros")
