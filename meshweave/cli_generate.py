"""`meshweave generate`: compiled KV-cache generation from the command line.

    meshweave generate --model llama-tiny --prompt "1 2 3" --max-new-tokens 16
    meshweave generate --checkpoint ckpt/ --prompt "def main(" --method prompt_lookup
    meshweave generate --model llama-tiny --batch 16 --memory-gib 0.001 --check

With --checkpoint (a `meshweave train-lm --out` directory) the prompt is text, encoded and
decoded with the checkpoint's tokenizer; with a zoo model it is token ids separated by spaces
or commas, or, when left out, random ids. A thin layer over meshweave.compile and
CompiledModel.generate (runtime/generate.py): it prints the new tokens (and text), then one
line of steps, accepted tokens per step, tokens/s and compile time. With --memory-gib it
prints the hybrid placement (how many sequences keep their KV cache on the CPU) and the GPU
and CPU busy fractions; --check also runs the device-only plan and compares the tokens.
"""

from __future__ import annotations

from meshweave.cli import CLIError, command


def _setup(p) -> None:
    from meshweave.runtime.generate import METHODS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="zoo decoder LM (default llama-tiny)")
    src.add_argument("--checkpoint", default=None, metavar="DIR",
                     help="a directory written by `meshweave train-lm --out DIR`")
    p.add_argument("--prompt", default=None,
                   help="text (--checkpoint) or token ids such as '1 2 3' (--model); default: "
                        "8 random ids / the start of a validation file")
    p.add_argument("--method", choices=METHODS, default="greedy", help="default greedy")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default 32")
    p.add_argument("--temperature", type=float, default=1.0, help="--method sample (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="--method sample (default 1)")
    p.add_argument("--seed", type=int, default=0, help="--method sample's seed (default 0)")
    p.add_argument("--num-draft", type=int, default=4, metavar="K",
                   help="tokens drafted per step by prompt_lookup / jacobi (default 4)")
    p.add_argument("--medusa-heads", default=None, metavar="FILE",
                   help="--method medusa: heads from `meshweave train-heads --out FILE`")
    p.add_argument("--tree", default=None, metavar="SPEC",
                   help="--method medusa: tree paths such as '0; 1; 0,0' (default: small tree)")
    p.add_argument("--cache-len", type=int, default=None, metavar="C",
                   help="KV-cache slots per sequence (default the model's max_seq_len)")
    p.add_argument("--backend", choices=["eager", "triton"], default=None,
                   help="execution backend (default: triton on CUDA, eager on CPU)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="sequences generated together (default 1); without --prompt, random "
                        "prompts of 4..16 ids, with one, N copies of it")
    p.add_argument("--memory-gib", type=float, default=None, metavar="G",
                   help="device memory generation may use: when the batch's KV caches do not "
                        "fit, some stay on the CPU (hybrid CPU-GPU execution)")
    p.add_argument("--spec", default=None, metavar="SPEC",
                   help="hardware preset or `meshweave calibrate` JSON for the hybrid plan "
                        "(default h100 on CUDA, cpu otherwise)")
    p.add_argument("--plan-out", default=None, metavar="FILE",
                   help="with --memory-gib: write the offload plan (and the run's scheduler "
                        "figures) as JSON, for `meshweave report --offload FILE`")
    p.add_argument("--check", action="store_true",
                   help="with --memory-gib: also run the device-only plan and exit 1 on any "
                        "token that differs (greedy)")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt {text!r}: with --model, expected token ids such as '1 2 3' "
                       f"(text prompts need --checkpoint and its tokenizer)") from None


def _load(args):
    """(model, prompt ids, decode function or None, eos id or None)."""
    import torch

    if args.checkpoint:
        from meshweave.cli_lm import _lm_modules

        small_lm, _ = _lm_modules()
        lm = small_lm.load_checkpoint(args.checkpoint)
        text = args.prompt
        if text is None:
            text = small_lm.read_text(lm.files("validation")[0])[:200]
        ids = lm.encode(text)
        if not ids:
            raise CLIError(f"--prompt {text!r} encodes to no tokens")
        return lm.model, ids, lm.decode, lm.tokenizer.token_to_id(small_lm.EOS)
    from meshweave.cli import load_model

    spec, model, _ = load_model(args.model or "llama-tiny", 1, 8)
    if args.prompt is not None:
        ids = _token_ids(args.prompt)
    else:
        ids = torch.randint(0, spec.config.vocab_size, (8,),
                            generator=torch.Generator().manual_seed(args.seed)).tolist()
    return model, ids, None, None


def _batch(args, ids: list[int], vocab: int) -> list[list[int]]:
    """--batch prompts: the one given (N copies), or seeded random ones of 4..16 ids."""
    import torch

    if args.batch == 1 or args.prompt is not None:
        return [list(ids) for _ in range(args.batch)]
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(4, 17, (args.batch,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@command("generate", "generate tokens with compiled prefill/decode programs and a KV cache")(
    _setup)
def _generate(args) -> int:
    import torch

    import meshweave
    from meshweave.progress import step

    model, ids, decode, eos = _load(args)
    if not ids:
        raise CLIError("--prompt holds no token")
    if args.batch < 1:
        raise CLIError(f"--batch {args.batch}: expected a positive number of sequences")
    needs_cap = [o for o, v in (("--check", args.check), ("--spec", args.spec),
                                ("--plan-out", args.plan_out)) if v]
    if args.memory_gib is None and needs_cap:
        raise CLIError(f"{needs_cap[0]} goes with --memory-gib (the hybrid plan it checks, "
                       f"plans on or writes)")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise CLIError(f"--memory-gib {args.memory_gib}: expected a positive size in GiB")
    if args.check and args.method != "greedy":
        raise CLIError(f"--check compares greedy tokens; --method {args.method} samples")
    prompts = _batch(args, ids, int(model.config.vocab_size))
    limit = args.memory_gib * 2**30 if args.memory_gib is not None else None
    opts = meshweave.CompileOptions(backend=args.backend, memory_limit=limit, hardware=args.spec)
    example = (torch.tensor([ids], dtype=torch.int64),)
    with step("compiling"), torch.no_grad():
        cm = meshweave.compile(model, example, options=opts)
    medusa = {}
    if args.method == "medusa":
        from meshweave.passes.decoding import parse_tree_spec

        medusa = dict(medusa_heads=args.medusa_heads,
                      tree=parse_tree_spec(args.tree) if args.tree else None)
    gen = dict(method=args.method, temperature=args.temperature, top_p=args.top_p,
               eos_token_id=eos, seed=args.seed, cache_len=args.cache_len, progress=True)
    if args.method in ("prompt_lookup", "jacobi", "sjd"):
        gen["num_draft"] = args.num_draft
    try:
        out = cm.generate(prompts, args.max_new_tokens, **medusa, **gen)
    except TypeError as e:
        raise CLIError(str(e)) from None
    if out.offload:
        print(out.offload["placement"])
        if "progress" in out.offload:
            print(f"hybrid: {out.offload['progress']}")
    if args.plan_out:
        import json

        doc = {"offload": out.offload["plan"]}
        if "scheduler" in out.offload:
            doc["scheduler"] = out.offload["scheduler"]
        with open(args.plan_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.plan_out} (meshweave report --offload {args.plan_out})")
    if args.check:
        plain = meshweave.compile(model, example, options=opts.replace(memory_limit=None))
        cache_len = args.cache_len or out.offload["plan"]["capacity"] - 1
        ref = plain.generate(prompts, args.max_new_tokens, **{**gen, "cache_len": cache_len,
                                                             "progress": False})
        bad = [b for b in range(len(prompts)) if ref.tokens[b] != out.tokens[b]]
        if bad:
            b = bad[0]
            print(f"check: FAILED: {len(bad)} of {len(prompts)} sequences differ from the "
                  f"device-only plan; sequence {b}: {out.tokens[b]} vs {ref.tokens[b]}")
            return 1
        print(f"check: ok, {out.new_tokens} tokens of {len(prompts)} sequences equal the "
              f"device-only plan's")
    tokens = out.tokens[0]
    print("prompt ids: " + " ".join(map(str, prompts[0])))
    print("new ids: " + " ".join(map(str, tokens)))
    if decode is not None:
        print("text: " + decode(ids + tokens))
    print(f"{args.method}: {out.new_tokens} tokens in {out.steps} steps, accepted/step "
          f"{out.accepted_per_step:.2f}, tokens/s {out.tokens_per_second:.1f}, compile "
          f"{out.compile_seconds:.1f} s")
    return 0
