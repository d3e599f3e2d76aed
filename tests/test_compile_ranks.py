"""compile(mesh=...) as the front door of parallel training: real torchrun ranks on gloo run a
user's script (tests/torchrun_train.py, Python API only) and match one device after two AdamW
steps, losses and every parameter (cm.state_dict(), gathered from the shards)."""

import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "torchrun_train.py")


def _torchrun(ranks: int, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), SCRIPT, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=200, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.timeout(240)
def test_two_ranks_data_parallel_with_gradient_accumulation_and_zero1():
    """dp=2, two backward() calls per step, cm.zero_optimizer(AdamW): one device's AdamW steps,
    with each rank keeping the two moments of only some of the parameters."""
    out = _torchrun(2, "dp=2", "--accumulate", "--zero")
    assert "plan: 1 stage(s) x mesh 2x1" in out, out
    assert "missing []" in out, out
    held, state = map(int, re.search(r"rank 0 holds (\d+) of \d+ parameter elements, "
                                     r"optimizer state (\d+) elements", out).groups())
    assert 0.5 * held <= state <= 1.5 * held, out  # AdamW's 2 moments of about half of them


@pytest.mark.timeout(240)
def test_per_rank_batches_as_ddp_takes_them():
    """local_batch=True: each rank feeds its own half of the batch and gets its half's
    logits; the mean of the ranks' local losses and the AdamW steps equal one device's."""
    out = _torchrun(2, "dp=2", "--per-rank-batch")
    assert "missing []" in out, out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks,mesh", [(4, "dp=2,tp=2"),
                                        pytest.param(2, "tp=2", marks=pytest.mark.heavy)])
def test_a_module_returning_its_loss_trains_vocab_parallel(ranks, mesh):
    """The cross-entropy inside the compiled module: under dp=2,tp=2 (and tp=2 alone) the
    log-softmax and the target pick run on vocab-split logits (max and sum all-reduced),
    and two AdamW steps equal one device's."""
    out = _torchrun(ranks, mesh, "--loss-in-model")
    assert "missing []" in out, out
    assert "backward: meshweave IR" in out, out  # the rank's backward IR ran (rank_joint.py)


@pytest.mark.timeout(240)
def test_per_rank_batches_through_pipeline_stages():
    """local_batch=True on dp=2,pp=2 with 2 micro-batches: each rank's outputs are its own
    rows, sent by the last stage's rank at its mesh coordinates; two AdamW steps equal one
    device's."""
    out = _torchrun(4, "dp=2,pp=2", "--per-rank-batch", "--micro-batches", "2")
    assert "plan: 2 stage(s) x mesh 2x1, 2 micro-batch(es)" in out and "missing []" in out, out


@pytest.mark.timeout(240)
@pytest.mark.heavy
def test_per_rank_batches_with_tensor_parallelism_and_micro_batches():
    out = _torchrun(4, "dp=2,tp=2", "--per-rank-batch", "--micro-batches", "2")
    assert "plan: 1 stage(s) x mesh 2x2, 2 micro-batch(es)" in out and "missing []" in out, out


@pytest.mark.timeout(240)
@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_four_ranks_dp2_tp2_hold_half_the_parameters():
    out = _torchrun(4, "dp=2,tp=2")
    assert "plan: 1 stage(s) x mesh 2x2" in out, out
    held = out.split("rank 0 holds ")[1].split(" of ")
    assert int(held[0]) < int(held[1].split()[0]), out  # tensor parallelism sharded them


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.heavy  # long: the default run keeps a lighter case of the same path
def test_four_ranks_pp2_tp2_with_two_micro_batches():
    out = _torchrun(4, "pp=2,tp=2", "--micro-batches", "2")
    assert "plan: 2 stage(s) x mesh 1x2, 2 micro-batch(es)" in out, out
    assert "backward: meshweave IR" in out, out  # transfers outside the traced stage
