"""The planner's cost model against this machine: predicted vs measured, op by op.

    python benchmarks/cost_model_check.py [--quick]

The planner ranks plans by two formulas (passes/parallel): a roofline for compute
(HardwareSpec.compute_time: max(FLOPs / FLOP/s, bytes / bandwidth)) and an alpha-beta model
for collectives (collectives.collective_time: ring all-reduce = 2(n-1) alpha + 2(n-1)/n B/beta,
all-gather and reduce-scatter = (n-1) alpha + (n-1)/n B/beta). Their constants come from
`meshweave calibrate` (passes/parallel/calibrate.py): one matmul size, one large copy, and a
2-rank all-reduce at two message sizes. This script calibrates once, then times cases the
calibration never saw (other matmul shapes, bandwidth-bound ops, all-gather and reduce-scatter,
4 ranks, other message sizes) and prints predicted / measured for each. On a GPU box it checks
that box; here, a 2-core CPU with gloo on loopback.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _median_s(fn, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _collectives_worker(rank: int, world: int, cases: list[tuple[str, int]], iters: int):
    import warnings

    from meshweave.passes.parallel.calibrate import time_collectives

    warnings.filterwarnings("ignore")
    return time_collectives([(kind, nbytes // 4) for kind, nbytes in cases], iters)


def check_collectives(link, quick: bool) -> list[tuple]:
    from meshweave.passes.parallel.collectives import collective_time
    from meshweave.runtime.distributed.launch import launch

    sizes = [1 << 20] if quick else [1 << 16, 1 << 18, 1 << 22, 1 << 25]
    rows = []
    for world in (2,) if quick else (2, 4):
        cases = [(k, s) for k in ("all_reduce", "all_gather", "reduce_scatter") for s in sizes]
        times = launch(_collectives_worker, world, (cases, 5 if quick else 9), timeout_s=300,
                       backend="gloo")[0]
        busy = "*" if world > (os.cpu_count() or 1) else ""  # more ranks than cores
        for (kind, nbytes), t in zip(cases, times):
            rows.append((f"{kind} {world} ranks{busy}", f"{nbytes / 2**20:.2f} MiB",
                         collective_time(kind, nbytes, world, link), t))
    return rows


def check_compute(spec, quick: bool) -> list[tuple]:
    import torch

    rows = []
    shapes = [(256, 256, 256)] if quick else [
        (256, 256, 256), (128, 1024, 512), (1024, 512, 128), (64, 4096, 1024), (2048, 64, 2048),
        (512, 512, 2048)]
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        flops, nbytes = 2 * m * n * k, 4 * (m * k + k * n + m * n)
        rows.append((f"matmul {m}x{k} @ {k}x{n}", "fp32", spec.compute_time(flops, nbytes),
                     _median_s(lambda a=a, b=b: a @ b, 5)))
    sizes = [1 << 20] if quick else [1 << 20, 1 << 22, 1 << 24]
    for numel in sizes:
        x, y = torch.randn(numel), torch.randn(numel)
        out = torch.empty(numel)
        rows.append((f"add {numel / 2**20:.0f}M elements", "fp32",
                     spec.compute_time(numel, 12 * numel),
                     _median_s(lambda x=x, y=y, o=out: torch.add(x, y, out=o), 5)))
        rows.append((f"layer_norm {numel // 1024}x1024", "fp32",
                     spec.compute_time(8 * numel, 8 * numel),
                     _median_s(lambda x=x: torch.nn.functional.layer_norm(
                         x.view(-1, 1024), (1024,)), 5)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    args = p.parse_args(argv)

    import torch
    from meshweave.passes.parallel.calibrate import calibrate

    torch.set_num_threads(1)  # what each gloo rank has here; the spec is per device
    spec, report = calibrate(None, 512 if args.quick else 1024, comm=True)
    print(f"calibrated (torch {torch.__version__}, 1 thread per device):\n{report}\n")
    rows = check_compute(spec, args.quick) + check_collectives(spec.intra_node, args.quick)
    ratios = []
    print(f"{'case':<34} {'size':>10} {'predicted':>11} {'measured':>11} {'pred/meas':>9}")
    for case, size, pred, meas in rows:
        ratios.append(pred / meas)
        print(f"{case:<34} {size:>10} {pred * 1e3:>9.3f}ms {meas * 1e3:>9.3f}ms "
              f"{pred / meas:>8.2f}x")
    geo = statistics.geometric_mean(ratios)
    print(f"\n{len(rows)} cases: predicted/measured from {min(ratios):.2f}x to {max(ratios):.2f}x, "
          f"geometric mean {geo:.2f}x")
    if any("*" in r[0] for r in rows):
        print("* more ranks than CPU cores: those times include the ranks competing for cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
