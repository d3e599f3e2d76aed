"""The planning flags every planning command shares: `plan`, `report`, `run`, `export`, `dump`.

`add_planning_args(parser)` adds the argument group "planning" (same names, dests, types,
help texts and defaults on every command; tests/test_cli_flags.py keeps them from drifting):

    --mesh M           a device count ('64': the planner picks pp x dp x tp) or a shape ('2x4',
                       'dp=2,tp=4'); default none
    --spec S           hardware preset (h100, h200, a100, t4, ascend910, cpu) or a spec JSON path
    --train            plan (run, dump) a training step
    --batch N          global batch per step
    --seq N            sequence length
    --dtype D          float16, bfloat16 or float32
    --memory-gib G     memory per device a plan may use
    --micro-batches N  pipeline micro-batches
    --plan-file FILE   a saved Plan JSON (`meshweave plan --out FILE`) instead of --mesh

Every default is None (--train: False), so "not given" can be told from any value; one
function, `resolve_planning(args, command, ...)`, replaces the Nones, the same way for every
command (each command says only what it cannot honour in this invocation):

  --batch   --plan-file: the batch the plan was made for (a run must use it). Otherwise the
            model's example batch (ModelSpec.example_inputs' default, 2) raised so the mesh can
            split it: for a mesh whose dp/pp layout is fixed (axes named dp/tp/pp, `run --plan`
            grids) the smallest multiple of dp x micro-batches (micro-batches not given: pp,
            so that a pipeline has a micro-batch per stage); for a searched mesh (a count,
            unnamed axes, and every mesh of `plan`) one example per device of a node, up to
            the device count (min(devices, the spec's devices_per_node): 8 for every preset),
            so that the planner can place data-parallel replicas (`plan --mesh 64` of gpt-tiny
            needs a batch of 8; 2 has no configuration). This keeps `plan`'s old default of 8
            on big meshes, `run --mesh 2 --pp 2 --plan dpxpp --micro-batches 2`'s 4, and
            compile/export/dump/report's 2 without a mesh or on small ones.
  --seq     --plan-file: the plan's (`meshweave plan` records it). Otherwise the model's
            example sequence length (ModelSpec.example_inputs' default, 16), at most the
            model's max_seq_len. (`plan` used to default to 1024, which every model of
            the zoo's tiny ones rejected: gpt-tiny's max_seq_len is 32.)
  --spec    h100 (what every command already planned for).
  --dtype   float16 for `plan`, which only costs a meta-device trace (mixed precision, as
            before); the other commands build and run the model in float32 on the CPU, so
            float32 is all they take (another value is an error naming the flag).
  --micro-batches  a pipelined fixed layout (pp > 1): one micro-batch per example of a
            data-parallel shard (batch // dp: `report --mesh dp=2,tp=2,pp=2` plans a batch of 4
            in 2 micro-batches; `report` used "one per example", 2 of a batch of 2, which a
            dp=2 shard cannot hold whole); otherwise 1.
            A searched plan chooses its own: giving the flag there is an error.
  --memory-gib  the spec's usable memory. `plan` searches under it; `report` searches under it
            (a searched mesh) and draws its memory bars against it.
  --mesh, --plan-file  at most one of them; `plan` needs --mesh, `report` and `run` one of the
            two; `export` and `dump` partition only when given one.

A flag a command cannot honour in an invocation is a one-line error naming the flag and the
command, never ignored. The old spellings of `report` (--hardware, --training,
--capacity-gib) stay as hidden aliases of --spec, --train and --memory-gib: same dest, a
deprecation note on stderr.
"""

from __future__ import annotations

import argparse
import inspect
import sys



class CLIError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""

DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_SPEC = "h100"

# the flags of the group, as (option, dest), in --help order
PLANNING_FLAGS = (
    ("--mesh", "mesh"),
    ("--spec", "spec"),
    ("--train", "train"),
    ("--batch", "batch"),
    ("--seq", "seq"),
    ("--dtype", "dtype"),
    ("--memory-gib", "memory_gib"),
    ("--micro-batches", "micro_batches"),
    ("--plan-file", "plan_file"),
)
DEPRECATED_ALIASES = {"--hardware": "--spec", "--training": "--train",
                      "--capacity-gib": "--memory-gib"}


class _Deprecated(argparse.Action):
    """An old spelling: stores like the new flag (same dest) and says so on stderr."""

    def __init__(self, option_strings, dest, new: str, flag: bool = False, **kw):
        self.new, self.flag = new, flag
        super().__init__(option_strings, dest, nargs=0 if flag else None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"meshweave: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.flag else values)


def add_planning_args(p: argparse.ArgumentParser, shape_only: bool = False) -> None:
    """The "planning" argument group (module docstring). `shape_only`: just --batch and --seq,
    with the same definitions (for `compile`, which plans nothing)."""
    g = p.add_argument_group("planning", "shared by plan, report, run, export and dump; "
                                         "defaults depend on the model and the mesh")
    if not shape_only:
        g.add_argument("--mesh", default=None, metavar="MESH",
                       help="a device count ('64': the planner picks pp x dp x tp) or a shape "
                            "('2x4', 'dp=2,tp=4'; axes named dp/tp/pp only: that Megatron "
                            "layout, except for `plan`, which searches on it); default: none")
        g.add_argument("--spec", default=None, metavar="SPEC",
                       help="hardware preset (h100, h200, a100, t4, ascend910, cpu) or a spec JSON "
                            "path (`meshweave calibrate`); default h100")
        g.add_argument("--train", action="store_true",
                       help="a training step (default: inference)")
    g.add_argument("--batch", type=int, default=None, metavar="N",
                   help="global batch per step (default: the model's example batch, raised "
                        "so that the mesh can split it; a --plan-file's own batch)")
    g.add_argument("--seq", type=int, default=None, metavar="N",
                   help="sequence length (default: the model's example length, 16, at most "
                        "its max_seq_len; a --plan-file's own, when it says)")
    if shape_only:
        return
    g.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter/compute dtype (default: float16 mixed precision for "
                        "`plan`; float32, the only one, where the model runs)")
    g.add_argument("--memory-gib", type=float, default=None, metavar="GIB",
                   help="memory per device a plan may use, in GiB (default: the spec's "
                        "usable memory); below the replicated footprint the planner must "
                        "shard, pipeline or recompute")
    g.add_argument("--micro-batches", type=int, default=None, metavar="N",
                   help="pipeline micro-batches of a fixed layout (default: one per example "
                        "of a data-parallel shard when pipelined, else 1; a searched plan "
                        "picks its own)")
    g.add_argument("--plan-file", default=None, metavar="FILE",
                   help="a Plan JSON (`meshweave plan --out FILE`) instead of --mesh")
    g.add_argument("--hardware", dest="spec", action=_Deprecated, new="--spec",
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--training", dest="train", action=_Deprecated, new="--train", flag=True,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--capacity-gib", dest="memory_gib", action=_Deprecated, new="--memory-gib",
                   type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def parse_mesh(text: str):
    """--mesh as the planner takes it: a device count (int) or a DeviceMesh."""
    from meshweave.ir.mesh import DeviceMesh

    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise CLIError(f"--mesh {text}: need at least one device")
        return int(text)
    try:
        return DeviceMesh.parse(text)
    except ValueError as e:
        raise CLIError(f"--mesh {text!r}: {e}") from None


def megatron_grid(mesh) -> tuple[int, int, int] | None:
    """(dp, tp, pp) of a mesh whose axes are all named dp/tp/pp (the fixed Megatron layout of
    report/export/dump); None for a searched one (a count, unnamed axes)."""
    from meshweave.api import MEGATRON_AXES

    names = getattr(mesh, "axis_names", None)
    if names is None or not set(names) <= set(MEGATRON_AXES):
        return None
    size = dict(zip(names, mesh.shape))
    return size.get("dp", 1), size.get("tp", 1), size.get("pp", 1)


def _example_shape() -> tuple[int, int]:
    from meshweave.models.registry import ModelSpec

    params = inspect.signature(ModelSpec.example_inputs).parameters
    return params["batch"].default, params["seq"].default


def _given(args, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False


def resolve_planning(args, command: str, *, unsupported: dict[str, str] | None = None,
                     needs: str | None = None, search: bool = False,
                     grid: tuple[int, int] | None = None) -> None:
    """Check the planning flags of `args` and replace their None defaults, in place.

    `unsupported`: {"--flag": why} of the flags this invocation cannot honour; given, they are
    an error. `needs`: "mesh" (plan) or "mesh|plan-file" (report, run), else neither is needed.
    `search`: every mesh is searched (plan); `grid`: (dp, pp) the command fixed itself (run's
    --plan kinds). Sets args.mesh_value (int, DeviceMesh or None) and args.plan_value (the
    loaded --plan-file or None)."""
    for option, why in (unsupported or {}).items():
        dest = option.lstrip("-").replace("-", "_")
        if _given(args, dest):
            value = getattr(args, dest)
            shown = option if value is True else f"{option} {value}"
            raise CLIError(f"{shown}: `meshweave {command}` cannot honour it: {why}")
    for option, dest in (("--batch", "batch"), ("--seq", "seq"),
                         ("--micro-batches", "micro_batches")):
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise CLIError(f"{option} {value}: must be positive")
    gib = getattr(args, "memory_gib", None)
    if gib is not None and not gib > 0:
        raise CLIError(f"--memory-gib {gib}: must be positive")
    mesh_text, plan_file = getattr(args, "mesh", None), getattr(args, "plan_file", None)
    if mesh_text is not None and plan_file is not None:
        raise CLIError("--mesh and --plan-file: give one (the plan file fixes the mesh)")
    if needs == "mesh" and mesh_text is None:
        raise CLIError(f"`meshweave {command}` needs --mesh (a device count like 64 or a "
                       f"shape like dp=2,tp=4)")
    if needs == "mesh|plan-file" and mesh_text is None and plan_file is None:
        raise CLIError(f"`meshweave {command}` needs --mesh (a device count like 64 or a "
                       f"shape like dp=2,tp=4) or --plan-file FILE")
    args.mesh_value = parse_mesh(mesh_text) if mesh_text is not None else None
    args.plan_value = None
    if plan_file is not None:

        for option in ("--micro-batches", "--spec", "--memory-gib"):
            if _given(args, option.lstrip("-").replace("-", "_")) and not (
                    option == "--memory-gib" and command == "report"):
                raise CLIError(f"{option}: `meshweave {command} --plan-file` takes it from the "
                               f"plan; plan again with it instead")
        args.plan_value = load_plan_file(plan_file)
    elif mesh_text is None:
        for option in ("--spec", "--memory-gib", "--micro-batches"):
            if _given(args, option.lstrip("-").replace("-", "_")):
                raise CLIError(f"{option}: `meshweave {command}` makes no plan without "
                               f"--mesh or --plan-file")
    if hasattr(args, "spec"):
        from meshweave.passes.parallel.cost.hardware import get_spec

        try:
            hw = get_spec(args.spec or DEFAULT_SPEC)
        except ValueError as e:
            raise CLIError(f"--spec {args.spec}: {e}" if args.spec else str(e)) from None
        args.spec = args.spec or DEFAULT_SPEC
    else:
        hw = None
    if hasattr(args, "dtype"):
        if args.dtype is None:
            args.dtype = "float16" if command == "plan" else "float32"
        elif args.dtype != "float32" and command != "plan":
            raise CLIError(f"--dtype {args.dtype}: `meshweave {command}` traces and runs "
                           f"the model in float32; plan other dtypes with `meshweave plan`")
    _resolve_shape(args, command, hw, search, grid)


def _resolve_shape(args, command: str, hw, search: bool, grid: tuple[int, int] | None) -> None:
    example_batch, example_seq = _example_shape()
    plan = getattr(args, "plan_value", None)
    made = (plan.search if plan is not None and isinstance(plan.search, dict) else None) or {}
    if args.seq is None:
        args.seq = made.get("seq") or min(example_seq, _max_seq_len(args) or example_seq)
    mesh = getattr(args, "mesh_value", None)
    if grid is None and mesh is not None and not search:
        fixed = megatron_grid(mesh)
        grid = (fixed[0], fixed[2]) if fixed else None
    mb = getattr(args, "micro_batches", None)
    searched = mesh is not None and grid is None
    if mb is not None and searched:
        fix = "" if search else "; name the mesh's axes (dp=2,pp=2) to fix them"
        raise CLIError(f"--micro-batches {mb}: `meshweave {command}` searches the plan of "
                       f"--mesh {args.mesh}, which picks its own micro-batches{fix}")
    if _given(args, "memory_gib") and grid is not None and command != "report":
        raise CLIError(f"--memory-gib {args.memory_gib}: `meshweave {command}` does not search "
                       f"the fixed layout of --mesh {args.mesh}; give a device count to search "
                       f"under the budget")
    if args.batch is None:
        if made.get("batch"):
            args.batch = int(made["batch"])
        elif grid is not None:  # a pipeline gets one micro-batch per stage at least
            split = grid[0] * (mb or (grid[1] if grid[1] > 1 else 1))
            args.batch = -(-example_batch // split) * split
        elif mesh is not None:
            devices = mesh if isinstance(mesh, int) else mesh.size
            args.batch = max(example_batch, min(devices, hw.devices_per_node if hw else 8))
        else:
            args.batch = example_batch
    if hasattr(args, "micro_batches") and mb is None:
        pipelined = grid is not None and grid[1] > 1
        args.micro_batches = max(1, args.batch // grid[0]) if pipelined else 1


def _max_seq_len(args) -> int | None:
    from meshweave.models import UnknownModelError, get_model_spec

    try:
        n = getattr(get_model_spec(args.model).config, "max_seq_len", None)
    except (UnknownModelError, ImportError, ValueError, TypeError):
        return None  # the command reports an unknown model itself
    return n if isinstance(n, int) and n > 0 else None


def load_plan_file(path: str):
    """A Plan from its JSON file, or a one-line CLIError saying what is wrong with it."""
    from meshweave.passes.parallel.plan import Plan

    try:
        with open(path) as f:
            return Plan.from_json(f.read())
    except OSError as e:
        raise CLIError(f"--plan-file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--plan-file {path}: not a meshweave Plan JSON ({e})") from None
