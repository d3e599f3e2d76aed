"""The `meshweave` command line (also `python -m meshweave`).

Subcommands register themselves in COMMANDS: a name, an argparse setup function and a handler.
Errors that come from bad input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}
DEFAULT_MODEL = "gpt-tiny"


def command(name: str, help: str):
    def deco(setup: Callable):
        def register(handler: Callable):
            COMMANDS[name] = (help, setup, handler)
            return handler

        return register

    return deco


class CLIError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo model name (default {DEFAULT_MODEL}); `meshweave models` lists them")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length (default 16)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="the model's depth, when not the zoo config's")
    p.add_argument("--backend", choices=["eager", "triton"], default=None,
                   help="execution backend (default: triton on CUDA, eager on CPU)")


def load_model(name: str, batch: int, seq: int, device: str = "cpu",
               num_layers: int | None = None):
    from meshweave.models import UnknownModelError, get_model_spec_with_layers

    try:
        spec = get_model_spec_with_layers(name, num_layers)
    except UnknownModelError as e:
        raise CLIError(str(e).strip("'\"")) from None
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from None
    if device == "cpu":
        preflight(name, spec)
    model = spec.build(device=device)
    return spec, model.eval(), spec.example_inputs(batch=batch, seq=seq, device=device)


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable; total memory where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preflight(name: str, spec) -> None:
    """Before the weights are built: their bytes (counted on the meta device, fp32) against
    the memory available. Too big is one line and exit 2, with the command that works."""
    need = spec.param_count() * 4
    have = available_memory()
    if need > have * 0.9:
        raise CLIError(
            f"{name} needs at least {need / 2**30:.1f} GiB for its fp32 weights alone, and "
            f"{have / 2**30:.1f} GiB is available: plan it on the meta device instead, e.g. "
            f"`meshweave plan --model {name} --mesh 64`")


# `meshweave compile` fails above this max |meshweave - eager| (fp32 on the CPU is ~1e-6).
COMPILE_TOL = 1e-3


# Dumps and plans of models with more fp32 weight bytes than this trace on the meta device.
META_ABOVE_BYTES = 2**30


def compile_zoo_model(args, device: str = "cpu") -> object:
    """(model, inputs, CompiledModel) of --model. device="auto" (dumps and plans, which need
    shapes, not weights) traces a model whose fp32 weights exceed META_ABOVE_BYTES on the meta
    device, so that llama-70b compiles in about half a gigabyte; smaller ones trace on the CPU
    (their IR is what `compile` runs: on meta, SDPA's output layout adds a clone)."""
    import meshweave
    from meshweave.cli_quant import quant_compile_options, quantization_hint
    from meshweave.ir.errors import MeshweaveError
    from meshweave.passes.quant import QuantizationError
    from meshweave.progress import step

    if device == "auto":
        device = "meta" if _weight_bytes(args) > META_ABOVE_BYTES else "cpu"
    spec, model, inputs = load_model(args.model, args.batch, args.seq, device=device,
                                     num_layers=getattr(args, "num_layers", None))
    training = bool(getattr(args, "train", False))
    if training:
        model.train()
    quant, notes = quant_compile_options(args, inputs, getattr(spec.config, "vocab_size", None))
    for line in notes:
        print(line)
    budget = getattr(args, "memory_budget", None)
    if budget is not None and not training:
        raise CLIError("--memory-budget chooses what the backward recomputes: add --train")
    try:
        opts = meshweave.CompileOptions(backend=args.backend, dump_dir=getattr(args, "dump", None),
                                        training=training, memory_budget=_budget(budget),
                                        **quant)
    except MeshweaveError as e:
        raise CLIError(str(e)) from None
    with step(f"compiling {args.model}"):
        try:
            cm = meshweave.compile(model, inputs, options=opts)
        except QuantizationError as e:
            raise CLIError(quantization_hint(e, args.quantize)) from None
    return model, inputs, cm


def _weight_bytes(args) -> int:
    from meshweave.models import UnknownModelError, get_model_spec_with_layers

    try:
        spec = get_model_spec_with_layers(args.model, getattr(args, "num_layers", None))
    except (UnknownModelError, ImportError, ValueError):
        return 0  # load_model reports it
    return spec.param_count() * 4


def _budget(text: str | None):
    """--memory-budget 0.3 (a fraction) or 2GiB (a size), as CompileOptions takes it."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _setup_compile(p):
    from meshweave.cli_quant import add_quant_args

    _add_model_args(p)
    add_quant_args(p)
    p.add_argument("--dump", metavar="DIR", help="write the IR after every pass under DIR")
    p.add_argument("--tol", type=float, default=COMPILE_TOL,
                   help=f"fail (exit 1) when |meshweave - eager| exceeds this (default "
                        f"{COMPILE_TOL:g})")


@command("compile", "trace, optimize and run a zoo model; compare with eager")(_setup_compile)
def _compile(args) -> int:
    import torch

    from meshweave.cli_quant import eager_references, reference_note

    model, inputs, cm = compile_zoo_model(args)
    print(cm.explain())
    with torch.no_grad():
        got = cm(*inputs)
    errors = []  # with --quantize: against the dequantized weights (checked), then the original
    for label, expected in eager_references(model, cm, inputs):
        errors.append(_max_error(expected, got, where=f"{args.model}, meshweave against {label}"))
        print(f"max |meshweave - {label}| = {errors[-1]:.3e}{reference_note(label)}")
    err = errors[0]
    if not err <= args.tol:  # NaN fails too
        print(f"check FAILED: beyond --tol {args.tol:g}", file=sys.stderr)
        return 1
    return 0


def _max_error(expected, got, where: str = "") -> float:
    """Max |got - expected| over the tensor outputs, compared by position and count: a missing
    or extra output is a ComparisonError, not an error of 0."""
    from meshweave.runtime.compare import max_errors, tensor_leaves

    return max(max_errors(tensor_leaves(expected), tensor_leaves(got), where=where).values())


def _setup_dump(p):
    _add_model_args(p)
    p.add_argument("--what", default="ir",
                   help="what to print: " + ", ".join(sorted(DUMPERS)) + " (rank:N for one "
                        "rank's program)")
    p.add_argument("--dialect", choices=["torch", "linalg", "stablehlo", "tosa"],
                   default="torch", help="MLIR dialect for --what mlir (default torch)")
    p.add_argument("--rank", type=int, default=None,
                   help="dump rank N's program of the plan for --mesh (default: unpartitioned)")
    p.add_argument("--mesh", default=None, help="device mesh for --rank, e.g. 'tp=2' or 'pp=2'")
    p.add_argument("--plan-file", default=None, metavar="FILE",
                   help="--what plan / rank:N of this Plan JSON instead of one made for --mesh")
    p.add_argument("--train", action="store_true",
                   help="--what ir: compile the training step and print the forward and the "
                        "backward graph; --what memory: measure its memory")
    p.add_argument("--memory-budget", default=None, metavar="B",
                   help="with --train: rematerialize under this budget, a fraction of the "
                        "activation bytes saving everything needs (0.3) or a size (2GiB)")


DUMPERS: dict[str, Callable] = {}


def dumper(name: str):
    def deco(fn):
        DUMPERS[name] = fn
        return fn

    return deco


@dumper("ir")
def _dump_ir(args) -> str:
    # the inference IR of a big model needs no weights (the training step still builds them)
    cm = compile_zoo_model(args, device="cpu" if getattr(args, "train", False) else "auto")[2]
    return cm.joint.describe() if cm.joint is not None else str(cm.graph)


@dumper("memory")
def _dump_memory(args) -> str:
    """One training step's saved and peak bytes, measured and estimated (cm.memory_stats)."""
    if not getattr(args, "train", False):
        raise CLIError("--what memory measures a training step: add --train")
    _, inputs, cm = compile_zoo_model(args)
    stats = cm.memory_stats(*inputs)
    lines = [line.strip() for line in cm.explain().splitlines() if "rematerialization" in line]
    lines += [f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in stats.items()]
    return "\n".join(lines)


@dumper("kernels")
def _dump_kernels(args) -> str:
    """The generated Triton module (backend="triton"; under the interpreter on CPU)."""
    args.backend = "triton"
    cm = compile_zoo_model(args)[2]
    art = cm.artifacts["kernels"]
    return art.summary() + "\n\n" + art.module_source


@dumper("ops")
def _dump_ops(args) -> str:
    from meshweave.ir.registry import OPS, RuleTable, lookup

    lookup("aten.add.Tensor")
    lines = [f"{name}  [{info.category}]" for name, info in sorted(OPS.items())]
    for kind, table in sorted(RuleTable.tables.items()):
        lines.append(f"# {kind} rules: {len(table.rules)} ops")
    return "\n".join(lines)


@command("dump", "print an artifact of a compiled zoo model (the IR, ...)")(_setup_dump)
def _dump(args) -> int:
    what = args.what.split(":")[0]
    if what not in DUMPERS:
        raise CLIError(f"--what {args.what!r} is not known; choose from {sorted(DUMPERS)}")
    print(DUMPERS[what](args))
    return 0


@command("models", "list the model zoo")(lambda p: None)
def _models(args) -> int:
    from meshweave.models import get_model_spec, list_models

    for name in list_models():
        print(f"{name:22s} {get_model_spec(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="meshweave",
        description="meshweave: compile, plan and inspect PyTorch models. "
                    "Run `meshweave <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, setup, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
    return parser


def _load_plugins() -> None:
    """Commands of other components register themselves when their module is imported."""
    import importlib

    for mod in ("meshweave.cli_parallel", "meshweave.cli_artifacts", "meshweave.cli_run",
                "meshweave.cli_lm", "meshweave.cli_generate"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch's own deprecation notices (pytree internals) are not the user's business here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from meshweave.ir.errors import MeshweaveError

    try:
        return COMMANDS[args.command][2](args) or 0
    except (CLIError, MeshweaveError, ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"meshweave {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
