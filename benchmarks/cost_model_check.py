"""The planner's cost model against this machine: predicted vs measured, op by op.

    python benchmarks/cost_model_check.py [--quick] [--cpu]

The planner ranks plans by two formulas (passes/parallel): a roofline for compute
(HardwareSpec.compute_time: max(FLOPs / FLOP/s, bytes / bandwidth)) and an alpha-beta model
for collectives (collectives.collective_time: ring all-reduce = 2(n-1) alpha + 2(n-1)/n B/beta,
all-gather and reduce-scatter = (n-1) alpha + (n-1)/n B/beta). Their constants come from
`meshweave calibrate` (passes/parallel/cost/calibrate.py): one matmul size, one large copy, and a
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
    import torch

    cuda = torch.cuda.is_available()
    fn()
    samples = []
    for _ in range(iters):
        if cuda:  # ten calls between events: a single small kernel is below the timer's noise
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 10 / 1e3)
            continue
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _collectives_worker(rank: int, world: int, cases: list[tuple[str, int]], iters: int):
    import warnings

    from meshweave.passes.parallel.cost.calibrate import time_collectives

    warnings.filterwarnings("ignore")
    return time_collectives([(kind, nbytes // 4) for kind, nbytes in cases], iters)


def check_collectives(link, quick: bool) -> list[tuple]:
    from meshweave.passes.parallel.cost.collectives import collective_time
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


# GPU cases: the GEMMs of a GPT-2-small / Llama-1B / Llama-8B layer at 1 to 8k tokens (fp16)
GPU_MATMULS = [(128, 768, 2304), (4096, 768, 3072), (4096, 3072, 768), (128, 2048, 5632),
               (4096, 2048, 5632), (8192, 4096, 4096), (8192, 4096, 14336), (16, 4096, 4096)]
CPU_MATMULS = [(256, 256, 256), (128, 1024, 512), (1024, 512, 128), (64, 4096, 1024),
               (2048, 64, 2048), (512, 512, 2048)]


def check_compute(spec, quick: bool, device: str = "cpu") -> list[tuple]:
    """(case, size, flops, bytes, dtype, measured seconds) for matmuls and bandwidth-bound ops."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    width, tag = dtype.itemsize, str(dtype).removeprefix("torch.")
    rows = []
    shapes = GPU_MATMULS if device == "cuda" else CPU_MATMULS
    for m, k, n in shapes[:1] if quick else shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        rows.append((f"matmul {m}x{k} @ {k}x{n}", tag, 2 * m * n * k,
                     width * (m * k + k * n + m * n), tag, _median_s(lambda a=a, b=b: a @ b, 5)))
    sizes = [1 << 20] if quick else [1 << 20, 1 << 22, 1 << 24]
    if device == "cuda" and not quick:
        sizes.append(1 << 27)
    for numel in sizes:
        x = torch.randn(numel, device=device, dtype=dtype)
        y, out = torch.randn_like(x), torch.empty_like(x)
        rows.append((f"add {numel / 2**20:.0f}M elements", tag, numel, 3 * width * numel, tag,
                     _median_s(lambda x=x, y=y, o=out: torch.add(x, y, out=o), 5)))
        rows.append((f"layer_norm {numel // 1024}x1024", tag, 8 * numel, 2 * width * numel, tag,
                     _median_s(lambda x=x: torch.nn.functional.layer_norm(
                         x.view(-1, 1024), (1024,)), 5)))
    return rows


def print_rows(rows: list[tuple], title: str) -> None:
    """rows: (case, size, predicted s, measured s)."""
    ratios = [pred / meas for _, _, pred, meas in rows]
    print(f"{title}\n{'case':<34} {'size':>10} {'predicted':>11} {'measured':>11} {'pred/meas':>9}")
    for (case, size, pred, meas), r in zip(rows, ratios):
        print(f"{case:<34} {size:>10} {pred * 1e3:>9.3f}ms {meas * 1e3:>9.3f}ms {r:>8.2f}x")
    print(f"{len(rows)} cases: predicted/measured from {min(ratios):.2f}x to {max(ratios):.2f}x, "
          f"geometric mean {statistics.geometric_mean(ratios):.2f}x\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    p.add_argument("--cpu", action="store_true",
                   help="check the CPU even on a GPU machine, then whole plans on 4 gloo ranks "
                        "(plan_cost_check.py); the last line is 'spearman R, median abs error E%%'")
    args = p.parse_args(argv)

    import torch
    from meshweave.passes.parallel.cost.calibrate import calibrate
    from meshweave.passes.parallel.cost.hardware import get_spec

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        torch.set_num_threads(1)  # what each gloo rank has here; the spec is per device
    # one GPU: no second rank for a collective, so the link is not measured (NCCL needs 2)
    spec, report = calibrate(None, 4096 if cuda else (512 if args.quick else 1024),
                             comm=not cuda, device="cuda" if cuda else "cpu")
    print(f"calibrated (torch {torch.__version__}{'' if cuda else ', 1 thread per device'}):"
          f"\n{report}\n")
    cases = check_compute(spec, args.quick, "cuda" if cuda else "cpu")
    specs = [("calibrated spec", spec)]
    if cuda:  # the preset the planner uses for this card, unmeasured: the datasheet figures
        preset = "h200" if "h200" in torch.cuda.get_device_name().lower() else "h100"
        specs.append((f"preset '{preset}' (datasheet x efficiency)", get_spec(preset)))
    for title, s in specs:
        rows = [(case, size, s.compute_time(fl, nb, dtype=dt), meas)
                for case, size, fl, nb, dt, meas in cases]
        if title == "calibrated spec" and not cuda:
            rows += check_collectives(spec.intra_node, args.quick)
        print_rows(rows, f"predicted by the {title}:")
    if not cuda and not args.quick:
        print("* more ranks than CPU cores: those times include the ranks competing for cores")
    if args.cpu:  # whole plans, measured against their estimates (last line: the two figures)
        import plan_cost_check

        plan_cost_check.run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
