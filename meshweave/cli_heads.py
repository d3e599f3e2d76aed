"""`meshweave train-heads` (Medusa-1 heads by self-distillation) and `dump --what tree`.

    meshweave train-heads --model llama-tiny --heads 3 --steps 300 --out heads.safetensors
    meshweave train-heads --checkpoint ckpt/ --heads 3 --out ckpt/medusa.safetensors
    meshweave dump --model llama-tiny --what tree --tree "0; 1; 0,0; 0,1; 1,0; 0,0,0"

train-heads compiles the model with meshweave.compile, generates greedy continuations of
prompts (random ids for a zoo model, whose weights are build_model's seeded ones; training-split
text for a checkpoint) with the CompiledModel's generate, and trains the heads on the frozen
backbone's hidden states to predict its own tokens two and more ahead (models/medusa.py
self_distill). It prints the loss
before and after and writes safetensors. Use the file with cm.generate(..., method="medusa",
medusa_heads=FILE).
"""

from __future__ import annotations

from meshweave.cli import CLIError, command, dumper


def _setup(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="zoo decoder LM (default llama-tiny)")
    src.add_argument("--checkpoint", default=None, metavar="DIR",
                     help="a directory written by `meshweave train-lm --out DIR`")
    p.add_argument("--heads", type=int, default=3, help="Medusa heads (default 3)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--out", required=True, metavar="FILE", help="safetensors file to write")
    p.add_argument("--prompts", type=int, default=64, metavar="N",
                   help="prompts generated from (default 64)")
    p.add_argument("--prompt-len", type=int, default=16, metavar="L", help="default 16")
    p.add_argument("--new-tokens", type=int, default=32, metavar="T",
                   help="greedy tokens generated per prompt (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="the prompts' seed (default 0)")


def _prompts(args):
    """(model, prompts): random ids for a zoo model, training text for a checkpoint."""
    import torch

    if args.checkpoint:
        from meshweave.cli_lm import _lm_modules

        small_lm, _ = _lm_modules()
        lm = small_lm.load_checkpoint(args.checkpoint)
        files = lm.files("train")
        texts = [small_lm.read_text(files[i % len(files)]) for i in range(args.prompts)]
        rows = [lm.encode(t[(i * 997) % max(1, len(t) - 400):][:400])[:args.prompt_len]
                for i, t in enumerate(texts)]
        return lm.model, [r for r in rows if r]
    from meshweave.models import UnknownModelError, build_model

    # build_model's seeded weights: the same model as build_model(name) elsewhere (a plain
    # spec.build() draws new random weights each time, which no heads would fit)
    try:
        model, _ = build_model(args.model or "llama-tiny", batch=1, seq=8)
    except UnknownModelError as e:
        raise CLIError(str(e).strip("'\"")) from None
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    return model, [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.prompts)]


def _check_args(args) -> None:
    for flag, value in (("--heads", args.heads), ("--steps", args.steps),
                        ("--prompts", args.prompts), ("--prompt-len", args.prompt_len),
                        ("--new-tokens", args.new_tokens)):
        if value < 1:
            raise CLIError(f"{flag} {value}: expected at least 1")
    if not args.lr > 0:
        raise CLIError(f"--lr {args.lr}: expected > 0")


@command("train-heads", "train Medusa heads on a decoder's own greedy generations")(_setup)
def _train_heads(args) -> int:
    import torch

    import meshweave
    from meshweave.models.medusa import save_heads, self_distill

    _check_args(args)
    model, prompts = _prompts(args)
    if not hasattr(model, "lm_head"):
        raise CLIError(f"train-heads: {args.model} is not a rotary decoder LM (llama-tiny, a "
                       f"train-lm checkpoint)")
    with torch.no_grad():
        cm = meshweave.compile(model, (torch.tensor([prompts[0]], dtype=torch.int64),))

    def generate(rows, n):
        return cm.generate(rows, n, method="greedy", max_batch=max(64, len(rows))).tokens

    heads, losses = self_distill(generate, model, prompts, num_heads=args.heads,
                                 steps=args.steps, new_tokens=args.new_tokens, lr=args.lr)
    save_heads(heads, args.out)
    print(f"train-heads: {args.heads} heads on {len(prompts)} greedy generations of "
          f"{args.new_tokens} tokens; loss {losses[0]:.4f} -> {losses[-1]:.4f} in "
          f"{args.steps} steps")
    print(f"heads: {args.out}")
    return 0


@dumper("tree")
def _dump_tree(args) -> str:
    """The token tree of --tree (default: default_tree for --medusa-heads' head count, or 3):
    its nodes, their depth, head, choice and parent, the mask rows and the leaf paths."""
    from meshweave.passes.decoding import build_tree, default_tree, parse_tree_spec

    heads = None
    if getattr(args, "medusa_heads", None):
        from meshweave.models.medusa import load_heads

        heads = load_heads(args.medusa_heads)
    num_heads = heads.num_heads if heads is not None else None
    text = getattr(args, "tree", None)
    spec = parse_tree_spec(text) if text else default_tree(num_heads or 3)
    tree = build_tree(spec, num_heads=num_heads)
    where = f" (heads: {args.medusa_heads}, {num_heads})" if heads is not None else ""
    return f"# {args.model}{where}\n" + tree.render()
