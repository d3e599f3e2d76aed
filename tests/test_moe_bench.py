"""benchmarks/moe_bench.py at tiny size on the CPU (the grouped kernel under the Triton
interpreter): it runs every side, their outputs agree, and the last line has its format."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAST = re.compile(r"grouped-gemm vs eager loop: (\d+(\.\d+)?(e-?\d+)?)×; "
                  r"vs inductor: (\d+(\.\d+)?(e-?\d+)?×|n/a \(skipped\))")


def test_moe_bench_runs_tiny_on_cpu():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # the script sets it before triton is imported
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "moe_bench.py"), "--cpu",
           "--tokens", "12", "--d", "16", "--f", "32", "--experts", "4", "--no-inductor"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rows = [x for x in lines if x.startswith("T=")]
    assert len(rows) == 1, out.stdout
    for row in rows:
        assert re.search(r"grouped [\d.]+ ms .*loop [\d.]+ ms .*dense [\d.]+ ms", row), row
        assert row.endswith("outputs matched: yes"), row
    assert "all outputs matched the fp64 loop: yes" in lines
    assert "not expected to be fast" in out.stdout
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) > 0
