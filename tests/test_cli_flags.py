"""The planning flags (meshweave/cli_flags.py): one definition on plan, report, run, export and
dump, the old spellings as hidden aliases, defaults resolved in one place, and flags a command
cannot honour as one-line errors."""

from __future__ import annotations

import argparse

import pytest
from meshweave.cli import CLIError, build_parser, main
from meshweave.cli_flags import DEPRECATED_ALIASES, PLANNING_FLAGS, resolve_planning

COMMANDS = ("plan", "report", "run", "export", "dump")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub.choices[name] for name in COMMANDS}


def _action(p: argparse.ArgumentParser, option: str) -> argparse.Action:
    [action] = [a for a in p._actions if option in a.option_strings]
    return action


def _signature(a: argparse.Action) -> tuple:
    return (type(a).__name__, a.dest, a.type, a.default, a.choices, a.nargs, a.const, a.help,
            a.metavar, a.required)


@pytest.mark.parametrize("option,dest", PLANNING_FLAGS)
def test_every_shared_flag_is_the_same_on_every_command(option, dest):
    parsers = _subparsers()
    sigs = {name: _signature(_action(p, option)) for name, p in parsers.items()}
    first = sigs["plan"]
    assert first[1] == dest
    assert all(s == first for s in sigs.values()), sigs
    assert first[3] in (None, False)  # "not given" is told from any value, then resolved
    for name, p in parsers.items():  # and in the same argument group
        [group] = [g for g in p._action_groups if _action(p, option) in g._group_actions]
        assert group.title == "planning", name


@pytest.mark.parametrize("old,new", sorted(DEPRECATED_ALIASES.items()))
def test_old_spellings_are_hidden_aliases_with_the_same_dest(old, new, capsys):
    for name, p in _subparsers().items():
        alias, flag = _action(p, old), _action(p, new)
        assert alias.dest == flag.dest and alias.help == argparse.SUPPRESS, name
        assert old not in p.format_help()
    p = _subparsers()["report"]
    value = [] if new == "--train" else ["3"]
    got = p.parse_args(["--mesh", "2", old, *value])
    want = p.parse_args(["--mesh", "2", new, *value])
    assert getattr(got, alias.dest) == getattr(want, alias.dest)
    assert f"{old} is deprecated; use {new}" in capsys.readouterr().err


def _ns(**kw) -> argparse.Namespace:
    base = {name: None for _, name in PLANNING_FLAGS}
    base.update(model="gpt-tiny", train=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_defaults_are_resolved_from_the_model_and_the_mesh():
    args = _ns()
    resolve_planning(args, "export")
    assert (args.batch, args.seq, args.micro_batches, args.spec, args.dtype) == (
        2, 16, 1, "h100", "float32")  # the model's example shape, no plan
    args = _ns(mesh="64")
    resolve_planning(args, "report")
    assert args.batch == 8 and args.mesh_value == 64  # one example per device of a node
    args = _ns(mesh="4")
    resolve_planning(args, "plan", search=True)
    assert (args.batch, args.seq, args.dtype) == (4, 16, "float16")
    args = _ns(mesh="dp=2,tp=2,pp=2")
    resolve_planning(args, "report")
    assert (args.batch, args.micro_batches) == (4, 2)  # a micro-batch per stage, per dp shard
    args = _ns(mesh="2", micro_batches=2)
    resolve_planning(args, "run", grid=(2, 2))  # run --plan dpxpp --pp 2
    assert args.batch == 4
    args = _ns(model="convnet-tiny", mesh="tp=2", batch=3)
    resolve_planning(args, "dump")
    assert (args.batch, args.micro_batches) == (3, 1)


def test_a_plan_files_batch_and_seq_are_the_defaults(tmp_path):
    from meshweave.models import build_model

    import meshweave
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan

    model, inputs = build_model("gpt-tiny", batch=4, seq=8)
    plan = megatron_plan(meshweave.compile(model, inputs).graph, 2, 1, 1, batch=4)
    plan.search["seq"] = 8
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    args = _ns(plan_file=str(path))
    resolve_planning(args, "run", needs="mesh|plan-file")
    assert (args.batch, args.seq) == (4, 8) and args.plan_value.world_size == 2
    with pytest.raises(CLIError, match="--micro-batches: `meshweave run --plan-file` takes it"):
        resolve_planning(_ns(plan_file=str(path), micro_batches=2), "run")
    with pytest.raises(CLIError, match="--mesh and --plan-file: give one"):
        resolve_planning(_ns(plan_file=str(path), mesh="2"), "report")


def test_report_plans_a_bare_device_count(tmp_path, capsys):
    out = tmp_path / "plan.html"
    assert main(["report", "--model", "gpt-tiny", "--mesh", "64", "--spec", "h100",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "<svg" in page and 'id="rank-63"' in page


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_mesh_is_one_line_naming_the_flag(command, capsys):
    extra = {"export": ["--out", "/nonexistent/x"], "dump": ["--what", "plan"]}
    argv = [command, "--model", "gpt-tiny", "--mesh", "2x", *extra.get(command, [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"meshweave {command}: error: --mesh '2x'"), err


@pytest.mark.parametrize("argv,message", [
    (["plan", "--model", "gpt-tiny", "--mesh", "4", "--micro-batches", "2"],
     "--micro-batches 2: `meshweave plan` searches"),
    (["plan", "--model", "gpt-tiny", "--mesh", "4", "--plan-file", "p.json"],
     "--plan-file p.json: `meshweave plan` cannot honour it"),
    (["export", "--model", "gpt-tiny", "--out", "/nonexistent", "--train"],
     "--train: `meshweave export` cannot honour it"),
    (["export", "--model", "gpt-tiny", "--out", "/nonexistent", "--micro-batches", "2"],
     "--micro-batches: `meshweave export` makes no plan without --mesh"),
    (["dump", "--model", "gpt-tiny", "--what", "ir", "--mesh", "4"],
     "--mesh 4: `meshweave dump` cannot honour it"),
    (["run", "--model", "gpt-tiny", "--mesh", "2", "--memory-gib", "1"],
     "--memory-gib 1.0: `meshweave run` cannot honour it"),
    (["run", "--model", "gpt-tiny", "--mesh", "4", "--micro-batches", "2"],
     "--micro-batches 2: `meshweave run` searches"),
    (["report", "--model", "gpt-tiny", "--mesh", "4", "--dtype", "bfloat16"],
     "--dtype bfloat16: `meshweave report`"),
    (["report", "--model", "gpt-tiny"], "`meshweave report` needs --mesh"),
    (["plan", "--model", "gpt-tiny", "--mesh", "4", "--seq", "0"], "--seq 0: must be positive"),
])
def test_flags_a_command_cannot_honour_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
