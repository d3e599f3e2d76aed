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
@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
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


# ------------------------------------------------------------------ llama-70b without weights
def _meshweave(*argv, cap=2 * 2**30, env=None, timeout=120):
    """`python -m meshweave ARGV` under an address-space cap (which bounds resident memory)."""
    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, "-m", "meshweave", *argv], preexec_fn=capped,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _report_data(path) -> dict:
    import json
    import re

    text = open(path, encoding="utf-8").read()
    block = re.search(r'id="report-data">(.*?)</script>', text, re.S)
    assert block, "no report-data block"
    return json.loads(block.group(1))


@pytest.mark.slow
def test_llama_70b_plan_file_report_and_rank_dump_under_a_2_gib_cap(tmp_path):
    """The README's path: plan on 64 devices, report the plan file, dump rank 5 of it; all on
    the meta device (the plan's own 2-layer trace, traced again), under 2 GiB."""
    plan, html = str(tmp_path / "plan.json"), str(tmp_path / "plan.html")
    r = _meshweave("plan", "--model", "llama-70b", "--mesh", "64", "--out", plan)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _meshweave("report", "--model", "llama-70b", "--plan-file", plan, "-o", html)
    assert r.returncode == 0, r.stderr[-2000:]
    data = _report_data(html)
    assert data["world_size"] == 64 and data["mesh"]["axes"] == ["dp", "tp"]
    assert data["mesh"]["shape"] == [8, 8]
    rows = {row["weight"]: row for row in data["sharding"]}
    # the plan's placements name values of the graph the report draws: nothing falls back to R
    assert rows["layers.1.mlp.gate_proj.weight"]["placements"] == ["R", "S(0)"]
    r = _meshweave("dump", "--model", "llama-70b", "--plan-file", plan, "--what", "rank:5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("# as the plan file was made: traced 2 of 80 repeated layers")
    # tp=8 of the plan: a column-parallel MLP weight's 28672 rows become 3584 (float16)
    assert 'f16[3584, 8192] {R, S(0)} = param "layers.1.mlp.gate_proj.weight"' in r.stdout


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_report_of_llama_70b_on_a_fixed_mesh_under_a_2_gib_cap(tmp_path):
    """report --mesh dp=2,tp=4 traces 2 of the 80 layers on the meta device and costs them at
    the real depth (the same memory and step time as the full trace, which takes a minute)."""
    html = str(tmp_path / "r.html")
    r = _meshweave("report", "--model", "llama-70b", "--mesh", "dp=2,tp=4", "-o", html)
    assert r.returncode == 0, r.stderr[-2000:]
    data = _report_data(html)
    assert data["mesh"] == {"shape": [2, 4], "axes": ["dp", "tp"]} and data["world_size"] == 8
    rows = {row["weight"]: row for row in data["sharding"]}
    assert rows["layers.0.attn.q_proj.weight"]["shape"] == "8192x8192"
    assert rows["layers.0.attn.q_proj.weight"]["placements"] == ["R", "S(0)"]
    # 80 layers' fp32 weights over tp=4 (about 65.7 GiB per device), not 2 layers' worth
    assert data["memory"][0]["bytes"] > 60 * 2**30


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_rank_dump_of_llama_70b_layers_runs_under_a_2_gib_cap():
    r = _meshweave("dump", "--model", "llama-70b", "--num-layers", "2", "--what", "rank:1",
                   "--mesh", "dp=2,tp=4", "--seq", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    # rank 1 of dp=2,tp=4: a quarter of each column-parallel weight (8192 -> 2048 rows)
    assert 'f32[2048, 8192] {R, S(0)} = param "layers.1.attn.q_proj.weight"' in r.stdout
    assert 'f32[8192, 7168] {R, S(1)} = param "layers.1.mlp.down_proj.weight"' in r.stdout
    assert "dist.all_reduce" in r.stdout


# ------------------------------------------------------------------ the memory preflight
def _one_line_exit_2(r):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_compile_of_llama_70b_is_one_line_and_exit_2_under_a_2_gib_cap():
    err = _one_line_exit_2(_meshweave("compile", "--model", "llama-70b"))
    assert "llama-70b needs at least 262.8 GiB for its fp32 weights alone" in err, err
    assert "`meshweave plan --model llama-70b --mesh 64`" in err, err


def test_activations_that_do_not_fit_are_one_line_and_exit_2_before_anything_is_built():
    """gpt-tiny's weights are half a megabyte; at batch 4096 x seq 32 one call's activations
    peak near 300 MiB (liveness over the meta-device IR), which a 256 MiB machine
    (MESHWEAVE_MEMORY_AVAILABLE) cannot give."""
    small = {"MESHWEAVE_MEMORY_AVAILABLE": "256MiB"}
    err = _one_line_exit_2(_meshweave("compile", "--model", "gpt-tiny", "--batch", "4096",
                                      "--seq", "32", env=small))
    assert "gpt-tiny at --batch 4096 --seq 32 needs about" in err, err
    assert "peak activations, estimated on the meta device" in err and "256.0 MiB" in err, err
    assert "`meshweave dump --model gpt-tiny --batch 4096 --seq 32 --what rank:0 --mesh dp=2`" \
        in err, err


def test_the_activation_estimate_is_the_measured_peak(monkeypatch):
    """The preflight's estimate (liveness on the meta-device IR) against the live bytes the
    reference executor holds running the same call on the CPU; and the preflight passes or
    stops on it."""
    from meshweave.cli import CLIError, _meta_call_bytes, preflight_execution
    from meshweave.models import get_model_spec
    from meshweave.runtime.memory import LiveBytes, storage_ptrs

    spec = get_model_spec("gpt-tiny")
    weights, inputs, acts = _meta_call_bytes(spec, 64, 32)
    model = spec.build().eval()
    x = spec.example_inputs(batch=64, seq=32)
    cm = meshweave.compile(model, x, options=meshweave.CompileOptions(backend="eager"))
    held = storage_ptrs([*model.parameters(), *model.buffers(), *x])
    with torch.no_grad(), LiveBytes(exclude=held) as meter:
        cm(*x)
    assert abs(acts - meter.peak) <= 0.01 * meter.peak, (acts, meter.peak)
    assert 4 * spec.param_count() <= weights < 4 * spec.param_count() + 2**16  # + constants
    need = weights + inputs + acts
    monkeypatch.setenv("MESHWEAVE_MEMORY_AVAILABLE", str(int(need / 0.9) + 4096))
    preflight_execution("gpt-tiny", 64, 32)  # fits
    monkeypatch.setenv("MESHWEAVE_MEMORY_AVAILABLE", str(int(need / 0.9) - 4096))
    with pytest.raises(CLIError, match="peak activations"):
        preflight_execution("gpt-tiny", 64, 32)
    monkeypatch.setenv("MESHWEAVE_MEMORY_AVAILABLE", "lots")
    with pytest.raises(CLIError, match="MESHWEAVE_MEMORY_AVAILABLE='lots'"):
        preflight_execution("gpt-tiny", 64, 32)


def test_the_preflight_does_not_trace_a_small_call(monkeypatch):
    """Weights under 1/8 of the memory and batch x seq x 1 MiB under 1/8 too: no meta trace."""
    import meshweave.cli as cli

    def traced(*a, **k):
        raise AssertionError("the preflight traced a small call")

    monkeypatch.setattr(cli, "_meta_call_bytes", traced)
    monkeypatch.setenv("MESHWEAVE_MEMORY_AVAILABLE", "16GiB")
    cli.preflight_execution("gpt-tiny", 2, 16)
    monkeypatch.setenv("MESHWEAVE_MEMORY_AVAILABLE", "64MiB")  # 32 tokens x 1 MiB > 8 MiB
    with pytest.raises(AssertionError, match="traced a small call"):
        cli.preflight_execution("gpt-tiny", 2, 16)


@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_kernel_dump_of_llama_70b_layers_traces_on_meta_under_a_2_gib_cap():
    r = _meshweave("dump", "--model", "llama-70b", "--num-layers", "2", "--what", "kernels",
                   "--seq", "8", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Triton launch sites" in r.stdout and "def " in r.stdout
