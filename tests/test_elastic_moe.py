"""Elastic expert-parallel MoE serving (runtime/distributed/elastic/): live re-scaling with real
gloo ranks on CPU, every answer checked against the single-device eager model.

Reproduce: .venv/bin/pytest tests/test_elastic_moe.py -x -q
"""

import importlib.util
import os
import re
import signal
import time

import pytest
import torch

from meshweave.ir.ops.moe import moe_experts
from meshweave.runtime.distributed import DistributedError
from meshweave.runtime.distributed.elastic.driver import RequestStream, check, summary
from meshweave.runtime.distributed.elastic.exchange import ep_moe
from meshweave.runtime.distributed.elastic.placement import (
    PlacementError, expert_moves, plan_placement)
from meshweave.runtime.distributed.elastic.server import ElasticServer, ScaleError
from meshweave.runtime.distributed.elastic.weights import (
    moe_config, reference_model, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_planner_balances_and_moves_only_changed_owners():
    assert plan_placement(4, 2) == (0, 0, 1, 1)
    assert plan_placement(7, 3) == (0, 0, 0, 1, 1, 2, 2)
    up = plan_placement(4, 4, previous=(0, 0, 1, 1))
    assert up == (0, 2, 1, 3)  # experts 0 and 2 stay where they are
    assert expert_moves((0, 0, 1, 1), up) == [(1, 0, 2), (3, 1, 3)]
    down = plan_placement(8, 2, previous=plan_placement(8, 4))
    assert sorted(down.count(r) for r in (0, 1)) == [4, 4]
    assert len(expert_moves(plan_placement(8, 4), down)) == 4  # only rank 2's and 3's experts
    with pytest.raises(PlacementError, match="cannot place 4 experts on 5 ranks.*at most 4"):
        plan_placement(4, 5)


def test_exchange_on_one_rank_matches_the_eager_rule_with_skewed_routing():
    """ep_moe over a 1-rank gloo group is moe.experts' eager rule, even when one expert gets
    every token; a row for an expert the rank does not hold is a clear error."""
    import datetime

    import torch.distributed as dist

    pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=10))
    g = torch.Generator().manual_seed(0)
    e, d, f, t = 4, 8, 16, 10
    w_in, w_gate, w_out = (torch.randn(e, *s, generator=g) for s in ((d, f), (d, f), (f, d)))
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.full((t,), 2), torch.randint(0, e, (t,), generator=g)], 1)
    weights = torch.rand(t, 2, generator=g)
    experts = {i: (w_in[i], w_gate[i], w_out[i]) for i in range(e)}
    got = ep_moe(x, weights, ids, torch.zeros(e, dtype=torch.long), experts, pg)
    want, _ = moe_experts(x, weights, ids, w_in, w_gate, w_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    del experts[2]
    with pytest.raises(DistributedError, match="rows for expert 2, which this rank does not hold"):
        ep_moe(x, weights, ids, torch.zeros(e, dtype=torch.long), experts, pg)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = moe_config("moe-tiny")
    ref = reference_model(cfg, seed=0)
    path = str(tmp_path_factory.mktemp("elastic") / "moe-tiny.pt")
    save_checkpoint(ref, path)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (b, 8), generator=gen) for b in (3, 4, 5, 2)]
    with torch.no_grad():
        refs = [ref(b) for b in batches]
    server = ElasticServer(cfg, path, join_timeout_s=40, request_timeout_s=20, pg_timeout_s=10)
    server.start(2)
    yield server, batches, refs
    server.stop()


def test_scale_up_and_down_while_requests_flow(served):
    server, batches, refs = served
    stream = RequestStream(server, batches, refs).start()
    time.sleep(0.3)
    up = server.scale(4)
    t_up = server.wait_first_answer(up.gen) - up.t_request
    down = server.scale(2)
    server.wait_first_answer(down.gen)
    records = stream.stop()
    during_up = summary(records, up.t_request, up.t_switch)
    total = summary(records)
    assert total["failed"] == 0 and total["mismatched"] == 0, total
    assert {0, up.gen, down.gen} <= set(total["gens"]), total
    assert during_up["requests"] >= 1, "no request was answered while scaling up"
    # only the experts whose owner changed were sent, each once, by its old owner
    assert [tuple(m) for m in up.moves] == [(1, 0, 2), (3, 1, 3)]
    assert up.experts_sent == [1, 3] and down.experts_sent == [1, 3]
    # ranks that stay keep the experts they still own, in place: kept + moved = every expert
    for report in (up, down):
        kept = sorted(e for s in report.worker_stats.values() for e in s["kept"])
        assert kept == [0, 2] and sorted(kept + report.experts_sent) == [0, 1, 2, 3]
    d, f, layers = 64, 128, 2
    assert up.bytes_sent == 2 * layers * 3 * d * f * 4
    assert server.world == 2 and server.owner == (0, 0, 1, 1)
    assert 0 < t_up < 40


def test_a_joining_rank_that_dies_rolls_back(served):
    server, batches, refs = served
    world, gen = server.world, server.gen
    first_joiner = server._next_wid
    t = time.time()
    with pytest.raises(ScaleError, match=r"scaling 2 -> 4 ranks failed and was rolled back to "
                       r"generation \d+ \(2 ranks\), which keeps serving: .*worker "
                       rf"{first_joiner}\b.*(died with exit code 17|failed)"):
        server.scale(4, fault={"wid": first_joiner, "stage": "transfer"})
    assert time.time() - t < 40
    assert server.world == world and server.gen == gen
    # killed from outside (SIGKILL) while it starts up
    t = time.time()
    with pytest.raises(ScaleError, match=r"rolled back to generation \d+ \(2 ranks\).*died "
                       r"with exit code -9") as info:
        server.scale(4, on_spawn=lambda procs: os.kill(procs[-1].pid, signal.SIGKILL))
    assert info.value.rolled_back and time.time() - t < 40
    assert server.world == world and server.gen == gen
    for b, r in zip(batches, refs):
        out, g = server.request(b)
        assert g == gen and check(out, r)[0]


def test_scaling_past_the_expert_count_is_refused(served):
    server, _, _ = served
    with pytest.raises(PlacementError, match="cannot place 4 experts on 5 ranks"):
        server.scale(5)
    assert server.world == 2
    with pytest.raises(ValueError, match=r"expected token ids int64 \[B >= 1, 1 <= S <= 64\]; "
                       r"got torch.float32 \[2, 8\]"):
        server.request(torch.zeros(2, 8))


def test_benchmark_tiny_run_prints_its_summary_line(capsys):
    spec = importlib.util.spec_from_file_location(
        "elastic_moe_bench", os.path.join(ROOT, "benchmarks", "elastic_moe.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--configs", "moe-tiny", "--small", "1", "--large", "2", "--steady-requests", "2"])
    out = capsys.readouterr().out
    assert "requests served during scaling: up" in out and "scale-up latency: elastic" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"scale-up ratio vs restart: \d+\.\d; failed 0; mismatched 0", last), last
