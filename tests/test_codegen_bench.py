"""The codegen benchmark script runs end to end at tiny sizes (CPU: Triton interpreter)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_codegen_bench_tiny_runs(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT, MESHWEAVE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)  # the script decides, before triton is imported
    # Inductor is skipped here only for time (its CPU C++ compile takes minutes on 2 cores);
    # the full script runs it.
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "codegen_bench.py"),
        "--tiny",
        "--skip-inductor",
        "--iters",
        "1",
        "--models",
        "llama",
        "--shapes",
        "2x8",
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nrepro: {' '.join(cmd)}"
    assert "codegen_bench on cpu (Triton interpreter), torch" in proc.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["batch"], r["seq"]) for r in rows] == [(2, 8)]
    for r in rows:
        assert r["mw_max_err"] < 1e-4, r
        assert r["mw_cache"] == "miss" and r["mw_cached_status"] == "hit", r
        ratio = r["mw_ms"] / r["eager_ms"]  # what the table prints per row
        assert math.isfinite(ratio) and ratio > 0, r


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_codegen_bench_without_transformers_uses_zoo_gpt2(tmp_path):
    """A GPU box may lack transformers: GPT-2 is then the zoo GPT at GPT2Config sizes."""
    blocker = tmp_path / "block" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('transformers blocked by the test')\n")
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "block"),
               MESHWEAVE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "codegen_bench.py"), "--tiny",
           "--skip-inductor", "--iters", "1", "--models", "gpt2", "--shapes", "1x8",
           "--json", str(out_json)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nrepro: {' '.join(cmd)}"
    assert "transformers is not installed" in proc.stdout
    [row] = json.loads(out_json.read_text())["rows"]
    assert row["model"] == "gpt2-tiny(zoo)" and "meshweave" not in row, row
    assert row["mw_max_err"] < 1e-4, row


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_host_overhead_bench_runs():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--layers", "2",
           "--iters", "3"]
    env = dict(os.environ)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nrepro: {' '.join(cmd)}"
    m = re.search(r"ratio meshweave call\(\) / eager: ([\d.]+)x", proc.stdout)
    assert m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 0, proc.stdout
    assert "launch sites" in proc.stdout, proc.stdout


def test_train_bench_tiny_runs(tmp_path):
    """benchmarks/train_bench.py at tiny sizes (torch.compile left out for time here: its CPU
    build takes minutes on 2 cores; the full script runs it)."""
    out_json = tmp_path / "train.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_bench.py"), "--tiny",
           "--skip-inductor", "--steps", "3", "--json", str(out_json)]
    env = dict(os.environ, MESHWEAVE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nrepro: {' '.join(cmd)}"
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt-tiny", "llama-tiny"]
    for r in rows:
        assert math.isfinite(r["mw_vs_eager"]) and r["mw_vs_eager"] > 0, r
        assert re.search(rf"^train_bench {r['model']}: step meshweave [\d.]+ ms, eager [\d.]+ "
                         rf"ms, torch.compile skipped;", proc.stdout, re.M), proc.stdout
