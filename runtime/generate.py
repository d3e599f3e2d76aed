"""Compiled generation with a static KV cache: greedy, sampling, and draft-and-verify.

`Generator(model, compile_fn)` wraps a rotary decoder in models/kv_decoder.py's KVDecoder
and compiles it with `compile_fn` (meshweave.compile, bound to the CompiledModel's options)
once per shape: the prefill program on [B, P] (P the longest prompt rounded up to a multiple
of PREFILL_BUCKET, so nearby lengths share it), the decode program on [B, 1], and for the draft
methods the verify program on [B, k + 1]. Every program takes and returns the cache
explicitly. Prompts of different lengths are right-padded; each sequence has its own positions
and cached length, and stops on its own at eos or max_new_tokens (its rows keep running in the
static-shape batch, their outputs dropped, until all are done).

method="greedy" emits one argmax per step, "sample" draws from softmax(logits / temperature)
cut to the top_p nucleus, and "prompt_lookup" / "jacobi" draft k tokens per step
(passes/decoding/) that one verify program checks: their tokens are exactly greedy's. "sjd"
(speculative Jacobi decoding) drafts sampled Jacobi guesses and accepts them by speculative
sampling: its tokens are distributed exactly as "sample"'s (at the same temperature / top_p).
"medusa" drafts a token tree from trained heads (medusa_heads=, tree=), scored by one compiled
program per step (runtime/tree_generate.py); with acceptance="exact", greedy's tokens too;
acceptance="typical" is Medusa's typical acceptance at `temperature`, approximate (neither
greedy's tokens nor sampling's distribution).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from meshweave.models.kv_decoder import KVDecoder
from meshweave.passes.decoding import (DRAFT_SOURCES, ChainState, make_draft_source,
                                       sampling_probs, verify_chain)

METHODS = ("greedy", "sample", *DRAFT_SOURCES)
SAMPLING = ("sample", "sjd")  # the methods that draw from softmax(logits / temperature)
PREFILL_BUCKET = 16


class GenerationError(ValueError):
    """Bad input to generate(): says what, where, and what was expected."""


@dataclass
class Generation:
    """What generate() returns.

    tokens[b]: sequence b's new tokens (ending at its eos, if it met one); sequences: [B, N]
    int64 of the same, right-padded with pad_token_id to the longest; steps: compiled decode or
    verify calls after the prefill; accepted_per_step: mean tokens emitted per sequence-step;
    seconds: wall time of the prefill and the steps (compiles excluded)."""

    tokens: list[list[int]]
    sequences: torch.Tensor
    method: str
    steps: int
    accepted_per_step: float
    seconds: float
    compile_seconds: float = 0.0
    per_step: list[float] = field(default_factory=list)
    offload: dict = field(default_factory=dict)  # hybrid generation: plan, scheduler, busy

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else math.inf


def prompts_from(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """Token lists from a [B, S] tensor (with an optional [B, S] attention mask: 1 marks a
    token, left or right padding alike), a [S] tensor, or a list of token lists / tensors."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise GenerationError(f"generate: input_ids must be an integer tensor [B, S] (or a "
                                  f"list of token lists), got {input_ids.dtype} "
                                  f"{tuple(input_ids.shape)}")
        rows = input_ids.tolist()
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if tuple(mask.shape) != tuple(input_ids.shape):
                raise GenerationError(f"generate: attention_mask has shape {tuple(mask.shape)}, "
                                      f"input_ids {tuple(input_ids.shape)}: expected the same")
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask.tolist())]
        return rows
    if attention_mask is not None:
        raise GenerationError("generate: attention_mask goes with a [B, S] input_ids tensor; "
                              "a list of prompts needs none")
    if not isinstance(input_ids, Sequence) or not input_ids:
        raise GenerationError(f"generate: expected input_ids as a tensor or a non-empty list of "
                              f"token lists, got {type(input_ids).__name__}")
    return [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
            for p in input_ids]


def prefill_length(prompts: list[list[int]], capacity: int) -> int:
    """The prefill program's width: the longest prompt rounded up to PREFILL_BUCKET, at most
    the cache's capacity."""
    return min(capacity, -(-max(map(len, prompts)) // PREFILL_BUCKET) * PREFILL_BUCKET)


def padded_sequences(tokens: list[list[int]], pad: int) -> torch.Tensor:
    """[B, N] int64 of each sequence's tokens, right-padded with `pad` to the longest."""
    seqs = torch.full((len(tokens), max(len(t) for t in tokens)), pad, dtype=torch.int64)
    for b, t in enumerate(tokens):
        seqs[b, :len(t)] = torch.tensor(t)
    return seqs


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """[B] tokens drawn from softmax(logits [B, V] / temperature) over the top_p nucleus (the
    fewest most likely tokens whose probability reaches top_p)."""
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Generator:
    """Compiled prefill/decode/verify programs of one decoder, and the loop that runs them.

    cache_len: slots per sequence (prompt + new tokens; default the model's max_seq_len);
    max_batch: sequences the cache holds at most (default 64)."""

    def __init__(self, model: torch.nn.Module, compile_fn: Callable[..., Any], *,
                 cache_len: int | None = None, max_batch: int = 64) -> None:
        self.step_module = KVDecoder(model).eval()
        self.compile_fn = compile_fn
        default_len = getattr(model.config, "max_seq_len", None)
        self.cache_len = int(cache_len or default_len or 256)
        self.max_batch = int(max_batch)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.programs: dict[tuple[int, int], Any] = {}
        self.compile_seconds = 0.0

    def program(self, batch: int, width: int, capacity: int):
        """The compiled step on [batch, width] tokens over a cache of `capacity` slots."""
        key = (batch, width, capacity)
        if key not in self.programs:
            ids = torch.zeros(batch, width, dtype=torch.int64, device=self.device)
            pos = torch.arange(width, device=self.device).expand(batch, width).contiguous()
            k, v = self.step_module.empty_cache(batch, capacity, self.dtype, self.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                self.programs[key] = self.compile_fn(self.step_module, (ids, pos, k, v))
            self.compile_seconds += time.perf_counter() - t0
        return self.programs[key]

    def _check(self, prompts: list[list[int]], max_new_tokens: int, method: str,
               temperature: float, top_p: float) -> None:
        if method not in METHODS:
            raise GenerationError(f"generate: unknown method {method!r}; choose from "
                                  f"{', '.join(METHODS)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens <= 0:
            raise GenerationError(f"generate: max_new_tokens={max_new_tokens!r}: expected a "
                                  f"positive int")
        if method in SAMPLING and not (temperature > 0 and math.isfinite(temperature)):
            raise GenerationError(f"generate: temperature={temperature!r}: expected > 0 for "
                                  f"method={method!r} (use method='greedy' for argmax)")
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"generate: top_p={top_p!r}: expected 0 < top_p <= 1")
        if len(prompts) > self.max_batch:
            raise GenerationError(f"generate: a batch of {len(prompts)} sequences is beyond the "
                                  f"cache's capacity of {self.max_batch} (max_batch)")
        vocab = self.step_module.vocab_size
        for b, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"generate: prompt {b} is empty: expected >= 1 token")
            if len(p) > self.cache_len:
                raise GenerationError(f"generate: prompt {b} has {len(p)} tokens, longer than "
                                      f"the cache of {self.cache_len} (cache_len)")
            if len(p) + max_new_tokens > self.cache_len:
                raise GenerationError(
                    f"generate: prompt {b} ({len(p)} tokens) + max_new_tokens={max_new_tokens} "
                    f"exceeds the cache of {self.cache_len} tokens (cache_len): lower "
                    f"max_new_tokens to {self.cache_len - len(p)} or pass a larger cache_len")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise GenerationError(f"generate: prompt {b} holds token {bad[0]}, outside the "
                                      f"vocabulary [0, {vocab})")

    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, method: str = "greedy",
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 attention_mask: Any = None, pad_token_id: int | None = None,
                 seed: int | None = None, num_draft: int = 4, progress: bool = False,
                 medusa_heads: Any = None, tree: Any = None, acceptance: str = "exact"
                 ) -> Generation:
        prompts = prompts_from(input_ids, attention_mask)
        self._check(prompts, max_new_tokens, method, temperature, top_p)
        if method == "medusa":
            return self._generate_medusa(prompts, max_new_tokens, medusa_heads, tree,
                                         acceptance, temperature, eos_token_id, pad_token_id,
                                         progress)
        if medusa_heads is not None or tree is not None:
            raise GenerationError(f"generate: medusa_heads= and tree= go with "
                                  f"method='medusa', not {method!r}")
        if method in DRAFT_SOURCES and num_draft < 1:
            raise GenerationError(f"generate: num_draft={num_draft}: expected >= 1")
        width = num_draft + 1 if method in DRAFT_SOURCES else 1
        capacity = self.cache_len + width  # slack: a last chain may run past the final token
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        compile_before = self.compile_seconds
        batch = len(prompts)
        prefill_len = prefill_length(prompts, capacity)
        prefill = self.program(batch, prefill_len, capacity)
        step = self.program(batch, width, capacity)

        def pick(logits: torch.Tensor) -> list[int]:
            if method in SAMPLING:
                return sample_token(logits, temperature, top_p, rng).tolist()
            return logits.argmax(dim=-1).tolist()

        t0 = time.perf_counter()
        ids = torch.zeros(batch, prefill_len, dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
        pos = torch.arange(prefill_len).expand(batch, prefill_len).contiguous()
        k, v = self.step_module.empty_cache(batch, capacity, self.dtype, self.device)
        with torch.no_grad():
            logits, k, v = prefill(ids.to(self.device), pos.to(self.device), k, v)
        last = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)
        first = pick(logits[torch.arange(batch, device=logits.device), last])
        state = ChainState([len(p) for p in prompts], first, capacity)
        for b in range(batch):
            state.emitted[b] = [first[b]]
            state.done[b] = max_new_tokens == 1 or first[b] == eos_token_id
        opts = dict(vocab_size=self.step_module.vocab_size, temperature=temperature,
                    top_p=top_p, generator=rng) if method in SAMPLING else {}
        draft = make_draft_source(method, **opts) if method in DRAFT_SOURCES else None
        steps, emitted, active_steps = 0, 0, 0
        per_step: list[float] = []
        while not all(state.done):
            active = [b for b in range(batch) if not state.done[b]]
            chain = torch.tensor(state.pending, dtype=torch.int64)[:, None]
            if draft is not None:
                contexts = [prompts[b] + state.emitted[b] for b in range(batch)]
                chain = torch.cat([chain, draft.propose(contexts, num_draft)], dim=1)
            with torch.no_grad():
                logits, k, v = step(chain.to(self.device), state.positions(width).to(
                    self.device), k, v)
            if draft is not None:
                verify = getattr(draft, "verify", verify_chain)  # sjd samples, others match
                accepted, argmax = verify(chain[:, 1:], logits.cpu())
                draft.observe(argmax, accepted)
                rows = [argmax[b, :int(accepted[b]) + 1].tolist() for b in range(batch)]
            else:
                rows = [[t] for t in pick(logits[:, -1])]
            kept = sum(state.emit(b, rows[b], max_new_tokens, eos_token_id) for b in active)
            steps, emitted, active_steps = steps + 1, emitted + kept, active_steps + len(active)
            per_step.append(kept / len(active))
            if progress:
                from meshweave.progress import bar

                bar(max(len(e) for e in state.emitted), max_new_tokens, f"generate ({method})")
        seconds = time.perf_counter() - t0
        return self._result(state, method, steps, emitted, active_steps, seconds,
                            compile_before, per_step, pad_token_id, eos_token_id)

    def _result(self, state: ChainState, method: str, steps: int, emitted: int,
                active_steps: int, seconds: float, compile_before: float,
                per_step: list[float], pad_token_id: int | None, eos_token_id: int | None
                ) -> Generation:
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        seqs = padded_sequences(state.emitted, pad)
        return Generation(state.emitted, seqs, method, steps,
                          emitted / active_steps if active_steps else 0.0, seconds,
                          self.compile_seconds - compile_before, per_step)

    def _generate_medusa(self, prompts, max_new_tokens, heads, tree, acceptance, temperature,
                         eos_token_id, pad_token_id, progress) -> Generation:
        """Tree decoding with Medusa heads (runtime/tree_generate.py)."""
        from meshweave.runtime.tree_generate import medusa_source, run_tree

        try:
            source = medusa_source(heads, tree, self.step_module.model, acceptance)
        except ValueError as e:
            raise GenerationError(f"generate: {e}") from None
        compile_before = self.compile_seconds
        out = run_tree(self, prompts, max_new_tokens, source, acceptance=acceptance,
                       temperature=temperature, eos_token_id=eos_token_id, progress=progress)
        return self._result(out[0], "medusa", *out[1:5], compile_before, out[5], pad_token_id,
                            eos_token_id)


def generator_for(cm: Any, cache_len: int | None = None, max_batch: int | None = None,
                  make: Callable[..., Any] | None = None) -> Generator:
    """The Generator of a CompiledModel (made at its first generate call, kept on it): the
    source model compiled with the CompiledModel's compile function and options. `make`
    (source, compile_fn, cache_len, max_batch) builds another kind (runtime/offload/'s)."""
    source = getattr(cm, "source_model", None)
    compile_fn = getattr(cm, "compile_fn", None)
    if source is None or compile_fn is None:
        raise GenerationError(f"generate: {cm.model_name} holds no source model to build the "
                              f"cached decoder from; compile it with meshweave.compile")
    if cm.options.training or cm.options.mesh is not None:
        raise GenerationError(
            f"generate: {cm.model_name} was compiled with training or mesh=; generation "
            f"compiles single-device inference steps only: compile the model without them "
            f"(parallel decoding is not built yet)")
    # the CompiledModel's own options, minus what belongs to its one traced program; a
    # quantized model's programs reuse its packed weights (GPTQ's included) as they are
    options = dataclasses.replace(cm.options, dump_dir=None, calibration=None)
    if cm.options.quantize is not None:
        from meshweave.passes.quant import packed_weights

        options = dataclasses.replace(options, quantized_weights=packed_weights(cm.graph))
    key = (cache_len, max_batch, make is not None)
    gens = cm.__dict__.setdefault("_generators", {})
    if key not in gens:
        fn = functools.partial(compile_fn, options=options)
        if make is not None:
            gens[key] = make(source, fn, cache_len, max_batch)
        else:
            gens[key] = Generator(source, fn, cache_len=cache_len, max_batch=max_batch or 64)
    return gens[key]
