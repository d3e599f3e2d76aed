"""Decoding methods against plain greedy, in one run: accepted tokens per step and tokens/s.

    python benchmarks/decode_bench.py                    # llama-tiny, random weights
    python benchmarks/decode_bench.py --checkpoint DIR   # a `meshweave train-lm` checkpoint:
                                                         # prompts from its validation files
    python benchmarks/decode_bench.py --medusa-heads FILE --tree "0; 1; 0,0; 0,0,0"

Prints one line per method and batch: `METHOD batch B: accepted/step A, tokens/s T, speedup S`
(A: mean tokens a sequence keeps per compiled step; S: tokens/s against greedy's, same run).
Each method runs once to compile its programs, then once timed. The llama-tiny prompts repeat
themselves (edit-style: the output copies the context), which is where prompt lookup pays.
medusa uses --medusa-heads FILE (`meshweave train-heads --out FILE`), or trains heads first by
self-distillation on the model's own greedy continuations of other prompts (training files).
sjd (speculative Jacobi decoding) samples at --temperature (default 1); it runs beside plain
`sample` at the same temperature, its baseline: its speedup is against `sample`'s tokens/s, and
there is no exactness check for the sampling methods (their tokens are random draws;
tests/test_sjd.py checks that their distributions agree).
"""

from __future__ import annotations

import argparse

import torch

import meshweave

METHODS = ("greedy", "prompt_lookup", "jacobi", "medusa", "sjd")
_HEADS: dict = {}


def prompts_for(args, batch: int):
    if args.checkpoint:
        from meshweave.models.small_lm import load_checkpoint, read_text

        lm = load_checkpoint(args.checkpoint)
        files = lm.files("validation")
        texts = [read_text(files[i % len(files)])[:160] for i in range(batch)]
        return lm.model, [lm.encode(t)[:args.prompt_len] for t in texts]
    from meshweave.models import build_model

    model, _ = build_model("llama-tiny", batch=1, seq=8)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        motif = torch.randint(0, 128, (5,), generator=g).tolist()
        rows.append((motif * 8)[:args.prompt_len])
    return model, rows


def train_prompts(args, count: int = 64) -> list[list[int]]:
    """Prompts the heads train on: training-split text, or random and repeating ids."""
    if args.checkpoint:
        from meshweave.models.small_lm import load_checkpoint, read_text

        lm = load_checkpoint(args.checkpoint)
        files = lm.files("train")
        rows = [lm.encode(read_text(files[i % len(files)])[(i * 397) % 2000:][:400])
                for i in range(count)]
        return [r[:args.prompt_len] for r in rows if r]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 128, (args.prompt_len,), generator=g).tolist()
            for _ in range(count // 2)]
    for _ in range(count - count // 2):
        motif = torch.randint(0, 128, (5,), generator=g).tolist()
        rows.append((motif * 8)[:args.prompt_len])
    return rows


def medusa_heads(args, cm, model):
    """--medusa-heads, or heads trained here once (the same weights at every batch size)."""
    from meshweave.models.medusa import load_heads, self_distill

    if args.medusa_heads:
        return _HEADS.setdefault("file", load_heads(args.medusa_heads))
    if "trained" not in _HEADS:
        heads, losses = self_distill(
            lambda rows, n: cm.generate(rows, n, method="greedy").tokens, model,
            train_prompts(args), num_heads=args.heads, steps=args.heads_steps,
            new_tokens=args.max_new_tokens)
        print(f"medusa: trained {args.heads} heads, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              flush=True)
        _HEADS["trained"] = heads
    return _HEADS["trained"]


def bench_sjd(cm, prompts, args, batch: int) -> None:
    """sjd against plain `sample` at --temperature (seeded); no exactness check."""
    runs = {}
    for method in ("sample", "sjd"):
        kw = dict(method=method, num_draft=args.num_draft, temperature=args.temperature, seed=0)
        cm.generate(prompts, args.max_new_tokens, **kw)  # compiles
        runs[method] = out = cm.generate(prompts, args.max_new_tokens, **kw)
        speed = out.tokens_per_second / runs["sample"].tokens_per_second
        print(f"{method} batch {batch}: accepted/step {out.accepted_per_step:.2f}, tokens/s "
              f"{out.tokens_per_second:.1f}, speedup {speed:.2f} (against sample at "
              f"temperature {args.temperature}; sampled: no exactness check)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, metavar="DIR")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--medusa-heads", default=None, metavar="FILE")
    p.add_argument("--heads", type=int, default=3, help="heads to train without --medusa-heads")
    p.add_argument("--heads-steps", type=int, default=300)
    p.add_argument("--tree", default=None, help="medusa tree spec (default: a small tree)")
    p.add_argument("--temperature", type=float, default=1.0, help="sjd's and sample's")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "greedy":
        methods.insert(0, "greedy")  # the baseline runs first, in the same run
    torch.set_num_threads(1)
    for batch in (int(b) for b in args.batches.split(",")):
        model, prompts = prompts_for(args, batch)
        with torch.no_grad():
            cm = meshweave.compile(model, (torch.tensor([prompts[0]]),))
        base = None
        for method in methods:
            if method == "sjd":
                bench_sjd(cm, prompts, args, batch)
                continue
            kw = dict(method=method, num_draft=args.num_draft)
            if method == "medusa":
                from meshweave.passes.decoding import parse_tree_spec

                kw = dict(method=method, medusa_heads=medusa_heads(args, cm, model),
                          tree=parse_tree_spec(args.tree) if args.tree else None)
            cm.generate(prompts, args.max_new_tokens, **kw)  # compiles
            out = cm.generate(prompts, args.max_new_tokens, **kw)
            base = base or out
            if out.tokens != base.tokens:
                raise SystemExit(f"{method} batch {batch}: tokens differ from greedy")
            print(f"{method} batch {batch}: accepted/step {out.accepted_per_step:.2f}, "
                  f"tokens/s {out.tokens_per_second:.1f}, speedup "
                  f"{out.tokens_per_second / base.tokens_per_second:.2f}", flush=True)


if __name__ == "__main__":
    main()
