"""The meshweave command line: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("compile", "dump", "models"):
        assert cmd in r.stdout


def test_compile_default_model_matches_eager(tmp_path):
    r = run_cli("compile", "--model", "gpt-tiny", "--dump", str(tmp_path))
    assert r.returncode == 0, r.stderr
    err = float(r.stdout.split("max |meshweave - eager| = ")[1].split()[0])
    assert err < 1e-4
    assert (tmp_path / "final.mwir").exists() and (tmp_path / "00_frontend.mwir").exists()


def test_dump_ir_prints_graph():
    r = run_cli("dump", "--model", "llama-tiny", "--what", "ir")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("graph ") and "aten.scaled_dot_product_attention" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("compile", "--model", "no-such-model"), "no-such-model"),
    (("dump", "--model", "gpt-tiny", "--what", "nonsense"), "--what 'nonsense' is not known"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()
             and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_dump_kernels_prints_generated_triton_source():
    r = run_cli("dump", "--model", "gpt-tiny", "--what", "kernels")
    assert r.returncode == 0, r.stderr
    assert "Triton launch sites" in r.stdout and "@triton.jit" in r.stdout
    import ast

    source = r.stdout.split("\n\n", 1)[1]
    ast.parse(source)  # the printed module is valid Python
