"""Train the small LM (models/small_lm.py) from scratch: BPE, token windows, AdamW, perplexity.

Training runs in plain torch eager (a CPU optimizer loop over a few million parameters gains
little from compilation, and it keeps train-lm independent of the compiler it feeds); the
trained model is then what meshweave.compile loads (`meshweave lm-eval`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .llama import Llama
from .small_lm import (
    EOS,
    LMError,
    LMPreset,
    TrainedLM,
    encode_texts,
    get_preset,
    perplexity,
    read_text,
    save_checkpoint,
    split_files,
    stdlib_files,
    stdlib_root,
    windows,
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the training files only (every byte is in the alphabet, so
    any text encodes; EOS separates files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore. One is the default: these matmuls are
    small, and on a shared 2-core machine two threads measured 6-60x slower than one (the
    OpenMP workers spin against the other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lr_at(p: LMPreset, progress: float) -> float:
    """Linear warmup over the first 5%, then cosine down to 5% of the peak. `progress` is the
    larger of steps done and wall-clock used, so a run stopped by its time cap has annealed."""
    warm = min(1.0, progress / 0.05)
    return p.lr * max(0.05, warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _prepare(p: LMPreset, log: Callable[[str], None]):
    t0 = time.perf_counter()
    train_files, val_files = split_files(stdlib_files(p.max_files))
    train_texts = [read_text(f) for f in train_files]
    tok = train_tokenizer(train_texts, p.model.vocab_size)
    train_ids = encode_texts(tok, train_texts)
    val_ids = encode_texts(tok, [read_text(f) for f in val_files])
    log(f"train-lm {p.name}: {len(train_files)} train / {len(val_files)} validation files, "
        f"{len(train_ids):,} / {len(val_ids):,} tokens, vocab {tok.get_vocab_size()} "
        f"({time.perf_counter() - t0:.1f} s)")
    if len(train_ids) <= p.seq_len + 1:
        raise LMError(f"preset {p.name}: {len(train_ids)} training tokens, fewer than one "
                      f"window of seq_len={p.seq_len}")
    return train_files, val_files, tok, train_ids, val_ids


def _optimize(model: Llama, p: LMPreset, train_ids: torch.Tensor, total: int, budget: float,
              seed: int, log: Callable[[str], None]) -> tuple[int, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    every = max(1, total // 20)
    done, loss_v, t_start = 0, float("nan"), time.perf_counter()
    for step in range(total):
        elapsed = time.perf_counter() - t_start
        for g in opt.param_groups:
            g["lr"] = lr_at(p, max(step / total, elapsed / budget))
        starts = torch.randint(0, len(train_ids) - p.seq_len - 1, (p.batch,), generator=gen)
        x, y = windows(train_ids, p.seq_len, starts)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done, loss_v = step + 1, loss.item()
        elapsed = time.perf_counter() - t_start
        if done % every == 0 or done in (1, total):
            tps = done * p.batch * p.seq_len / max(elapsed, 1e-9)
            log(f"train-lm {p.name}: step {done}/{total} loss {loss_v:.3f} "
                f"{tps:,.0f} tokens/s ({elapsed:.0f} s)")
        if elapsed > budget:
            log(f"train-lm {p.name}: stopping at step {done}/{total}: the {budget:g} s cap")
            break
    if not math.isfinite(loss_v):
        raise LMError(f"preset {p.name}: the training loss is {loss_v} after {done} steps")
    return done, loss_v


def train_lm(preset: str | LMPreset, out: str, *, seed: int = 0, steps: int | None = None,
             max_seconds: float | None = None, threads: int = 1,
             log: Callable[[str], None] | None = None) -> TrainedLM:
    """Train `preset`, save it under `out` and return it (eval mode); `.meta` is config.json's
    metadata (val_ppl, initial_val_ppl, the split, ...).

    `steps` and `max_seconds` override the preset's step count and wall-clock cap."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if steps is not None and steps < 1:
        raise LMError(f"steps={steps}: expected at least 1")
    if max_seconds is not None and max_seconds <= 0:
        raise LMError(f"--max-seconds {max_seconds}: expected a positive number of seconds")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    with torch_threads(threads):
        train_files, val_files, tok, train_ids, val_ids = _prepare(p, log)
        cfg = p.model
        if tok.get_vocab_size() != cfg.vocab_size:  # a small corpus may give fewer merges
            cfg = type(cfg)(**{**cfg.__dict__, "vocab_size": tok.get_vocab_size()})
        torch.manual_seed(seed)
        model = Llama(cfg)

        def val_ppl() -> tuple[float, int]:
            model.eval()
            try:
                return perplexity(model, val_ids, p.seq_len, p.batch, p.eval_windows)
            finally:
                model.train()

        initial_ppl, _ = val_ppl()
        total = steps or p.steps
        done, loss_v = _optimize(model.train(), p, train_ids, total,
                                 max_seconds or p.max_seconds, seed, log)
        final_ppl, scored = val_ppl()
    model.eval()
    root = stdlib_root()
    rel = [os.path.relpath(f, root) for f in train_files + val_files]
    meta = {
        "preset": p.name, "seed": seed, "steps": done, "train_loss": loss_v,
        "initial_val_ppl": initial_ppl, "val_ppl": final_ppl, "val_tokens_scored": scored,
        "seconds": time.perf_counter() - t0, "seq_len": p.seq_len, "batch": p.batch,
        "eos_id": tok.token_to_id(EOS), "train_tokens": len(train_ids),
        "validation_tokens": len(val_ids),
        "corpus": {"root": root, "train": rel[:len(train_files)],
                   "validation": rel[len(train_files):]},
        "params": sum(t.numel() for t in model.parameters()),
        "trained_with": f"torch {torch.__version__} eager, AdamW, {threads} thread(s)",
    }
    save_checkpoint(out, model, tok, meta)
    log(f"train-lm {p.name}: validation perplexity {final_ppl:.2f} (from {initial_ppl:.1f} "
        f"untrained) after {done} steps, {meta['seconds']:.0f} s; saved to {out}")
    return TrainedLM(model, tok, dict(meta, model_config=dataclasses.asdict(cfg)), out)


__all__ = ["lr_at", "train_lm", "train_tokenizer"]
