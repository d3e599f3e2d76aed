"""`meshweave generate`: compiled KV-cache generation from the command line.

    meshweave generate --model llama-tiny --prompt "1 2 3" --max-new-tokens 16
    meshweave generate --checkpoint ckpt/ --prompt "def main(" --method prompt_lookup

With --checkpoint (a `meshweave train-lm --out` directory) the prompt is text, encoded and
decoded with the checkpoint's tokenizer; with a zoo model it is token ids separated by spaces
or commas, or, when left out, random ids. A thin layer over meshweave.compile and
CompiledModel.generate (runtime/generate.py): it prints the new tokens (and text), then one
line of steps, accepted tokens per step, tokens/s and compile time.
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


@command("generate", "generate tokens with compiled prefill/decode programs and a KV cache")(
    _setup)
def _generate(args) -> int:
    import torch

    import meshweave
    from meshweave.progress import step

    model, ids, decode, eos = _load(args)
    if not ids:
        raise CLIError("--prompt holds no token")
    opts = meshweave.CompileOptions(backend=args.backend)
    example = (torch.tensor([ids], dtype=torch.int64),)
    with step("compiling"), torch.no_grad():
        cm = meshweave.compile(model, example, options=opts)
    medusa = {}
    if args.method == "medusa":
        from meshweave.passes.decoding import parse_tree_spec

        medusa = dict(medusa_heads=args.medusa_heads,
                      tree=parse_tree_spec(args.tree) if args.tree else None)
    try:
        out = cm.generate([ids], args.max_new_tokens, method=args.method, **medusa,
                          temperature=args.temperature, top_p=args.top_p, eos_token_id=eos,
                          seed=args.seed, num_draft=args.num_draft, cache_len=args.cache_len,
                          progress=True)
    except TypeError as e:
        raise CLIError(str(e)) from None
    tokens = out.tokens[0]
    print("prompt ids: " + " ".join(map(str, ids)))
    print("new ids: " + " ".join(map(str, tokens)))
    if decode is not None:
        print("text: " + decode(ids + tokens))
    print(f"{args.method}: {len(tokens)} tokens in {out.steps} steps, accepted/step "
          f"{out.accepted_per_step:.2f}, tokens/s {out.tokens_per_second:.1f}, compile "
          f"{out.compile_seconds:.1f} s")
    return 0
