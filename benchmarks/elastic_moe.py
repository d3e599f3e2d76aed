"""Live re-scaling of a MoE inference job vs stop-and-restart (issue 16 item 5, ElasticMoE).

    python benchmarks/elastic_moe.py [--configs moe-tiny,moe-large] [--small 2] [--large 4]

Per config: start `small` gloo ranks on CPU, stream requests (one in flight; each answer
checked against the single-device eager model on the same weights), scale to `large` ranks
and back to `small` while the stream runs, then measure the baseline on the same job: stop it
and relaunch at `large` from the checkpoint (process start + torch import + model build +
weight load + group init) until the first request is answered.

Scale-up latency, elastic: from the scale request until the new mesh answers its first request,
end to end: it includes spawning the joining processes (no standby processes on either side;
with --standby, both sides get processes started, torch imported, before their clocks start).
Restart: from the stop until the relaunched mesh answers its first request; nothing is answered
meanwhile. The last line's R is the smallest ratio (restart / elastic) over the configs, F and M
the failed and mismatched requests over all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshweave.runtime.distributed.elastic.driver import RequestStream, check, summary  # noqa: E402
from meshweave.runtime.distributed.elastic.server import ElasticServer  # noqa: E402
from meshweave.runtime.distributed.elastic.weights import (  # noqa: E402
    moe_config, reference_model, save_checkpoint)


def wait_requests(stream: RequestStream, n: int, timeout_s: float = 300.0) -> None:
    start, deadline = len(stream.records), time.time() + timeout_s
    while len(stream.records) < start + n and time.time() < deadline:
        time.sleep(0.01)


def run_config(name: str, small: int, large: int, steady: int, workdir: str,
               standby: bool = False) -> dict:
    cfg = moe_config(name)
    ref = reference_model(cfg, seed=0)
    path = os.path.join(workdir, f"{name}.pt")
    save_checkpoint(ref, path)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=gen) for _ in range(4)]
    with torch.no_grad():
        refs = [ref(b) for b in batches]
    del ref
    server = ElasticServer(cfg, path)
    server.start(small)
    stream = RequestStream(server, batches, refs).start()
    wait_requests(stream, steady)
    if standby:
        server.prespawn(large - small)
    up = server.scale(large)
    t_up_answer = server.wait_first_answer(up.gen)
    wait_requests(stream, steady)
    down = server.scale(small)
    t_down_answer = server.wait_first_answer(down.gen)
    wait_requests(stream, steady)
    records = stream.stop()

    if standby:  # the restart gets the same benefit: its processes are up before the stop
        relaunched = ElasticServer(cfg, path)
        relaunched.prespawn(large)
    t0 = time.time()  # the baseline: stop, relaunch at `large` from the checkpoint
    server.stop()
    t_stopped = time.time()
    if not standby:
        relaunched = ElasticServer(cfg, path)
    relaunched.start(large)
    t_started = time.time()
    out, _ = relaunched.request(batches[0])
    t_restart = time.time() - t0
    restart_ok = check(out, refs[0])[0]
    relaunched.stop()

    scaling = [(up.t_request, t_up_answer), (down.t_request, t_down_answer)]
    steady_recs = [r for r in records if not any(a <= r.t_submit < b for a, b in scaling)]
    total = summary(records)
    return {
        "name": name, "standby": standby, "small": small, "large": large,
        "elastic_up_s": t_up_answer - up.t_request,
        "elastic_down_s": t_down_answer - down.t_request,
        "restart_s": t_restart,
        "phases_restart": (t_stopped - t0, t_started - t_stopped, t0 + t_restart - t_started),
        "up": summary(records, *scaling[0]),
        "down": summary(records, *scaling[1]), "steady": summary(steady_recs), "total": total,
        "moved_up": len(up.experts_sent), "bytes_up": up.bytes_sent,
        "moved_down": len(down.experts_sent), "experts": cfg.num_experts,
        "phases_up": (up.t_loaded - up.t_request, up.t_ready - up.t_loaded,
                      up.t_switch - up.t_ready, t_up_answer - up.t_switch),
        "transfer_up_s": max(s.get("transfer_s", 0.0) for s in up.worker_stats.values()),
        "failed": total["failed"], "mismatched": total["mismatched"] + (not restart_ok),
    }


def report(r: dict) -> None:
    ratio = r["restart_s"] / r["elastic_up_s"]
    print(f"== {r['name']}{' (standby processes on both sides)' if r['standby'] else ''}: "
          f"{r['experts']} experts, {r['small']} -> {r['large']} -> "
          f"{r['small']} ranks")
    print(f"  scale-up latency: elastic {r['elastic_up_s']:.2f} s, restart {r['restart_s']:.2f} s"
          f", ratio {ratio:.1f}x; scale-down (elastic) {r['elastic_down_s']:.2f} s")
    spawn, connect, switch, answer = r["phases_up"]
    print(f"  elastic scale-up phases: joiners started + dense weights loaded {spawn:.2f} s, "
          f"groups + expert transfer {connect:.2f} s (transfer {r['transfer_up_s']:.2f} s), "
          f"switch {switch:.2f} s, first answer {answer:.2f} s")
    stop, start, first = r["phases_restart"]
    print(f"  restart phases: stop {stop:.2f} s, {r['large']} ranks started + all their weights "
          f"loaded + group {start:.2f} s, first answer {first:.2f} s")
    print(f"  experts moved: up {r['moved_up']} ({r['bytes_up'] / 2**20:.1f} MiB), "
          f"down {r['moved_down']}")
    print(f"  requests served during scaling: up {r['up']['requests']}, down "
          f"{r['down']['requests']}; during restart: 0 (the job is down)")
    print(f"  p99 latency: during scale-up {r['up']['p99_s'] * 1e3:.0f} ms, during scale-down "
          f"{r['down']['p99_s'] * 1e3:.0f} ms, steady {r['steady']['p99_s'] * 1e3:.0f} ms "
          f"(p50 steady {r['steady']['p50_s'] * 1e3:.0f} ms)")
    print(f"  requests {r['total']['requests']}: failed {r['failed']}, mismatched "
          f"{r['mismatched']} (max abs err {r['total']['max_err']:.1e})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="moe-tiny,moe-large")
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--steady-requests", type=int, default=10)
    ap.add_argument("--standby", action="store_true",
                    help="pre-spawn the processes (torch imported) of both the elastic joiners "
                    "and the restart, before their clocks start")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="elastic-moe-") as workdir:
        for name in args.configs.split(","):
            results.append(run_config(name, args.small, args.large, args.steady_requests,
                                      workdir, args.standby))
            report(results[-1])
    ratio = min(r["restart_s"] / r["elastic_up_s"] for r in results)
    failed = sum(r["failed"] for r in results)
    mismatched = sum(r["mismatched"] for r in results)
    print(f"scale-up ratio vs restart: {ratio:.1f}; failed {failed}; mismatched {mismatched}")


if __name__ == "__main__":
    main()
