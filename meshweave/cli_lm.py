"""`meshweave train-lm` and `meshweave lm-eval`: the small LM trained on the stdlib's sources.

    meshweave train-lm --preset tiny --out ckpt/            # seconds; draft ~5 min, small <= 15
    meshweave lm-eval --checkpoint ckpt/                    # compile it, compare with eager
    meshweave lm-eval --checkpoint ckpt/ --quantize w4g128 --method gptq   # quantized perplexity

train-lm prints its progress (steps, loss, tokens/s), then `validation perplexity: P (N tokens,
F files held out)` and the checkpoint directory. lm-eval compiles the checkpoint's model with
meshweave.compile on real token windows, checks it against eager (unquantized) and prints the
validation perplexity of both. GPTQ calibration batches come from the training files only.
The presets and the checkpoint format are in models/small_lm.py.
"""

from __future__ import annotations

import sys

from meshweave.cli import CLIError, command

COMPILE_TOL = 1e-3  # fp32 logits of magnitude ~10: meshweave vs eager measured ~1e-5


def _lm_modules():
    """models.small_lm / models.train_lm, or a one-line error naming the missing extra."""
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the small LM needs the `lm` extra ({e.name} is not installed): "
                       f"pip install 'meshweave[lm]'") from None
    from meshweave.models import small_lm, train_lm

    return small_lm, train_lm


def _setup_train(p) -> None:
    p.add_argument("--preset", default="tiny",
                   help="tiny (seconds), draft (~5 min) or small (<= 15 min on 2 cores); "
                        "default tiny")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="wall-clock cap on the optimizer loop (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and batches (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest on a shared small machine)")


@command("train-lm", "train the small LM on the Python stdlib's sources; save a checkpoint")(
    _setup_train)
def _train(args) -> int:
    small_lm, train_lm = _lm_modules()
    preset = small_lm.get_preset(args.preset)
    if args.threads < 1:
        raise CLIError(f"--threads {args.threads}: expected at least 1")
    meta = train_lm.train_lm(preset, args.out, seed=args.seed, steps=args.steps,
                             max_seconds=args.max_seconds, threads=args.threads,
                             log=lambda s: print(s, flush=True)).meta
    print(f"validation perplexity: {meta['val_ppl']:.2f} ({meta['val_tokens_scored']} tokens, "
          f"{len(meta['corpus']['validation'])} files held out)")
    print(f"checkpoint: {args.out}")
    return 0


def compile_checkpoint(lm, *, quantize=None, calibration: int = 8, batch: int = 8,
                       backend: str | None = None):
    """meshweave.compile of a TrainedLM's model on a [batch, seq_len] window of its training
    text, quantized by `quantize` (a QuantConfig) with `calibration` training-split batches
    for GPTQ. Returns (compiled model, example args)."""
    import meshweave

    args = lm.example_inputs(batch=batch, split="train", seed=0)
    cal = None
    if quantize is not None and quantize.method == "gptq":
        cal = lm.calibration_batches(calibration, batch=batch, split="train", seed=1)
    opts = meshweave.CompileOptions(backend=backend, quantize=quantize, calibration=cal)
    return meshweave.compile(lm.model, args, options=opts), args


def _setup_eval(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a directory written by `meshweave train-lm --out DIR`")
    p.add_argument("--quantize", default=None, metavar="SPEC",
                   help="weight-only quantization, w<bits>g<group> or w<bits>c, e.g. w4g128")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="with --quantize: rtn or gptq (default rtn)")
    p.add_argument("--calibration", type=int, default=8,
                   help="GPTQ calibration batches from the training files (default 8)")
    p.add_argument("--batch", type=int, default=8, help="rows per compiled call (default 8)")
    p.add_argument("--windows", type=int, default=256,
                   help="most validation windows scored (default 256)")
    p.add_argument("--backend", choices=["eager", "triton"], default=None,
                   help="execution backend (default: triton on CUDA, eager on CPU)")


@command("lm-eval", "compile a train-lm checkpoint (optionally quantized); validation perplexity")(
    _setup_eval)
def _eval(args) -> int:
    import torch

    import meshweave

    small_lm, _ = _lm_modules()
    lm = small_lm.load_checkpoint(args.checkpoint)
    quant = None
    if args.quantize:
        quant = meshweave.QuantConfig.parse(args.quantize, method=args.method)
    cm, example = compile_checkpoint(lm, quantize=quant, calibration=args.calibration,
                                     batch=args.batch, backend=args.backend)
    with torch.no_grad():
        err = float((cm(*example) - lm.model(*example)).abs().max())
    tag = f"{quant.tag} {quant.method}" if quant else "fp32"
    print(f"max |meshweave ({tag}) - eager fp32| = {err:.3e}")
    stream = lm.token_stream("validation")
    base, n = small_lm.perplexity(lm.model, stream, lm.seq_len, args.batch, args.windows)
    got, _ = small_lm.perplexity(cm, stream, lm.seq_len, args.batch, args.windows)
    print(f"validation perplexity: eager fp32 {base:.2f}, meshweave {tag} {got:.2f} "
          f"({got / base:.3f} of fp32; {n} tokens)")
    if quant is None and not err <= COMPILE_TOL:  # NaN fails too
        print(f"check FAILED: beyond {COMPILE_TOL:g}", file=sys.stderr)
        return 1
    return 0
