"""Distributed runtime: real gloo ranks on 127.0.0.1 against single-device runs.

Data parallel, pipelines (GPipe and 1F1B, micro-batches) and ZeRO-1 run through the runtime's
own stage split here; plans with tensor parallelism (the planner's lowering) are in
test_distributed_planner.py, except one TP case that checks each rank holds only its own weight
shards (loaded from the checkpoint the parent writes). Ranks start with fork (milliseconds
each), so each case is its own launch. Faults: a rank that raises, dies or hangs makes `launch` raise DistributedError in
bounded time. Every numeric failure prints a `meshweave run ... --check` line that reproduces it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.runtime.distributed import DistributedError
from meshweave.runtime.distributed.checkpoint import load_rank_tensors, rank_job
from meshweave.runtime.distributed.groups import plan_group_rank_lists
from meshweave.runtime.distributed.launch import launch
from meshweave.runtime.distributed.runner import (
    RunSpec,
    compare,
    prepare,
    run_distributed,
    run_rank,
    run_single_device,
    trace_model,
)
from meshweave.runtime.distributed.schedule import peak_in_flight, stage_schedule
from meshweave.runtime.distributed.shards import assemble, local_shard

MODELS = ["gpt-tiny", "llama-tiny", "hf:gpt2"]
BATCH, SEQ = 4, 8
OUT_TOL, PARAM_TOL = 1e-4, 1e-5

# (name, RunSpec overrides) run for every model; kept small: each is one launch.
SPLIT_CASES = [
    ("dp", {"dp": 2}),
    ("pp-gpipe", {"pp": 2, "micro_batches": 2}),
    ("dp-train", {"dp": 2, "training": True}),
    ("pp-1f1b-train", {"pp": 2, "micro_batches": 4, "schedule": "1f1b", "training": True}),
    (
        "dpxpp-zero-train",
        {"dp": 2, "pp": 2, "micro_batches": 2, "schedule": "1f1b", "zero": True, "training": True},
    ),
]


def repro(model: str, spec: RunSpec, lowering: str = "split") -> str:
    """The runner call that reruns a case (the executor's own train_step; `meshweave run`
    goes through meshweave.compile instead, tested at the end of this file)."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if getattr(spec, f.name) != f.default and f.name != "model"}
    return f"run_distributed(prepare(RunSpec({model!r}, lowering={lowering!r}, **{fields})))"


@pytest.fixture(scope="module")
def traced():
    cache, graphs = {}, {}  # traced models; graphs traced at smaller (local) batches

    def get(model: str):
        if model.startswith("hf:"):
            pytest.importorskip("transformers")
        if model not in cache:
            cache[model] = trace_model(model, BATCH, SEQ)
        return cache[model]

    get.graphs = graphs
    return get


def check_case(model: str, traced, kind: str = "fixed", lowering: str = "split", **kw):
    """Run one plan distributed and on one device; assert they match; return the run."""
    spec = RunSpec(model, plan=kind, batch=BATCH, seq=SEQ, lowering=lowering, **kw)
    job = prepare(spec, traced(model), traced.graphs)
    got = run_distributed(job)
    errs = compare(run_single_device(job), got)
    line = repro(model, spec, lowering)
    assert errs.get("outputs", 0.0) <= OUT_TOL, f"outputs differ by {errs}. repro: {line}"
    assert errs.get("loss", 0.0) <= OUT_TOL, f"losses differ by {errs}. repro: {line}"
    assert errs.get("params", 0.0) <= PARAM_TOL, f"params differ by {errs}. repro: {line}"
    return job, got


# ------------------------------------------------------------------------ pure helpers
def test_schedules():
    for stage in range(4):
        order = stage_schedule("1f1b", 4, stage, 8, True)
        assert sorted(order) == sorted([("F", i) for i in range(8)] + [("B", i) for i in range(8)])
        assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(8))
        assert peak_in_flight(order) == 4 - stage
        assert peak_in_flight(stage_schedule("gpipe", 4, stage, 8, True)) == 8
    assert stage_schedule("1f1b", 2, 0, 3, False) == [("F", 0), ("F", 1), ("F", 2)]
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stage_schedule("zigzag", 2, 0, 2, True)


def test_shard_and_assemble_roundtrip():
    full = torch.arange(4 * 8 * 2, dtype=torch.float32).reshape(4, 8, 2)
    for pl in [
        (Shard(0), Shard(1)),
        (Shard(1), Shard(1)),
        (Replicate(), Shard(0)),
        (Shard(2), Replicate()),
    ]:
        shards = {(a, b): local_shard(full, pl, (a, b), (2, 2)) for a in range(2) for b in range(2)}
        assert torch.equal(assemble(shards, pl, (2, 2)), full), pl
    parts = {(a,): local_shard(full, (Partial(),), (a,), (2,)) for a in range(2)}
    assert torch.equal(assemble(parts, (Partial(),), (2,)), full)


def test_plan_groups_cover_axes_stages_and_pairs():
    from meshweave.passes.parallel.plan import Plan

    plan = Plan(DeviceMesh((2, 2), ("dp", "tp")), num_stages=2)
    groups = {tuple(g) for g in plan_group_rank_lists(plan)}
    assert {(0, 2), (1, 3), (0, 1), (2, 3), (4, 6), (5, 7), (4, 5), (6, 7)} <= groups  # axes
    assert {(0, 1, 2, 3), (4, 5, 6, 7)} <= groups  # whole stages
    assert {(0, 4), (1, 5), (2, 6), (3, 7)} <= groups  # stage-to-stage pairs


# ------------------------------------------------------------------------ numerics
@pytest.mark.timeout(150)
@pytest.mark.parametrize("model", MODELS)
def test_dp_pp_zero_match_single_device(model, traced):
    for name, kw in SPLIT_CASES:
        job, got = check_case(model, traced, **kw)
        ranks = got.ranks
        if kw.get("pp", 1) > 1:  # each stage holds only its own parameters
            total = sum(t.numel() for t in job.graph.tensors.values())
            assert all(r.param_numel < 0.8 * total for r in ranks), name
        if kw.get("zero"):  # ZeRO-1: optimizer state for a 1/dp slice only
            for r in ranks:
                assert 0 < r.optim_state_numel <= r.param_numel // 2 + len(r.params), name


# Adam's normalisation hides a doubled gradient almost entirely: doubling every gradient of this
# case moves the parameters by ~1.5e-4 after two steps, and the run's own rounding is ~3e-6. The
# tolerance sits between, more than 10x below the doubled-gradient error.
ADAM_PARAM_TOL = 1e-5


def _adam_pipeline_spec():
    from meshweave.runtime.distributed.optim import OptimConfig

    # 4 stages, 1F1B with 4 micro-batches, Adam
    return RunSpec(
        "gpt-tiny",
        pp=4,
        micro_batches=4,
        schedule="1f1b",
        training=True,
        batch=BATCH,
        seq=SEQ,
        lowering="split",
        optim=OptimConfig("adam", lr=1e-3),
    )


@pytest.mark.timeout(60)
def test_adam_and_deep_pipeline(traced):
    spec = _adam_pipeline_spec()
    job = prepare(spec, traced("gpt-tiny"), traced.graphs)
    errs = compare(run_single_device(job), run_distributed(job))
    assert errs["loss"] < OUT_TOL and errs["params"] < ADAM_PARAM_TOL, (
        errs, repro("gpt-tiny", spec))


@pytest.mark.timeout(120)
def test_doubled_gradients_fail_the_adam_check(traced, monkeypatch):
    """The margin above, tested: ranks that double every gradient before the step fail it."""
    from meshweave.runtime.distributed import optim
    from meshweave.runtime.distributed.launch import fork_keeps_autograd

    if not fork_keeps_autograd():
        pytest.skip("forked ranks cannot run autograd here, and only fork carries the patch")
    real = optim.ShardedOptimizer.step

    def doubled(self):
        for p in self.params.values():
            if p.grad is not None:
                p.grad.mul_(2.0)
        return real(self)

    monkeypatch.setattr(optim.ShardedOptimizer, "step", doubled)  # forked ranks inherit it
    job = prepare(_adam_pipeline_spec(), traced("gpt-tiny"), traced.graphs)
    errs = compare(run_single_device(job), run_distributed(job, start_method="fork"))
    assert errs["params"] > 10 * ADAM_PARAM_TOL, errs


# ------------------------------------------------------------------------ weight loading
@pytest.mark.timeout(60)
def test_tp_ranks_hold_only_their_weight_shards(traced):
    """TP=2: each rank's parameter storage is its shards (sharded weights: exactly half)."""
    pytest.importorskip("meshweave.passes.parallel.lower")
    job, got = check_case("gpt-tiny", traced, tp=2, lowering="planner")
    full = {v.name: job.graph.tensors[v.name] for v in job.graph.inputs if v.kind == "param"}
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    for r in got.ranks:
        shard_bytes = sum(t.numel() * t.element_size() for t in r.params.values())
        assert r.param_bytes == shard_bytes < full_bytes, (r.rank, r.param_bytes, full_bytes)
        sharded = [n for n in r.params if r.specs[n]]
        assert sharded, "a TP=2 plan shards some weights"
        held = sum(r.params[n].numel() * r.params[n].element_size() for n in sharded)
        assert 2 * held == sum(full[n].numel() * full[n].element_size() for n in sharded)


def test_rank_job_has_no_weights(traced, tmp_path):
    job = prepare(
        RunSpec("gpt-tiny", dp=2, batch=BATCH, seq=SEQ, lowering="split"), traced("gpt-tiny")
    )
    rjob = rank_job(job, str(tmp_path / "w.pt"))
    assert rjob.model_state == {}
    # tied weights are found in the parent (meta tensors do not share storage)
    assert rjob.ties == [(["p_tok_emb_weight", "p_lm_head_weight"], [0])]
    assert all(t.device.type == "meta" for t in rjob.graph.tensors.values())
    assert all(t.device.type == "cpu" for t in job.graph.tensors.values())  # parent's untouched
    with pytest.raises(DistributedError, match="needs a job with a weight checkpoint"):
        run_rank(0, 2, job)  # a job with full weights is refused before any collective
    name, meta = next(iter(rjob.graph.tensors.items()))
    (got,) = load_rank_tensors(rjob.checkpoint, {name: meta}, {}).values()
    assert torch.equal(got, job.graph.tensors[name])


@pytest.mark.timeout(60)
def test_missing_or_corrupt_checkpoint_names_the_file(traced, tmp_path):
    job = prepare(
        RunSpec("gpt-tiny", dp=2, batch=BATCH, seq=SEQ, lowering="split"), traced("gpt-tiny")
    )
    path = tmp_path / "weights.pt"
    rjob = rank_job(job, str(path))
    meta = dict(rjob.graph.tensors)
    with pytest.raises(DistributedError, match="has no tensor 'nope'"):
        load_rank_tensors(str(path), {"nope": next(iter(meta.values()))}, {})
    gone = str(tmp_path / "gone.pt")
    with pytest.raises(DistributedError, match=f"rank 1: weight checkpoint {re.escape(gone)} does"):
        load_rank_tensors(gone, meta, {}, rank=1)
    path.write_bytes(path.read_bytes()[:100])  # truncated: a corrupt file
    with pytest.raises(DistributedError, match=r"rank \d raised \S*DistributedError") as e:
        launch(run_rank, 2, (rjob,), timeout_s=30)
    assert f"cannot read weight checkpoint {path}: RuntimeError" in str(e.value).splitlines()[0]


# ------------------------------------------------------------------------ faults
def _allreduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("injected failure on rank 1")
    return _allreduce(rank, world)  # the others block in a collective rank 1 never joins


def _die_on_rank2(rank, world):
    if rank == 2:
        os._exit(7)
    return _allreduce(rank, world)


def _hang(rank, world):
    time.sleep(60)


# The fault tests assert the error path and its text. A rank that fails is reported by name
# before the launch's own timeout (FAULT_TIMEOUT_S), which would raise "timed out" instead and
# fail the match; pytest's timeout, well above it, only guards against a hang.
FAULT_TIMEOUT_S = 60


@pytest.mark.timeout(3 * FAULT_TIMEOUT_S)
def test_rank_that_raises_fails_the_launch():
    with pytest.raises(DistributedError, match="rank 1 raised ValueError: injected") as e:
        launch(_raise_on_rank1, 3, timeout_s=FAULT_TIMEOUT_S)
    assert e.value.rank == 1 and "Traceback" in e.value.detail


@pytest.mark.timeout(3 * FAULT_TIMEOUT_S)
def test_rank_that_dies_fails_the_launch():
    with pytest.raises(DistributedError, match="rank 2 died with exit code 7") as e:
        launch(_die_on_rank2, 4, timeout_s=FAULT_TIMEOUT_S)
    assert e.value.rank == 2


@pytest.mark.timeout(3 * FAULT_TIMEOUT_S)
@pytest.mark.parametrize("fault", ["raise", "exit"])
def test_fault_inside_a_1f1b_pipeline_step(fault, traced, monkeypatch):
    """Rank 1 (last stage) fails in its first backward while rank 0 waits for its gradient."""
    from meshweave.runtime.distributed import executor
    from meshweave.runtime.distributed.launch import fork_keeps_autograd

    if not fork_keeps_autograd():  # torch 2.11 after an earlier backward in this process
        pytest.skip("forked ranks cannot run autograd here, and only fork carries the patch")

    real = executor.RankExecutor._backward

    def faulty(self, mb):
        if self.rank == 1:
            if fault == "exit":
                os._exit(9)
            raise RuntimeError("injected backward failure")
        return real(self, mb)

    monkeypatch.setattr(executor.RankExecutor, "_backward", faulty)  # forked ranks inherit it
    spec = RunSpec(
        "gpt-tiny",
        pp=2,
        micro_batches=4,
        schedule="1f1b",
        training=True,
        batch=BATCH,
        seq=SEQ,
        lowering="split",
    )
    job = prepare(spec, traced("gpt-tiny"), traced.graphs)
    want = "rank 1 raised RuntimeError: injected" if fault == "raise" else "rank 1 died"
    with pytest.raises(DistributedError, match=want):
        run_distributed(job, start_method="fork")


@pytest.mark.timeout(60)
def test_hung_ranks_time_out():
    """Ranks that hang (they sleep 60 s) end in the launch's 3 s timeout, named as such."""
    with pytest.raises(DistributedError, match="timed out after 3"):
        launch(_hang, 2, timeout_s=3)


@pytest.mark.timeout(90)
def test_spawn_start_method():
    assert launch(_allreduce, 2, timeout_s=80, start_method="spawn") == [3.0, 3.0]


def test_unknown_device_and_missing_gpus_are_clear_errors():
    from meshweave.runtime.distributed.runner import check_devices

    with pytest.raises(ValueError, match="unknown device 'tpu'; known: \\('cpu', 'cuda'\\)"):
        RunSpec("gpt-tiny", device="tpu")
    assert RunSpec("gpt-tiny").backend == "gloo"
    assert RunSpec("gpt-tiny", device="cuda").backend == "nccl"
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DistributedError, match=f"{have + 1} ranks need {have + 1} GPUs"):
        check_devices(RunSpec("gpt-tiny", device="cuda", dp=have + 1), have + 1)


@pytest.mark.timeout(60)
def test_mesh_that_does_not_match_the_world_is_an_error(traced):
    job = prepare(
        RunSpec("gpt-tiny", dp=2, batch=BATCH, seq=SEQ, lowering="split"), traced("gpt-tiny")
    )
    with pytest.raises(DistributedError, match="plan needs 2 ranks, the world has 3"):
        launch(run_rank, 3, (job,), timeout_s=30)
    with pytest.raises(ValueError, match="DeviceMesh"):
        DeviceMesh.parse("2x0")


@pytest.mark.timeout(60)
def test_under_torchrun_env(monkeypatch, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(k, v)
    assert launch(_allreduce, 1) == [1.0]
    assert not dist.is_initialized()
    # `meshweave run` under torchrun: this process compiles and runs rank 0 of one
    from meshweave.cli import main

    argv = ["run", "--model", "gpt-tiny", "--mesh", "1", "--plan", "dp", "--seq", str(SEQ)]
    assert main([*argv, "--train", "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="torchrun started 1 ranks but this run needs 2"):
        launch(_allreduce, 2)


@pytest.mark.timeout(240)
def test_torchrun_two_ranks_tensor_parallel_training(tmp_path):
    """The real launcher: torchrun starts 2 processes; each compiles with mesh tp=2 (rank 0's
    plan is the one both run), trains 2 steps on its shards through meshweave.compile's
    CompiledModel, and --check on rank 0 compares with one device."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "meshweave", "run", "--model", "gpt-tiny", "--mesh", "tp=2", "--train",
           "--seq", str(SEQ), "--check", "--timeout", "150"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=220, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    assert "check passed" in r.stdout, r.stdout
    assert "1 stage(s) x mesh 1x2 (dp, tp) = 2 ranks" in r.stdout, r.stdout


# ------------------------------------------------------------------------ CLI
@pytest.mark.timeout(120)
def test_cli_run_check(capsys, monkeypatch):
    """`meshweave run` through meshweave.compile: 2 stages x dp=2 with 2 micro-batches and
    ZeRO-1 (cm.zero_optimizer), trained with Adam and checked against one device; a wrong
    reference fails the check; flags that cannot apply are one-line errors."""
    from meshweave.runtime.distributed import runner

    from meshweave.cli import main

    argv = ["run", "--model", "gpt-tiny", "--mesh", "2", "--pp", "2", "--plan", "dpxpp",
            "--train", "--micro-batches", "2", "--zero", "--optim", "adam", "--seq", str(SEQ),
            "--check"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "max |distributed - single device| params" in out
    assert "2 stage(s) x mesh 2x1 (dp, tp) = 4 ranks, 2 micro-batch(es), ZeRO-1 on" in out
    # Adam keeps two moments per element; ZeRO-1 over dp=2 keeps about half of them per rank
    held, state = map(int, re.search(r"rank 0: (\d+) parameter elements, optimizer state "
                                     r"(\d+) elements \(ZeRO-1 over dp\)", out).groups())
    assert 0.8 * held <= state <= 1.2 * held, out

    real = runner.single_device

    def perturbed(*args, **kwargs):  # a wrong reference must make --check fail
        ref = real(*args, **kwargs)
        ref.params = {k: v + 1e-2 for k, v in ref.params.items()}
        return ref

    monkeypatch.setattr(runner, "single_device", perturbed)
    assert main(argv) == 1
    capsys.readouterr()
    assert main(["run", "--model", "gpt-tiny", "--mesh", "dp=2", "--zero"]) == 2
    assert "--zero shards the optimizer state: it needs --train" in capsys.readouterr().err