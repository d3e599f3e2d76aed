"""Hybrid CPU-GPU generation: run an OffloadPlan (passes/offload/) over a batch.

`HybridGenerator(model, compile_fn, memory_limit=..., spec=...)` plans each batch, then:

  gpu-only / gpu-rounds  the whole-step compiled programs of runtime/generate.py's Generator
                         (in consecutive sub-batches of the plan's round size)
  hybrid                 the cut step (runtime/offload/pieces.py) with the batch reordered so
                         that the device-resident sequences come first: each layer's linears
                         run on the device; attention runs on the device for its rows and on
                         host threads (runtime/offload/host.py) for the host-resident rows,
                         whose q, k, v cross to the host and whose outputs come back; the
                         overlap scheduler (scheduler.py) picks each step's dispatch

Greedy tokens are the whole-step program's (tests/test_offload.py checks them on CPU, where
the "device" is the CPU too). Methods: greedy and sample.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from meshweave.passes.decoding import ChainState
from meshweave.passes.offload import (DecoderShape, OffloadError, OffloadPlan, StepCosts,
                                      plan_offload)
from meshweave.runtime.generate import (SAMPLING, Generation, GenerationError, Generator,
                                        generator_for, padded_sequences, prefill_length,
                                        prompts_from, sample_token)

from .host import HostCaches
from .pieces import DeviceTimer, Pieces
from .scheduler import OverlapScheduler

METHODS = ("greedy", "sample")


class HybridGenerator:
    """Plans and runs generation under a device memory cap (module docstring)."""

    def __init__(self, model: torch.nn.Module, compile_fn: Callable[..., Any], *,
                 memory_limit: float | None, spec, cache_len: int | None = None,
                 max_batch: int = 64, host_threads: int | None = None) -> None:
        self.model, self.compile_fn = model, compile_fn
        self.shape = DecoderShape.of(model)
        self.spec, self.memory_limit = spec, memory_limit
        self.cache_len, self.max_batch = cache_len, max_batch
        self.pieces = Pieces(model, compile_fn)
        self.host_threads = host_threads or max(1, (os.cpu_count() or 2) // 2)
        self.whole: dict[int, Generator] = {}  # by cache_len: the device-only programs
        # measured / predicted step seconds of earlier runs per mode: the next plans' profile
        self.profile: dict[str, float] = {}

    def _whole(self, cache_len: int) -> Generator:
        if cache_len not in self.whole:
            self.whole[cache_len] = Generator(self.model, self.compile_fn, cache_len=cache_len,
                                              max_batch=self.max_batch)
        return self.whole[cache_len]

    def _cache_len(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """Slots per sequence: the cache_len given, or just what the batch needs."""
        return self.cache_len or max(map(len, prompts)) + max_new_tokens

    def plan(self, prompts: list[list[int]], max_new_tokens: int,
             cpu_sequences: int | None = None) -> OffloadPlan:
        capacity = self._cache_len(prompts, max_new_tokens) + 1
        prefill = prefill_length(prompts, capacity)
        try:
            return plan_offload(self.shape, [len(p) for p in prompts], max_new_tokens, capacity,
                                self.spec, self.memory_limit, prefill_len=prefill,
                                cpu_sequences=cpu_sequences,
                                same_memory=self.pieces.device.type == "cpu",
                                measured=self.profile)
        except OffloadError as e:
            raise GenerationError(f"generate: {e}") from None

    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, method: str = "greedy",
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 attention_mask: Any = None, pad_token_id: int | None = None,
                 seed: int | None = None, progress: bool = False,
                 cpu_sequences: int | None = None, dispatch: str | None = None,
                 **others: Any) -> Generation:
        """Generation as Generator.generate, under the memory cap. cpu_sequences: force that
        many sequences to the host (a fixed split); dispatch: a fixed dispatch mode instead
        of the scheduler's prediction ("merged" or "pipelined")."""
        if method not in METHODS:
            raise GenerationError(f"generate: method={method!r} with a memory cap: hybrid "
                                  f"generation runs {', '.join(METHODS)} only")
        extra = {k: v for k, v in others.items() if v is not None and k != "num_draft"}
        if extra:
            raise GenerationError(f"generate: {', '.join(sorted(extra))}: not taken by hybrid "
                                  f"generation (methods {', '.join(METHODS)})")
        if dispatch not in (None, "merged", "pipelined"):
            raise GenerationError(f"generate: dispatch={dispatch!r}: expected 'merged', "
                                  f"'pipelined' or None (the scheduler's choice)")
        prompts = prompts_from(input_ids, attention_mask)
        whole = self._whole(self._cache_len(prompts, max_new_tokens))
        whole._check(prompts, max_new_tokens, method, temperature, top_p)
        plan = self.plan(prompts, max_new_tokens, cpu_sequences)
        opts = dict(method=method, temperature=temperature, top_p=top_p,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
        if plan.mode != "hybrid":
            out = self._rounds(whole, plan, prompts, max_new_tokens, progress, opts)
        else:
            out = self._hybrid(plan, prompts, max_new_tokens, progress, dispatch, opts)
        out.offload = {"plan": plan.to_dict(), "placement": plan.placement_line(),
                       **out.offload}
        return out

    def _rounds(self, whole: Generator, plan: OffloadPlan, prompts, max_new_tokens, progress,
                opts) -> Generation:
        size, tokens, steps, secs, comp, per_step = plan.round_size, [], 0, 0.0, 0.0, []
        for start in range(0, len(prompts), size):
            g = whole.generate(prompts[start:start + size], max_new_tokens, progress=progress,
                               **opts)
            tokens += g.tokens
            steps, secs, comp = steps + g.steps, secs + g.seconds, comp + g.compile_seconds
            per_step += g.per_step
        costs = StepCosts(self.shape, self.spec, same_memory=self.pieces.device.type == "cpu")
        predicted = sum(costs.step_time("gpu", min(size, len(prompts) - s), 0, plan.capacity,
                                        0)[0] for s in range(0, len(prompts), size))
        per_round = steps / max(1, -(-len(prompts) // size))
        if steps and comp == 0:  # a run that compiled says nothing about the steps
            self.profile["gpu-rounds"] = secs / (predicted * per_round)
        return _result(tokens, opts, steps, secs, comp, per_step,
                       {"rounds": -(-len(prompts) // size)})

    def _hybrid(self, plan: OffloadPlan, prompts, max_new_tokens, progress, dispatch,
                opts) -> Generation:
        p = self.pieces
        order = list(plan.gpu_rows) + list(plan.cpu_rows)
        ng, nc, batch, cap = len(plan.gpu_rows), len(plan.cpu_rows), len(prompts), plan.capacity
        rows = [prompts[b] for b in order]
        compile_before = p.compile_seconds
        prefill_len = prefill_length(rows, cap)
        shapes = [("embed", batch, prefill_len), ("embed", batch, 1), ("head", batch, prefill_len),
                  ("head", batch, 1), ("layer", batch, prefill_len), ("layer", batch, 1),
                  ("attn", ng, prefill_len), ("attn", ng, 1)]
        if dispatch != "merged" and ng:
            shapes += [("layer", ng, 1), ("layer", nc, 1)]
        p.compile_all(shapes, cap)
        kz = [torch.zeros(ng, p.kv_heads, cap, p.head_dim, dtype=p.dtype, device=p.device)
              for _ in range(p.num_layers)]
        self.gk, self.gv = kz, [t.clone() for t in kz]
        host = HostCaches(p.num_layers, nc, p.kv_heads, cap, p.head_dim, p.dtype, p.n_rep,
                          pin=p.cuda, threads=self.host_threads)
        sched = OverlapScheduler(self.shape, self.spec, ng, nc, cap,
                                 same_memory=p.device.type == "cpu", fixed=dispatch)
        rng = torch.Generator().manual_seed(opts["seed"]) if opts["seed"] is not None else None
        eos = opts["eos_token_id"]

        def pick(logits: torch.Tensor) -> list[int]:
            if opts["method"] in SAMPLING:
                return sample_token(logits.cpu(), opts["temperature"], opts["top_p"],
                                    rng).tolist()
            return logits.argmax(dim=-1).tolist()

        try:
            t0 = time.perf_counter()
            ids = torch.zeros(batch, prefill_len, dtype=torch.int64)
            for b, r in enumerate(rows):
                ids[b, :len(r)] = torch.tensor(r)
            pos = torch.arange(prefill_len).expand(batch, prefill_len).contiguous()
            last = torch.tensor([len(r) - 1 for r in rows])
            live = sum(len(r) for r in rows[ng:])
            logits = self._step(host, sched, ids, pos, last, list(range(nc)), live)
            first = pick(logits)
            state = ChainState([len(r) for r in rows], first, cap)
            for b in range(batch):
                state.emitted[b] = [first[b]]
                state.done[b] = max_new_tokens == 1 or first[b] == eos
            steps, per_step = 0, []
            while not all(state.done):
                active = [b for b in range(batch) if not state.done[b]]
                chain = torch.tensor(state.pending, dtype=torch.int64)[:, None]
                cpu_active = [b - ng for b in active if b >= ng]
                live = sum(state.cached[ng + r] + 1 for r in cpu_active)
                logits = self._step(host, sched, chain, state.positions(1),
                                    torch.zeros(batch, dtype=torch.int64), cpu_active, live)
                toks = pick(logits)
                kept = sum(state.emit(b, [toks[b]], max_new_tokens, eos) for b in active)
                steps += 1
                per_step.append(kept / len(active))
                if progress:
                    from meshweave.progress import bar

                    bar(max(len(e) for e in state.emitted), max_new_tokens,
                        f"generate (hybrid: {sched.line()})")
            seconds = time.perf_counter() - t0
        finally:
            host.close()
        if sched.wall_scale() is not None and p.compile_seconds == compile_before:
            self.profile["hybrid"] = sched.wall_scale()
        back = [[] for _ in range(batch)]
        for i, b in enumerate(order):
            back[b] = state.emitted[i]
        return _result(back, opts, steps, seconds, p.compile_seconds - compile_before,
                       per_step, {"scheduler": sched.summary(), "progress": sched.line()})

    def _step(self, host: HostCaches, sched: OverlapScheduler, ids, positions, last,
              cpu_active: list[int], cpu_live: int) -> torch.Tensor:
        """One step of the cut program over the reordered batch: [B, vocab] logits of each
        row's token at `last`."""
        p, ng = self.pieces, len(self.gk[0]) if self.gk else 0
        dev = p.device
        width = ids.shape[1]
        mode = sched.choose(cpu_live, len(cpu_active), width)
        timer = DeviceTimer(p.cuda)
        wall0, host0 = time.perf_counter(), host.busy_seconds
        ids, positions, last = ids.to(dev), positions.to(dev), last.to(dev)
        host_pos = positions[ng:].cpu()
        t = timer.start()
        x = p.embed(ids)
        timer.stop("lin", t)
        if mode == "pipelined":
            xg, xc = x[:ng], x[ng:]
        for i in range(p.num_layers):
            if mode == "pipelined":
                t = timer.start()
                qc, kc, vc = p.pre(i, xc, positions[ng:])
                timer.stop("lin", t)
                fut = host.attend(i, qc.cpu(), kc.cpu(), vc.cpu(), host_pos, cpu_active)
                xg = self._device_layer(i, xg, positions[:ng], timer)
                yc = fut.result().to(dev, non_blocking=True)
                t = timer.start()
                xc = p.post(i, xc, yc)
                timer.stop("lin", t)
                continue
            t = timer.start()
            q, k, v = p.pre(i, x, positions)
            timer.stop("lin", t)
            fut = None
            if mode != "gpu":
                fut = host.attend(i, q[ng:].cpu(), k[ng:].cpu(), v[ng:].cpu(), host_pos,
                                  cpu_active)
            parts = []
            if ng:
                t = timer.start()
                yg, self.gk[i], self.gv[i] = p.attention(q[:ng], k[:ng], v[:ng], positions[:ng],
                                                         self.gk[i], self.gv[i])
                timer.stop("gattn", t)
                parts.append(yg)
            if len(parts) < 2 and x.shape[0] > ng:
                yc = fut.result() if fut is not None else torch.zeros(
                    x.shape[0] - ng, width, p.heads * p.head_dim, dtype=p.dtype)
                parts.append(yc.to(dev, non_blocking=True))
            y = torch.cat(parts) if len(parts) > 1 else parts[0]
            t = timer.start()
            x = p.post(i, x, y)
            timer.stop("lin", t)
        if mode == "pipelined":
            x = torch.cat([xg, xc])
        t = timer.start()
        logits = p.head(x, last)
        timer.stop("lin", t)
        out = logits.cpu()  # the step's synchronisation
        host_s = (host.busy_seconds - host0) / host.threads
        sched.record(mode, timer.totals(), host_s, time.perf_counter() - wall0, cpu_live, width)
        return out

    def _device_layer(self, i: int, x, positions, timer: DeviceTimer):
        p = self.pieces
        t = timer.start()
        q, k, v = p.pre(i, x, positions)
        timer.stop("lin", t)
        t = timer.start()
        y, self.gk[i], self.gv[i] = p.attention(q, k, v, positions, self.gk[i], self.gv[i])
        timer.stop("gattn", t)
        t = timer.start()
        x = p.post(i, x, y)
        timer.stop("lin", t)
        return x


def hybrid_generator_for(cm: Any, cache_len: int | None = None,
                         max_batch: int | None = None) -> HybridGenerator:
    """The HybridGenerator of a CompiledModel compiled with memory_limit= (kept on it): plans
    against the cap on the options' hardware spec (default h100 on CUDA, cpu otherwise)."""
    from meshweave.passes.offload import memory_limit_bytes
    from meshweave.passes.parallel.cost.hardware import get_spec

    options = cm.options
    if options.quantize is not None:
        raise GenerationError("generate: memory_limit= with quantize=: hybrid generation runs "
                              "the model's own weights; compile without one of them")
    spec = get_spec(options.hardware or ("h100" if torch.cuda.is_available() else "cpu"))
    limit = memory_limit_bytes(options.memory_limit)

    def make(source, fn, cache_len, max_batch):
        return HybridGenerator(source, fn, memory_limit=limit, spec=spec, cache_len=cache_len,
                               max_batch=max_batch or 64)

    return generator_for(cm, cache_len, max_batch, make=make)


def _result(tokens: list[list[int]], opts: dict, steps: int, seconds: float,
            compile_seconds: float, per_step: list[float], offload: dict) -> Generation:
    eos, pad = opts["eos_token_id"], opts["pad_token_id"]
    seqs = padded_sequences(tokens, pad if pad is not None else (eos or 0))
    accepted = sum(per_step) / len(per_step) if per_step else 0.0
    g = Generation(tokens, seqs, opts["method"], steps, accepted, seconds, compile_seconds,
                   per_step)
    g.offload = offload
    return g

