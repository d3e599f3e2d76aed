"""Hybrid CPU-GPU generation (passes/offload/, runtime/offload/): placement decisions on
synthetic specs, the dispatch model and the scheduler, exact greedy tokens against the
device-only whole-step programs (the "device" is the CPU here), and bad input.

Reproduce one case: .venv/bin/pytest -q tests/test_offload.py -k NAME
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import meshweave
from meshweave.models import build_model
from meshweave.passes.offload import (DecoderShape, OffloadError, StepCosts, memory_limit_bytes,
                                      plan_offload)
from meshweave.passes.offload.placement import _device_bytes
from meshweave.passes.parallel.cost.hardware import HardwareSpec, HostSpec, LinkSpec, get_spec
from meshweave.runtime.generate import GenerationError
from meshweave.runtime.offload import OverlapScheduler

from generate_helpers import random_prompts

REPRO = "reproduce: .venv/bin/pytest -q tests/test_offload.py -k {}"
CACHE = 256  # slots per sequence: enough that the caches, not the workspace, fill the cap


# ------------------------------------------------------------------ placement (synthetic)
def _shape_1b() -> DecoderShape:
    """Llama-3.2-1B's sizes in fp16 (16 layers, hidden 2048, 32 / 8 heads, ffn 8192)."""
    layer = 2 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048)
    return DecoderShape(16, 2048, 32, 8, 64, 128256, 2, layer, 2 * 128256 * 2048 + 4096, 8192)


def _plan(limit_of, batch=16, prompt=128, new=512, spec=None, **kw):
    """A 1B model on APEX's T4 (16 GB, 320 GB/s): the device's step is slow enough that the
    host's attention over half the batch hides behind it."""
    shape, cap = _shape_1b(), prompt + new + 1
    spec = spec or get_spec("t4")
    lengths = [prompt] * batch
    return plan_offload(shape, lengths, new, cap, spec, limit_of(shape, batch, prompt, cap),
                        prefill_len=prompt, **kw), shape, cap


def test_everything_fits_stays_gpu_only():
    plan, _, _ = _plan(lambda *a: None)  # the T4's 16 GB
    assert plan.mode == "gpu-only" and plan.cpu_rows == () and len(plan.gpu_rows) == 16
    assert plan.memory["host_used"] == 0


def test_half_the_cache_fits_puts_half_on_the_cpu():
    def half(shape, batch, prompt, cap):  # exactly 8 device caches and the step's workspace
        return _device_bytes(shape, batch // 2, batch, prompt, cap)

    plan, shape, cap = _plan(half)
    assert plan.mode == "hybrid", plan.reason
    assert len(plan.cpu_rows) == 8 and len(plan.gpu_rows) == 8
    assert plan.memory["device_used"] <= plan.memory["limit"]
    assert plan.memory["host_used"] == 8 * shape.kv_bytes_per_token * cap
    # one byte less: a ninth sequence goes to the host
    plan2, _, _ = _plan(lambda *a: half(*a) - 1)
    assert len(plan2.cpu_rows) == 9
    line = plan.placement_line()
    assert "8 of 16 sequences keep their KV cache on the CPU" in line
    assert json.loads(plan.to_json())["offload"]["cpu_rows"] == list(plan.cpu_rows)


def test_almost_nothing_fits_offloads_every_cache():
    plan, _, _ = _plan(lambda shape, b, p, cap: _device_bytes(shape, 0, b, p, cap) + 1000)
    assert plan.mode == "hybrid" and len(plan.cpu_rows) == 16 and plan.gpu_rows == ()


def test_cap_below_the_weights_names_the_smallest_workable_cap():
    with pytest.raises(OffloadError) as e:
        _plan(lambda shape, *a: shape.weight_bytes / 2)
    msg = str(e.value)
    assert "smallest workable cap" in msg and "--memory-gib" in msg, msg
    smallest = float(msg.split("--memory-gib ")[1].split(":")[0]) * 2**30
    plan, _, _ = _plan(lambda *a: smallest * 1.0001)  # the cap it names works
    assert plan.mode in ("hybrid", "gpu-rounds")


def test_host_too_small_is_reported_before_anything_runs():
    tiny_host = dataclasses.replace(get_spec("t4"), host=HostSpec(
        memory_bytes=2**20, attention_Bps=40e9, link=LinkSpec(1e-5, 50e9)))

    def half(shape, batch, prompt, cap):
        return _device_bytes(shape, batch // 2, batch, prompt, cap)

    plan, _, _ = _plan(half, spec=tiny_host)  # falls back to device-only rounds, says why
    assert plan.mode == "gpu-rounds" and "cannot hold" in plan.reason
    with pytest.raises(OffloadError, match="cannot hold"):
        _plan(half, spec=tiny_host, cpu_sequences=8)  # a forced split cannot fall back
    with pytest.raises(OffloadError, match="do not fit"):
        _plan(half, cpu_sequences=0)  # nothing offloaded does not fit either


def test_cpu_gets_the_shortest_prompts():
    shape = _shape_1b()
    lengths = [900, 100, 500, 50, 700, 300, 800, 200]
    cap = 2000
    limit = _device_bytes(shape, 5, 8, 900, cap)
    plan = plan_offload(shape, lengths, 64, cap, get_spec("h100"), limit, prefill_len=900)
    assert plan.cpu_rows == (1, 3, 7)  # lengths 100, 50, 200


def test_slow_host_prefers_device_rounds():
    slow = dataclasses.replace(get_spec("t4"), host=HostSpec(
        memory_bytes=1e12, attention_Bps=1e6, link=LinkSpec(1e-5, 50e9)))

    def half(shape, batch, prompt, cap):
        return _device_bytes(shape, batch // 2, batch, prompt, cap)

    fast, _, _ = _plan(half)
    assert fast.mode == "hybrid"
    plan, _, _ = _plan(half, spec=slow)
    assert plan.mode == "gpu-rounds", plan.reason
    assert plan.predicted["gpu_rounds_tokens_per_s"] > plan.predicted["hybrid_tokens_per_s"]


# ------------------------------------------------------------- dispatch and the scheduler
def test_dispatch_follows_the_predicted_times():
    costs = StepCosts(_shape_1b(), get_spec("h100"))
    # little host work: one batch, weights read once
    assert costs.best_mode(8, 8, 1537, 8 * 16)[0] == "merged"
    # long host contexts: the host's attention hides behind the device rows' layers
    assert costs.best_mode(8, 8, 1537, 8 * 1500)[0] == "pipelined"
    t, dev, host = costs.step_time("merged", 8, 8, 1537, 8 * 1500)
    assert t >= max(dev, host) - 1e-12 and host > 0


def test_scheduler_corrects_its_prediction_with_measured_times():
    spec = get_spec("h100")
    sched = OverlapScheduler(_shape_1b(), spec, 8, 8, 1537, same_memory=False)
    live = 8 * 16
    assert sched.choose(live, 8) == "merged"
    pred = sched.prior.step_time("merged", 8, 8, 1537, live)
    # the host turns out 200x slower than the spec says: the next steps pipeline
    L = 16
    sched.record("merged", {"lin": pred[1] * 0.9, "gattn": pred[1] * 0.1},
                 200 * L * sched.prior.cattn(live), 1.0, live)
    assert sched.scale()["cattn"] == pytest.approx(200, rel=1e-6)
    assert sched.choose(live, 8) == "pipelined"
    assert sched.choose(live, 0) == "gpu"  # no host row left running
    assert "GPU busy" in sched.line() and "CPU busy" in sched.line()


# ------------------------------------------------------------------- exact generation
@pytest.fixture(scope="module")
def tiny():
    model, (ids,) = build_model("llama-tiny", batch=1, seq=8)
    with torch.no_grad():
        plain = meshweave.compile(model, (ids,))
    return model, ids, plain


def _capped(model, ids, limit):
    return meshweave.compile(model, (ids,), options=meshweave.CompileOptions(memory_limit=limit))


def _half_cap(model, prompts, new):
    shape = DecoderShape.of(model)
    return _device_bytes(shape, len(prompts) // 2, len(prompts), 16, CACHE + 1)


@pytest.mark.parametrize("dispatch", [None, "merged", "pipelined"])
def test_batch16_hybrid_equals_device_only(tiny, dispatch):
    model, ids, plain = tiny
    prompts = random_prompts([3 + (5 * i) % 13 for i in range(16)], seed=3)
    ref = plain.generate(prompts, 12, cache_len=CACHE)
    cm = _capped(model, ids, _half_cap(model, prompts, 12))
    out = cm.generate(prompts, 12, cache_len=CACHE, dispatch=dispatch)
    plan = out.offload["plan"]
    assert plan["mode"] == "hybrid" and len(plan["cpu_rows"]) == 8, out.offload["placement"]
    assert out.tokens == ref.tokens, REPRO.format("batch16")
    sched = out.offload["scheduler"]
    assert sched["steps"] == out.steps + 1  # the prefill too
    if dispatch is not None:
        assert set(sched["dispatch"]) <= {dispatch, "gpu"}


def test_batch1_on_the_cpu_equals_device_only(tiny):
    model, ids, plain = tiny
    prompts = random_prompts([9], seed=5)
    ref = plain.generate(prompts, 16, cache_len=CACHE)
    shape = DecoderShape.of(model)
    cm = _capped(model, ids, _device_bytes(shape, 0, 1, 16, CACHE + 1) + 100)
    out = cm.generate(prompts, 16, cache_len=CACHE)
    assert out.offload["plan"]["cpu_rows"] == [0]
    assert out.tokens == ref.tokens, REPRO.format("batch1")


def test_eos_and_rounds(tiny, tmp_path):
    model, ids, plain = tiny
    prompts = random_prompts([4, 6, 8, 10], seed=7)
    ref = plain.generate(prompts, 10, cache_len=CACHE)
    eos = ref.tokens[2][3]  # sequence 2 stops early at its 4th token
    ref_eos = plain.generate(prompts, 10, cache_len=CACHE, eos_token_id=eos)
    shape = DecoderShape.of(model)
    cm = _capped(model, ids, _device_bytes(shape, 1, 4, 16, CACHE + 1))
    out = cm.generate(prompts, 10, cache_len=CACHE, eos_token_id=eos)
    assert out.offload["plan"]["mode"] == "hybrid"
    assert out.tokens == ref_eos.tokens and len(out.tokens[2]) <= 4
    # a host far slower than the spec's: device-only rounds of 2 (what the cap fits)
    from meshweave.passes.parallel.cost.hardware import save_spec

    slow = dataclasses.replace(get_spec("cpu"), host=HostSpec(
        memory_bytes=1e12, attention_Bps=1e3, link=LinkSpec(1e-5, 50e9)))
    save_spec(slow, tmp_path / "slow.json")
    rounds = meshweave.compile(model, (ids,), options=meshweave.CompileOptions(
        memory_limit=_device_bytes(shape, 2, 2, 16, CACHE + 1, True),
        hardware=str(tmp_path / "slow.json")))
    got = rounds.generate(prompts, 10, cache_len=CACHE)
    assert got.offload["plan"]["round_size"] == 2 and got.offload["rounds"] == 2
    assert got.offload["plan"]["mode"] == "gpu-rounds" and got.tokens == ref.tokens


def test_sampling_hybrid_is_reproducible(tiny):
    """method="sample" runs hybrid too: seeded runs repeat, and differ from greedy. (Its draws
    are not plain sampling's with the same seed: the batch is reordered, device rows first.)"""
    model, ids, _ = tiny
    prompts = random_prompts([5, 7, 9, 11], seed=11)
    cm = _capped(model, ids, _device_bytes(DecoderShape.of(model), 2, 4, 16, CACHE + 1))
    kw = dict(cache_len=CACHE, method="sample", temperature=1.5, seed=4)
    a, b = cm.generate(prompts, 10, **kw), cm.generate(prompts, 10, **kw)
    greedy = cm.generate(prompts, 10, cache_len=CACHE)
    assert a.offload["plan"]["mode"] == "hybrid" and a.tokens == b.tokens
    assert a.tokens != greedy.tokens
    assert all(0 <= t < 128 for row in a.tokens for t in row)


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    from meshweave.models.train_lm import train_lm

    out = str(tmp_path_factory.mktemp("offload_lm"))
    return train_lm("tiny", out, steps=60, log=lambda s: None)


def test_trained_small_lm_hybrid_equals_device_only(trained_lm):
    model = trained_lm.model.eval()
    ids = torch.tensor([trained_lm.encode("def main(")])
    prompts = [trained_lm.encode(t) for t in ("def f(x):", "import os", "class A:",
                                              "for i in range(")]
    with torch.no_grad():
        plain = meshweave.compile(model, (ids,))
    ref = plain.generate(prompts, 12, cache_len=64)
    shape = DecoderShape.of(model)
    cm = _capped(model, ids, _device_bytes(shape, 2, 4, 16, 65))
    out = cm.generate(prompts, 12, cache_len=64)
    assert len(out.offload["plan"]["cpu_rows"]) == 2
    assert out.tokens == ref.tokens, REPRO.format("trained")


# ------------------------------------------------------------------------ bad input
def test_bad_caps_and_methods(tiny):
    model, ids, _ = tiny
    for bad in (0, -5, "lots", True, [1]):
        with pytest.raises(ValueError, match="memory_limit"):
            meshweave.CompileOptions(memory_limit=bad)
    assert memory_limit_bytes("2MiB") == 2 * 2**20
    cm = _capped(model, ids, 1000)  # below the weights
    with pytest.raises(GenerationError, match="smallest workable cap"):
        cm.generate([[1, 2, 3]], 4, cache_len=CACHE)
    ok = _capped(model, ids, 2**30)
    with pytest.raises(GenerationError, match="hybrid generation runs greedy, sample"):
        ok.generate([[1, 2, 3]], 4, method="jacobi")
    with pytest.raises(GenerationError, match="dispatch="):
        ok.generate([[1, 2, 3]], 4, dispatch="sideways")
    with pytest.raises(GenerationError, match="vocabulary"):
        ok.generate([[1, 2, 999]], 4)


def test_spec_without_a_host_is_a_clear_error():
    d = get_spec("h100").to_dict()
    d.pop("host")
    bare = HardwareSpec.from_dict(d)  # an old spec file: still loads
    assert bare.host is None
    with pytest.raises(ValueError, match="describes no host"):
        StepCosts(_shape_1b(), bare)
    round_trip = HardwareSpec.from_dict(json.loads(json.dumps(get_spec("t4").to_dict())))
    assert round_trip == get_spec("t4")


def test_calibrate_measures_the_host():
    from meshweave.passes.parallel.cost.calibrate import host_attention_rate, host_link

    assert host_attention_rate(batch=1, kv_heads=2, ctx=256, head_dim=16) > 1e6
    link = host_link(False, nbytes=1 << 20)
    assert link.bandwidth_Bps > 1e6 and link.latency_s >= 0


# ------------------------------------------------------------------------------ CLI
def test_cli_check_prints_placement_and_busy_fractions(tiny, capsys):
    from meshweave.cli import main

    model, _, _ = tiny
    shape = DecoderShape.of(model)
    gib = _device_bytes(shape, 8, 16, 16, CACHE + 1) / 2**30
    rc = main(["generate", "--model", "llama-tiny", "--batch", "16", "--memory-gib", f"{gib:.6f}",
               "--cache-len", str(CACHE), "--max-new-tokens", "8", "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "placement: hybrid" in out and "sequences keep their KV cache on the CPU" in out
    assert "GPU busy" in out and "CPU busy" in out and "check: ok" in out


def test_cli_check_fails_on_a_wrong_token(tiny, capsys, monkeypatch):
    """Mutation: corrupt the host attention's output; --check must exit 1."""
    from meshweave.cli import main
    from meshweave.runtime.offload import host

    original = host.HostCaches._rows

    def corrupted(self, layer, rows, q, k, v, positions, out):
        t = original(self, layer, rows, q, k, v, positions, out)
        out.mul_(-3.0)
        return t

    monkeypatch.setattr(host.HostCaches, "_rows", corrupted)
    model, _, _ = tiny
    gib = _device_bytes(DecoderShape.of(model), 8, 16, 16, CACHE + 1) / 2**30
    rc = main(["generate", "--model", "llama-tiny", "--batch", "16", "--memory-gib", f"{gib:.6f}",
               "--cache-len", str(CACHE), "--max-new-tokens", "8", "--check"])
    out = capsys.readouterr().out
    assert rc == 1 and "check: FAILED" in out, out


@pytest.mark.parametrize("args,message", [
    (["--check"], "--check goes with --memory-gib"),
    (["--memory-gib", "-1"], "expected a positive size"),
    (["--batch", "0"], "--batch 0"),
    (["--memory-gib", "0.00001"], "smallest workable cap"),
    (["--memory-gib", "1", "--check", "--method", "sample"], "--check compares greedy"),
])
def test_cli_bad_input_is_one_line(args, message, capsys):
    from meshweave.cli import main

    rc = main(["generate", "--model", "llama-tiny", "--max-new-tokens", "4", *args])
    err = capsys.readouterr().err
    assert rc != 0 and message in err, err


def test_plan_json_and_report_show_the_split(tiny, tmp_path, capsys):
    from meshweave.cli import main

    model, _, _ = tiny
    gib = _device_bytes(DecoderShape.of(model), 8, 16, 16, CACHE + 1) / 2**30
    plan_file, page = tmp_path / "offload.json", tmp_path / "offload.html"
    assert main(["generate", "--model", "llama-tiny", "--batch", "16", "--memory-gib",
                 f"{gib:.6f}", "--cache-len", str(CACHE), "--max-new-tokens", "4",
                 "--plan-out", str(plan_file)]) == 0
    doc = json.loads(plan_file.read_text())
    cpu = doc["offload"]["cpu_rows"]
    assert len(cpu) == 8 and doc["offload"]["mode"] == "hybrid"
    assert doc["scheduler"]["steps"] >= 4 and 0 < doc["scheduler"]["gpu_busy"] <= 1
    assert main(["report", "--offload", str(plan_file), "-o", str(page)]) == 0
    text = page.read_text()
    for section in ("offload-summary", "offload-placement", "offload-memory", "offload-run"):
        assert f'id="{section}"' in text, section
    assert text.count('data-side="CPU"') == 8 and text.count('data-side="GPU"') == 8
    for b in cpu:
        assert f'data-sequence="{b}" data-side="CPU"' in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"plan": 1}')
    capsys.readouterr()
    assert main(["report", "--offload", str(bad), "-o", str(page)]) != 0
    assert "expected {'offload'" in capsys.readouterr().err


def test_benchmark_runs_at_tiny_sizes():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "benchmarks/offload_bench.py", "--cpu", "--batch", "6",
                        "--new-tokens", "6"], capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("offload tokens/s gpu-only ") and "hybrid/fixed-half" in last, last
    ratios = [float(x.split()[-1]) for x in last.split(":")[1].split(",")]
    assert all(r > 0 for r in ratios)
    assert "DIFFER" not in r.stdout  # hybrid and fixed-half tokens equal gpu-only's
