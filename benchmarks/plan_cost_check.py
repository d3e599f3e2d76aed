"""Does the planner's cost model rank whole plans the way real runs do? (cost_model_check --cpu)

    python benchmarks/plan_cost_check.py [--steps 6] [--batch 16] [--seq 32]

Calibrates a HardwareSpec on this machine (`meshweave calibrate`'s functions: matmul rate,
memory bandwidth, per-kernel latency, gloo all-reduce at two sizes), builds at least 8 distinct
training plans of a small GPT on 4 ranks (DP, TP, PP, DP x TP, DP x PP, TP x PP, different
micro-batch counts, with and without ZeRO-1), runs each on 4 real gloo ranks, and compares the
measured step time (the slowest rank's median over the steps after the first) with the plan's
estimate (`plan.estimate["total"]`). The last line is `spearman R, median abs error E%`.

On a CPU the 4 ranks share the machine's cores, so each "device" is a share of them: the
calibration is scaled by cores / ranks (compute and memory bandwidth divided, kernel latency
multiplied), the way a 4-rank job on 2 cores really runs. Recompute plans are not among the
cases: no backend executes recompute yet, so their estimate has nothing to be compared with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

RANKS = 4
# (dp, tp, pp, micro-batches, ZeRO-1): the plans compared (ZeRO-1 needs dp > 1).
LAYOUTS = [
    (4, 1, 1, 1, True),
    (4, 1, 1, 1, False),
    (1, 4, 1, 1, False),
    (2, 2, 1, 1, True),
    (2, 2, 1, 2, False),
    (1, 1, 4, 4, False),
    (2, 1, 2, 2, True),
    (1, 2, 2, 2, False),
    (1, 2, 2, 4, False),
]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (scipy's, ties averaged)."""
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def shared_device_spec(spec, ranks: int, cores: int):
    """The calibrated one-process spec, as one of `ranks` processes sharing `cores` cores."""
    share = min(1.0, cores / ranks)
    return dataclasses.replace(
        spec,
        name=f"{spec.name}/{ranks}-ranks-on-{cores}-cores",
        flops={k: v * share for k, v in spec.flops.items()},
        memory_bandwidth=spec.memory_bandwidth * share,
        kernel_latency_s=min(spec.kernel_latency_s / share, 9.9e-4),
    )


def fit_runtime_latency(spec, traced, model, batch, seq, layers, steps):
    """The per-op latency of this runtime (dispatch, autograd and the executor's own work per
    node), fitted on ONE rank: the extra time of 8 micro-batches over 1 is per-node work, so
    L solves measured(mb8) - measured(mb1) = estimate(mb8, L) - estimate(mb1, L) (medians of 3
runs each). One rank
    is none of the compared plans; the fit is the calibration the raw op latency lacks."""
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan

    graph = traced[2]
    mbs = (1, 8)
    meas = [statistics.median(
        measure(megatron_plan(graph, 1, 1, 1, mb, batch=batch, training=True, spec=spec),
                traced, model, batch, seq, layers, 2 * steps) for _ in range(3)) for mb in mbs]

    def est_diff(lat):
        s = dataclasses.replace(spec, kernel_latency_s=lat)
        e = [megatron_plan(graph, 1, 1, 1, mb, batch=batch, training=True, spec=s)
             .estimate["total"] for mb in mbs]
        return e[1] - e[0]

    lo, hi = est_diff(0.0), est_diff(5e-4)
    lat = (meas[1] - meas[0] - lo) / (hi - lo) * 5e-4
    return min(max(lat, spec.kernel_latency_s), 9.9e-4), meas


def build_plans(graph, spec, batch: int):
    from meshweave.passes.parallel.search.megatron_grid import megatron_plan

    plans = []
    for dp, tp, pp, mb, zero in LAYOUTS:
        plan = megatron_plan(graph, dp, tp, pp, mb, batch=batch, training=True, spec=spec,
                             zero=zero)
        assert plan.zero == zero, (dp, tp, pp, mb, zero)
        plans.append((f"dp{dp} tp{tp} pp{pp} mb{mb}{' zero1' if zero else ''}", plan))
    return plans


def measure(plan, traced, model: str, batch: int, seq: int, layers: int, steps: int) -> float:
    """The plan's training step time on RANKS gloo ranks: slowest rank, median of steps 2..n."""
    from meshweave.runtime.distributed.runner import RunSpec, prepare, run_distributed

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plan.json")
        with open(path, "w") as fh:
            fh.write(plan.to_json())
        spec = RunSpec(model, plan="file", plan_file=path, training=True, steps=steps,
                       batch=batch, seq=seq, layers=layers, lowering="planner")
        result = run_distributed(prepare(spec, traced))
    return max(statistics.median(r.step_seconds[1:]) for r in result.ranks)


def run(steps: int = 6, batch: int = 16, seq: int = 32, layers: int = 4,
        model: str = "gpt-tiny", quick: bool = False) -> dict:
    import torch
    from meshweave.passes.parallel.cost.calibrate import calibrate, loopback_link
    from meshweave.runtime.distributed.runner import trace_model

    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base, report = calibrate(None, 256 if quick else 512, comm=True, device="cpu")
    link = loopback_link(RANKS)  # the link as RANKS ranks on these cores see it
    spec = dataclasses.replace(shared_device_spec(base, RANKS, cores), intra_node=link)
    print(f"gloo link at {RANKS} ranks: {link.latency_s * 1e6:.0f} us, "
          f"{link.bandwidth_Bps / 1e9:.2f} GB/s")
    print(f"calibrated on {cores} cores (torch {torch.__version__}), one process:\n{report}")
    print(f"as one of {RANKS} ranks: {spec.flops.get('float32', 0) / 1e9:.2f} GFLOP/s fp32, "
          f"{spec.memory_bandwidth / 1e9:.2f} GB/s, kernel latency "
          f"{spec.kernel_latency_s * 1e6:.0f} us\n")
    traced = trace_model(model, batch, seq, layers)
    one = shared_device_spec(base, 1, cores)  # one rank alone: the whole (single-thread) core
    lat, meas = fit_runtime_latency(one, traced, model, batch, seq, layers, steps)
    print(f"runtime per-op latency fitted on 1 rank ({meas[0] * 1e3:.1f} ms at 1 micro-batch, "
          f"{meas[1] * 1e3:.1f} ms at 8): {lat * 1e6:.1f} us (raw op: "
          f"{base.kernel_latency_s * 1e6:.1f} us)")
    spec = dataclasses.replace(spec, kernel_latency_s=min(lat * max(1.0, RANKS / cores), 9.9e-4))
    rows = []
    print(f"{model}, {layers} layers, batch {batch}, seq {seq}, {steps} training steps, "
          f"{RANKS} gloo ranks")
    print(f"{'plan':<26} {'estimated':>10} {'(compute':>10} {'comm':>9} {'bubble)':>9} "
          f"{'measured':>10} {'est/meas':>9}")
    for name, plan in build_plans(traced[2], spec, batch):
        est = plan.estimate["total"]
        meas = measure(plan, traced, model, batch, seq, layers, steps)
        rows.append({"plan": name, "estimated_s": est, "measured_s": meas})
        e = plan.estimate
        print(f"{name:<26} {est * 1e3:>8.2f}ms {e['compute'] * 1e3:>8.2f}ms "
              f"{e['comm'] * 1e3:>7.2f}ms {e['bubble'] * 1e3:>7.2f}ms "
              f"{meas * 1e3:>8.2f}ms {est / meas:>8.2f}x", flush=True)
    r = spearman([x["estimated_s"] for x in rows], [x["measured_s"] for x in rows])
    err = statistics.median(abs(x["estimated_s"] / x["measured_s"] - 1) for x in rows) * 100
    print(f"spearman {r:.2f}, median abs error {err:.0f}%")
    return {"rows": rows, "spearman": r, "median_abs_error_pct": err, "spec": spec.to_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--json", help="write the rows and the two figures here")
    args = p.parse_args(argv)
    out = run(args.steps, args.batch, args.seq, args.layers)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
