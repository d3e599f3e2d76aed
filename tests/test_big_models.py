"""Big models in the commands that need no weights (issue 19): dumps and plans of models over
a gigabyte of weights trace on the meta device, under a hard address-space cap."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch
from meshweave.models import build_model

import meshweave

CAP = 3 * 2**30  # llama-8b's fp32 weights alone are 32 GB


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


@pytest.mark.slow
def test_rank_dump_of_llama_8b_runs_under_a_3_gib_cap():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "meshweave", "dump", "--model", "llama-8b",
                        "--what", "rank:1", "--mesh", "dp=2,tp=4", "--seq", "8"],
                       preexec_fn=_capped, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # rank 1 of dp=2,tp=4 holds a quarter of each column-parallel weight: 4096 -> 1024 rows
    assert "p_layers_31_mlp_down_proj_weight" in r.stdout
    assert "f32[1024, 4096]" in r.stdout and "all_reduce" in r.stdout


def test_calling_a_model_compiled_on_meta_says_what_to_do():
    model, inputs = build_model("gpt-tiny", device="meta")
    cm = meshweave.compile(model, inputs)
    assert "aten.linear" in str(cm.graph)
    with pytest.raises(RuntimeError, match="compiled on the meta device.*compile it again"):
        cm(*inputs)
    real, real_inputs = build_model("gpt-tiny")
    out = meshweave.compile(real, real_inputs)(*real_inputs)
    assert out.device.type == "cpu" and torch.isfinite(out).all()
