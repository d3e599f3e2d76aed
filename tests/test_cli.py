"""The meshweave command line: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


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
    pytest.param(("run", "--model", "gpt-tiny", "--mesh", "64", "--device", "cuda"),
                 "64 ranks need 64 GPUs", id="nccl-without-gpus"),
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


def test_source_checkout_imports_without_install(tmp_path):
    """A bare checkout (a GPU box with no network for `pip install`) imports every component.

    `python -S` skips site processing, so the editable-install finder is absent and only the
    repository root plus site-packages (for torch) are on the path.
    """
    import os
    import sysconfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
        "import torch, meshweave;"
        "from meshweave.passes.parallel.search.search import plan_parallel;"
        "from meshweave.models import build_model;"
        "m, x = build_model('gpt-tiny', batch=1, seq=8);"
        "cm = meshweave.compile(m, x);"
        "torch.testing.assert_close(cm(*x), m(*x));"
        "import meshweave.codegen; print(meshweave.codegen.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, root,
                          sysconfig.get_paths()["purelib"]],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == os.path.join(root, "codegen", "__init__.py")
