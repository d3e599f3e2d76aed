"""The kernel cache: miss then hit across processes, corrupt entries rebuilt, and the Triton
interpreter switch (which must happen before triton is imported)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import subprocess
import sys
import textwrap

import pytest
from meshweave.codegen import CodegenConfig, attach_triton_backend
from meshweave.codegen.triton.cache import STATS, KernelCache, checksum

import meshweave
from meshweave import CompileOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CHILD = textwrap.dedent("""
    import json, os, sys, torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import meshweave
    from meshweave.codegen.triton.cache import STATS

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(16)
            self.fc = torch.nn.Linear(16, 24)

        def forward(self, x):
            return torch.relu(self.fc(self.ln(x)))

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = MLP().to(dev), torch.randn(3, 16, device=dev)
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(backend="triton"))
    err = (cm(x) - model(x)).abs().max().item()
    art = cm.artifacts["kernels"]
    print(json.dumps({"status": art.cache_status, "path": art.module_path, "err": err,
                      "stats": dict(STATS), "kernels": [k.name for k in cm.kernels]}))
""")


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ, MESHWEAVE_CACHE_DIR=cache_dir, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # the child sets it itself, before importing triton
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_miss_then_hit_in_a_fresh_process(tmp_path):
    first = run_child(str(tmp_path))
    assert first["status"] == "miss" and first["stats"] == {"miss": 1}
    mtime = os.stat(first["path"]).st_mtime_ns
    second = run_child(str(tmp_path))
    assert second["status"] == "hit" and second["stats"] == {"hit": 1}, second
    assert second["path"] == first["path"]
    assert os.stat(second["path"]).st_mtime_ns == mtime  # not regenerated
    assert second["err"] < 1e-5 and second["kernels"] == first["kernels"]


class Small(torch.nn.Module):
    def forward(self, x):
        return (x * 2).softmax(-1)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def compile_with_cache(cache_dir):
    x = torch.randn(4, 8, device=DEVICE)
    cm = meshweave.compile(Small(), (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(cache_dir=str(cache_dir)))
    torch.testing.assert_close(cm(x), Small()(x))
    return cm.artifacts["kernels"]


@pytest.mark.parametrize("damage", ["truncate", "bad_python_valid_checksum", "bad_meta"])
def test_corrupt_entry_is_rebuilt(tmp_path, damage):
    art = compile_with_cache(tmp_path)
    assert art.cache_status == "miss"
    path = art.module_path
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    source = read(path)
    if damage == "truncate":  # a partial write
        write(path, source[: len(source) // 2])
    elif damage == "bad_python_valid_checksum":
        bad = source.replace("def call(", "def call((", 1)
        write(path, bad)
        meta = json.loads(read(meta_path))
        meta["checksum"] = checksum(bad)
        write(meta_path, json.dumps(meta))
    else:
        write(meta_path, "{not json")
    before = STATS["rebuilt"]
    art2 = compile_with_cache(tmp_path)
    assert art2.cache_status.startswith("rebuilt"), art2.cache_status
    assert STATS["rebuilt"] == before + 1
    assert read(path) == source  # rewritten whole
    assert compile_with_cache(tmp_path).cache_status == "hit"


def test_missing_meta_is_a_miss(tmp_path):
    art = compile_with_cache(tmp_path)
    os.unlink(os.path.join(os.path.dirname(art.module_path), "meta.json"))
    assert KernelCache(str(tmp_path)).load(art.key) is None
    assert compile_with_cache(tmp_path).cache_status == "miss"


def test_key_changes_with_graph_and_options(tmp_path):
    a = compile_with_cache(tmp_path)
    x = torch.randn(4, 9, device=DEVICE)  # another shape: another graph, another entry
    cm = meshweave.compile(Small(), (x,), options=CompileOptions(backend="eager"))
    attach_triton_backend(cm, CodegenConfig(cache_dir=str(tmp_path)))
    b = cm.artifacts["kernels"]
    attach_triton_backend(cm, CodegenConfig(cache_dir=str(tmp_path), matmul="torch"))
    c = cm.artifacts["kernels"]
    assert len({a.key, b.key, c.key}) == 3


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only forced on CPU")
def test_triton_imported_without_interpreter_is_a_clear_error():
    out = run_python("""
        import triton  # too early: imported in GPU mode
        from meshweave.codegen.triton.mode import TritonModeError, ensure_triton_mode
        try:
            ensure_triton_mode(on_cuda=False)
        except TritonModeError as e:
            print("ERROR:", e)
    """)
    assert "ERROR:" in out.stdout, out.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in out.stdout and "already imported" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only forced on CPU")
def test_prepare_hook_switches_the_interpreter_on_before_triton_loads():
    out = run_python("""
        import meshweave
        from meshweave.codegen import prepare_triton_backend
        prepare_triton_backend(meshweave.CompileOptions(backend="triton"))
        import triton.language as tl
        print(type(tl.sigmoid).__name__)
    """)
    assert out.stdout.strip() == "InterpretedFunction", out.stderr[-2000:]
