"""MoE cases of the auto-parallel benchmark: the searched plan against the exhaustive EP grid.

    python benchmarks/autopar_moe.py [--quick] [--case NAME ...]   (autopar_bench.py runs it)

For each case (a zoo MoE model traced with 2 repeated layers on the meta device, its costs
scaled to the real depth, training step) it prints the planner's search time, its estimated
step time and expert-parallel degree, the best entry of the exhaustive EP x TP x PP x DP x
micro-batch grid (passes/parallel/search/moe_grid.py: every factorisation of the devices with
ep dividing E and dp, every micro-batch count, recompute off/on, Megatron layout), evaluated
with the SAME cost model on a PlannerState of its own, and the ratio ours / grid, which must
be <= 1.0. The all-to-all of expert parallelism is priced by cost/moe_cost.py (uniform
routing). The last line is `worst MoE ratio vs exhaustive EP grid: R`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MOE_CASES = [  # name, model, device count, spec, global batch, seq
    ("moe-tiny/8", "moe-tiny", 8, "h100", 32, 64),
    ("mixtral-8x7b/64", "mixtral-8x7b", 64, "h100", 256, 4096),
    ("qwen2-moe-57b/128", "qwen2-moe-57b", 128, "h100", 512, 4096),
]
MOE_QUICK = {"moe-tiny/8", "mixtral-8x7b/64"}


def run_moe_case(model: str, n_devices: int, spec: str, batch: int, seq: int) -> dict:
    from meshweave.cli_parallel import trace_for_planning
    from meshweave.passes.parallel.cost.hardware import get_spec
    from meshweave.passes.parallel.search.candidates import PlannerState
    from meshweave.passes.parallel.search.moe_grid import describe, moe_grid
    from meshweave.passes.parallel.search.search import plan_parallel

    t0 = time.perf_counter()
    graph, repeats, _ = trace_for_planning(model, batch, seq, "float16", 2)
    t_trace = time.perf_counter() - t0
    plan = plan_parallel(graph, n_devices, spec, batch=batch, training=True, repeats=repeats)
    t1 = time.perf_counter()
    state = PlannerState(graph, get_spec(spec), batch=batch, training=True, repeats=repeats)
    grid = moe_grid(state, n_devices)
    t_grid = time.perf_counter() - t1
    ep = plan.search.get("ep") or {}
    size = dict(zip(plan.mesh.names, plan.mesh.shape))
    if plan.uniform:
        layout = f"dp={size.get('dp', 1)} ep={ep.get('degree', 1)} tp={size.get('tp', 1)}"
    else:  # per-stage sub-meshes (dp, tp), run-length coded, and each stage's ep degree
        runs = ",".join(f"{n}*{sh}" if n > 1 else sh for sh, n in plan.stage_mesh_runs())
        layout = f"meshes={runs} ep={_runs(ep.get('stage_degrees', [1]))}"
    return {
        "trace": t_trace,
        "search": plan.search["seconds"],
        "grid_seconds": t_grid,
        "grid_points": len(grid.entries),
        "ours": plan.estimate["total"],
        "grid": grid.best.step_time if grid.best else None,
        "grid_cfg": describe(grid.best) if grid.best else "none fits",
        "plan": f"pp={plan.num_stages} {layout} B={plan.micro_batches}",
        "solver": plan.search["solver"],
    }


def _runs(values: list[int]) -> str:
    """[1, 2, 2, 2] -> "1,3*2"."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return ",".join(f"{n}*{v}" if n > 1 else str(v) for v, n in out)


def print_moe_cases(names: list[str] | None = None, quick: bool = False) -> float:
    """Run and print the MoE cases (all, or `names`, or the quick ones); the worst ratio."""
    cases = [c for c in MOE_CASES
             if (not names or c[0] in names) and (not quick or c[0] in MOE_QUICK)]
    head = (f"{'MoE case':18s} {'spec':5s} {'search s':>8s} {'grid s':>7s} {'points':>6s} "
            f"{'ours s':>9s} {'grid s':>9s} {'ratio':>6s}  {'our plan':34s} best grid")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name, model, n, spec, batch, seq in cases:
        r = run_moe_case(model, n, spec, batch, seq)
        ratio = r["ours"] / r["grid"] if r["grid"] else float("nan")
        worst = max(worst, ratio) if ratio == ratio else worst
        grid = f"{r['grid']:9.4f}" if r["grid"] else f"{'none':>9s}"
        print(f"{name:18s} {spec:5s} {r['search']:8.2f} {r['grid_seconds']:7.2f} "
              f"{r['grid_points']:6d} {r['ours']:9.4f} {grid} {ratio:6.3f}  {r['plan']:34s} "
              f"{r['grid_cfg']}", flush=True)
    if cases:
        print(f"worst MoE ratio vs exhaustive EP grid: {worst:.3f}")
    return worst


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(sorted(MOE_QUICK)))
    ap.add_argument("--case", action="append", default=[], help="run only these cases")
    args = ap.parse_args()
    print_moe_cases(args.case, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
