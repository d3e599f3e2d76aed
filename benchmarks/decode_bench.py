"""Decoding methods against plain greedy, in one run: accepted tokens per step and tokens/s.

    python benchmarks/decode_bench.py                    # llama-tiny, random weights
    python benchmarks/decode_bench.py --checkpoint DIR   # a `meshweave train-lm` checkpoint:
                                                         # prompts from its validation files

Prints one line per method and batch: `METHOD batch B: accepted/step A, tokens/s T, speedup S`
(A: mean tokens a sequence keeps per compiled step; S: tokens/s against greedy's, same run).
Each method runs once to compile its programs, then once timed. The llama-tiny prompts repeat
themselves (edit-style: the output copies the context), which is where prompt lookup pays.
"""

from __future__ import annotations

import argparse

import torch

import meshweave

METHODS = ("greedy", "prompt_lookup", "jacobi")


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, metavar="DIR")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--num-draft", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    for batch in (int(b) for b in args.batches.split(",")):
        model, prompts = prompts_for(args, batch)
        with torch.no_grad():
            cm = meshweave.compile(model, (torch.tensor([prompts[0]]),))
        base = None
        for method in METHODS:
            kw = dict(method=method, num_draft=args.num_draft)
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
