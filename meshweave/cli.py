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


from meshweave.cli_flags import CLIError  # noqa: E402,F401  (defined with the shared flags)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo model name (default {DEFAULT_MODEL}); `meshweave models` lists them")
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
    """Bytes this machine can still give (MemAvailable; total memory where there is none).
    MESHWEAVE_MEMORY_AVAILABLE (a size: 4GiB, 512MiB, or bytes) stands in for it, to see what
    the preflight says on a smaller machine."""
    from meshweave.env import memory_available

    override = memory_available()
    if override is not None:
        from meshweave.passes.remat.budget import MemoryBudget, RematError

        try:
            return MemoryBudget.parse(override).nbytes
        except RematError:
            raise CLIError(f"MESHWEAVE_MEMORY_AVAILABLE={override!r}: expected a size such as "
                           f"4GiB, 512MiB or a number of bytes") from None
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


# The activation preflight skips its meta-device trace (which costs about what the compile
# does) when the fp32 weights are under 1/8 of the memory available, --seq is at most
# PREFLIGHT_MAX_SEQ and batch x seq tokens at PREFLIGHT_BYTES_PER_TOKEN stay under 1/8 of it
# too: then weights + activations fit in a quarter of the memory. The zoo's largest peak per
# token at seq 2048 is llama-8b's 0.5 MiB (its 128k-entry logits and the attention scores).
PREFLIGHT_BYTES_PER_TOKEN = 2**20
PREFLIGHT_MAX_SEQ = 2048


def preflight_execution(name: str, batch: int, seq: int, num_layers: int | None = None,
                        training: bool = False, command: str = "compile") -> None:
    """Before a command materializes the weights and runs a call on them: the fp32 weights
    (twice when training: their gradients), the call's inputs and its peak live activation
    bytes, estimated from the IR traced on the meta device (runtime.memory.estimate_call_peak),
    against available_memory(). A lower bound (optimizer state and the backward's own peak are
    not counted): what it rejects cannot fit. Too big is one line and exit 2, with the
    command that works instead; nothing is allocated before it."""
    from meshweave.models import UnknownModelError, get_model_spec_with_layers

    try:
        spec = get_model_spec_with_layers(name, num_layers)
    except (UnknownModelError, ImportError, ValueError):
        return  # load_model reports it
    preflight(name, spec)  # the weights alone, before any trace
    have = available_memory()
    if (spec.param_count() * 4 < have / 8 and seq <= PREFLIGHT_MAX_SEQ
            and batch * seq * PREFLIGHT_BYTES_PER_TOKEN < have / 8):
        return  # small against the memory: no trace (the rule above)
    weights, inputs, acts = _meta_call_bytes(spec, batch, seq)
    grads = weights if training else 0
    need = weights + grads + inputs + acts
    if need <= have * 0.9:
        return
    parts = [f"{_size(weights)} fp32 weights"] + ([f"{_size(grads)} gradients"] if grads
                                                   else [])
    parts += [f"{_size(inputs)} inputs", f"{_size(acts)} peak activations"]
    shape = f" at --batch {batch} --seq {seq}"
    if acts + inputs >= weights + grads:  # activations dominate: split the batch over dp
        dp = 2
        while (weights + grads + (inputs + acts) / dp > have * 0.9 and dp < batch):
            dp *= 2
        instead = (f"use a smaller --batch/--seq, or see one rank of a data-parallel split: "
                   f"`meshweave dump --model {name} --batch {batch} --seq {seq} --what rank:0 "
                   f"--mesh dp={min(dp, max(batch, 1))}`")
    else:
        instead = (f"plan it on the meta device instead, e.g. "
                   f"`meshweave plan --model {name} --mesh 64`")
    raise CLIError(
        f"{name}{shape} needs about {_size(need)} to {command} ({' + '.join(parts)}, estimated "
        f"on the meta device), and {_size(have)} is available: {instead}")


def _meta_call_bytes(spec, batch: int, seq: int) -> tuple[int, int, int]:
    """(weight, input, peak activation) bytes of one inference call, traced on meta."""
    import meshweave
    from meshweave.ir.types import TensorType
    from meshweave.progress import step
    from meshweave.runtime.memory import estimate_call_peak

    with step("estimating the memory of one call on the meta device"):
        model = spec.build(device="meta").eval()
        graph = meshweave.compile(model, spec.example_inputs(batch=batch, seq=seq,
                                                             device="meta")).graph
    weights = inputs = 0
    for v in graph.inputs:
        n = v.type.nbytes() if isinstance(v.type, TensorType) else 0
        if v.kind in ("param", "buffer"):
            weights += n
        else:
            inputs += n
    return weights, inputs, estimate_call_peak(graph)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# `meshweave compile` fails above this max |meshweave - eager| (fp32 on the CPU is ~1e-6).
COMPILE_TOL = 1e-3


# Dumps and plans of models with more fp32 weight bytes than this trace on the meta device.
META_ABOVE_BYTES = 2**30


def compile_zoo_model(args, device: str = "cpu", execute: bool | None = None) -> object:
    """(model, inputs, CompiledModel) of --model. device="auto" (dumps and plans, which need
    shapes, not weights) traces a model whose fp32 weights exceed META_ABOVE_BYTES on the meta
    device, so that llama-70b compiles in about half a gigabyte; smaller ones trace on the CPU
    (their IR is what `compile` runs: on meta, SDPA's output layout adds a clone). `execute`
    (default: device="cpu") says the command will run the model: the memory preflight then
    counts one call's activations too (preflight_execution), before anything is built."""
    import meshweave
    from meshweave.cli_quant import quant_compile_options, quantization_hint
    from meshweave.ir.errors import MeshweaveError
    from meshweave.passes.quant import QuantizationError
    from meshweave.progress import step

    if execute is None:
        execute = device == "cpu"
    if device == "auto":
        device = "meta" if _weight_bytes(args) > META_ABOVE_BYTES else "cpu"
    if execute and device == "cpu":
        preflight_execution(args.model, args.batch, args.seq, getattr(args, "num_layers", None),
                            training=bool(getattr(args, "train", False)),
                            command=getattr(args, "command", None) or "run")
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
    from meshweave.cli_flags import add_planning_args
    from meshweave.cli_quant import add_quant_args

    _add_model_args(p)
    add_planning_args(p, shape_only=True)  # --batch and --seq: compile plans nothing
    add_quant_args(p)
    p.add_argument("--dump", metavar="DIR", help="write the IR after every pass under DIR")
    p.add_argument("--tol", type=float, default=COMPILE_TOL,
                   help=f"fail (exit 1) when |meshweave - eager| exceeds this (default "
                        f"{COMPILE_TOL:g})")


@command("compile", "trace, optimize and run a zoo model; compare with eager")(_setup_compile)
def _compile(args) -> int:
    import torch

    from meshweave.cli_flags import resolve_planning
    from meshweave.cli_quant import eager_references, reference_note

    resolve_planning(args, "compile")
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
    from meshweave.cli_flags import add_planning_args

    _add_model_args(p)
    add_planning_args(p)  # --mesh/--plan-file: for --what plan, rank:N and mlir --rank
    p.add_argument("--what", default="ir",
                   help="what to print: " + ", ".join(sorted(DUMPERS)) + " (rank:N for one "
                        "rank's program)")
    p.add_argument("--dialect", choices=["torch", "linalg", "stablehlo", "tosa"],
                   default="torch", help="MLIR dialect for --what mlir (default torch)")
    p.add_argument("--rank", type=int, default=None,
                   help="dump rank N's program of the plan for --mesh (default: unpartitioned)")
    p.add_argument("--memory-budget", default=None, metavar="B",
                   help="with --train: rematerialize under this budget, a fraction of the "
                        "activation bytes saving everything needs (0.3) or a size (2GiB)")
    p.add_argument("--tree", default=None, metavar="SPEC",
                   help="--what tree: Medusa paths such as '0; 1; 0,0' (default: a small tree)")
    p.add_argument("--medusa-heads", default=None, metavar="FILE",
                   help="--what tree: check the tree against these heads (train-heads --out)")


DUMPERS: dict[str, Callable] = {}


def dumper(name: str):
    def deco(fn):
        DUMPERS[name] = fn
        return fn

    return deco


@dumper("ir")
def _dump_ir(args) -> str:
    # the inference IR of a big model needs no weights (the training step still builds them)
    cm = compile_zoo_model(args, device="cpu" if getattr(args, "train", False) else "auto",
                           execute=False)[2]
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
    """The generated Triton module (backend="triton"; under the interpreter on CPU). Code
    generation needs shapes, not weights: a big model is traced on the meta device."""
    args.backend = "triton"
    cm = compile_zoo_model(args, device="auto")[2]
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
    _resolve_dump_flags(args, what)
    print(DUMPERS[what](args))
    return 0


def _resolve_dump_flags(args, what: str) -> None:
    """The planning flags (cli_flags.py) that this --what honours; the others are errors."""
    from meshweave.cli_flags import resolve_planning

    plans = what in ("plan", "rank") or (what == "mlir" and args.rank is not None)
    cannot = {}
    if not plans:
        for flag in ("--mesh", "--plan-file"):
            cannot[flag] = f"--what {args.what} has no plan (--what plan, rank:N, mlir --rank)"
    if what in ("mlir", "ops", "tree"):
        cannot["--train"] = f"--what {what} has no training step (--what ir, memory, plan)"
    if what != "tree":
        for flag in ("--tree", "--medusa-heads"):
            cannot[flag] = "only --what tree reads it"
    if what == "ops":
        for flag in ("--batch", "--seq"):
            cannot[flag] = "--what ops lists the op registry, no model"
    resolve_planning(args, "dump", unsupported=cannot,
                     needs="mesh|plan-file" if what in ("plan", "rank") else None)


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
                "meshweave.cli_lm", "meshweave.cli_generate", "meshweave.cli_heads"):
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
