"""Held-out perplexity of weight-only quantization on a really trained model (issue 15 item 5).

    python benchmarks/quant_accuracy.py                       # trains the tiny preset to /tmp
    python benchmarks/quant_accuracy.py --checkpoint DIR      # a `meshweave train-lm` output
    python benchmarks/quant_accuracy.py --preset draft --out DIR   # train another preset first

The model is the small LM trained on the Python stdlib's sources (models/small_lm.py; every
linear's K is a multiple of 128, so g128 has real groups). Each configuration goes through
meshweave.compile(model, args, options=CompileOptions(quantize=QuantConfig(...),
calibration=[...])); GPTQ's calibration batches are windows of the training files, and the
perplexity is that of the compiled model over the validation files (held out by file, never
seen by the tokenizer, the optimizer or the calibration). One line per configuration:
`CONFIG: ppl P (x.xx of fp32)`, then `gptq beats rtn at 4 bits: yes|no; at 3 bits: yes|no`
(yes: GPTQ's perplexity is below RTN's at every grouping measured for that width).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, bits, group_size or None for per channel, method)
CONFIGS = [
    ("int8 w8c rtn", 8, None, "rtn"),
    ("int4 w4g128 rtn", 4, 128, "rtn"),
    ("int4 w4c rtn", 4, None, "rtn"),
    ("int4 w4g128 gptq", 4, 128, "gptq"),
    ("int4 w4c gptq", 4, None, "gptq"),
    ("int3 w3g128 rtn", 3, 128, "rtn"),
    ("int3 w3c rtn", 3, None, "rtn"),
    ("int3 w3g128 gptq", 3, 128, "gptq"),
    ("int3 w3c gptq", 3, None, "gptq"),
]


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a `meshweave train-lm` directory")
    p.add_argument("--preset", default="tiny", help="preset to train without --checkpoint")
    p.add_argument("--out", default=None, help="where to train it (default: a /tmp folder)")
    p.add_argument("--calibration", type=int, default=16,
                   help="GPTQ calibration batches from the training files (default 16)")
    p.add_argument("--batch", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--windows", type=int, default=1024,
                   help="most validation windows scored (default 1024)")
    p.add_argument("--act-order", action="store_true", help="GPTQ with act_order=True")
    p.add_argument("--skip", default="", help="comma-separated parameter names left in fp32, "
                                              "e.g. lm_head")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON")
    return p.parse_args(argv)


def load_or_train(args):
    from meshweave.models.small_lm import load_checkpoint
    from meshweave.models.train_lm import train_lm

    directory = args.checkpoint
    if directory is None:
        directory = args.out or tempfile.mkdtemp(prefix=f"small_lm_{args.preset}_")
        meta = train_lm(args.preset, directory, log=lambda s: None).meta
        print(f"trained {args.preset}: {meta['steps']} steps in {meta['seconds']:.1f} s, "
              f"validation ppl {meta['val_ppl']:.2f} (eager); checkpoint {directory}")
    return load_checkpoint(directory)


def measure(lm, args) -> dict[str, float]:
    import torch
    from meshweave.models.small_lm import perplexity

    import meshweave

    example = lm.example_inputs(batch=args.batch, split="train", seed=0)
    calibration = lm.calibration_batches(args.calibration, batch=args.batch, split="train",
                                         seed=1)
    val = lm.token_stream("validation")
    skip = tuple(s for s in args.skip.split(",") if s)
    results: dict[str, float] = {}

    def score(label: str, options) -> None:
        t0 = time.perf_counter()
        cm = meshweave.compile(lm.model, example, options=options)
        ppl, n = perplexity(cm, val, lm.seq_len, args.batch, args.windows)
        results[label] = ppl
        rel = ppl / results.get("fp32", ppl)
        print(f"{label}: ppl {ppl:.3f} ({rel:.2f} of fp32)   [{n} tokens, "
              f"{time.perf_counter() - t0:.1f} s]", flush=True)

    with torch.no_grad():
        eager, _ = perplexity(lm.model, val, lm.seq_len, args.batch, args.windows)
    score("fp32", meshweave.CompileOptions())
    if abs(results["fp32"] / eager - 1) > 1e-4:
        raise SystemExit(f"compiled fp32 perplexity {results['fp32']:.4f} differs from eager "
                         f"{eager:.4f}: the compiled model does not match eager")
    for label, bits, group, method in CONFIGS:
        cfg = meshweave.QuantConfig(bits=bits, group_size=group, method=method, skip=skip,
                                    act_order=args.act_order and method == "gptq")
        score(label, meshweave.CompileOptions(
            quantize=cfg, calibration=calibration if method == "gptq" else None))
    return results


def gptq_beats_rtn(results: dict[str, float], bits: int) -> bool:
    pairs = [(results[g], results[r]) for g in results for r in results
             if g.startswith(f"int{bits} ") and g.endswith(" gptq")
             and r == g[: -len("gptq")] + "rtn"]
    return bool(pairs) and all(g < r for g, r in pairs)


def main(argv=None) -> int:
    args = _args(argv)
    t0 = time.perf_counter()
    lm = load_or_train(args)
    m = lm.meta
    print(f"model: preset {m['preset']}, {m['params']:,} parameters, "
          f"{len(m['corpus']['train'])} train / {len(m['corpus']['validation'])} validation "
          f"files; calibration {args.calibration} x {args.batch} x {lm.seq_len} training tokens")
    results = measure(lm, args)
    yes = {b: "yes" if gptq_beats_rtn(results, b) else "no" for b in (4, 3)}
    print(f"gptq beats rtn at 4 bits: {yes[4]}; at 3 bits: {yes[3]}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": lm.directory, "preset": m["preset"], "ppl": results,
                       "calibration_batches": args.calibration, "act_order": args.act_order},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
