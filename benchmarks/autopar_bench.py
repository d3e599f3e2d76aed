"""Automatic parallel planner benchmark: search time and plan quality against the Megatron grid.

    python benchmarks/autopar_bench.py [--quick] [--case NAME ...]

For each case (a zoo model traced with 2 repeated layers on the meta device, its costs scaled
to the real depth, training step), prints the planner's search time (tracing excluded, shown
apart), its estimated step time, the best configuration of the exhaustive Megatron-style grid
(dp x tp x pp x micro-batches, uniform layers, recompute off/on, same cost model) and the
ratio ours / grid (lower is better; <= 1 always holds by construction, < 1 means the search
found a better plan). When per-stage sub-meshes (Alpa-style) beat the best uniform plan, the
plan column lists the stage meshes and a second line gives the uniform best. Then the MoE
cases (benchmarks/autopar_moe.py: mixtral-8x7b on 64 devices and smaller ones) against the
exhaustive EP x TP x PP x DP x micro-batch grid, ending `worst MoE ratio vs exhaustive EP grid:
R`; --no-moe skips them. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [  # name, model, mesh, spec, global batch, seq
    ("llama-8b/8", "llama-8b", "8", "h100", 64, 2048),
    ("llama-8b/64", "llama-8b", "64", "h100", 256, 2048),
    ("llama-70b/8x8", "llama-70b", "8x8", "h100", 512, 2048),
    ("llama-70b/512", "llama-70b", "512", "h100", 1024, 2048),
    ("gpt3-175b/1024", "gpt3-175b", "1024", "a100", 1536, 2048),
    ("pangu-2.6b/64", "pangu-alpha-2.6b", "64", "ascend910", 512, 1024),
    ("pangu-13b/256", "pangu-alpha-13b", "256", "ascend910", 1024, 1024),
    ("pangu-200b/2048", "pangu-alpha-200b", "2048", "ascend910", 1536, 1024),
]
QUICK = {"llama-8b/8", "llama-70b/8x8", "pangu-200b/2048"}


def run_case(model: str, mesh_text: str, spec: str, batch: int, seq: int) -> dict:
    from meshweave.passes.parallel.search.search import plan_parallel

    from meshweave.cli_parallel import _parse_mesh, trace_for_planning

    t0 = time.perf_counter()
    graph, repeats, _ = trace_for_planning(model, batch, seq, "float16", 2)
    t_trace = time.perf_counter() - t0
    plan = plan_parallel(
        graph, _parse_mesh(mesh_text), spec, batch=batch, training=True, repeats=repeats
    )
    s = plan.search
    return {
        "trace": t_trace,
        "search": s["seconds"],
        "ours": plan.estimate["total"],
        "grid": s["grid_best"],
        "grid_cfg": s["grid_best_config"],
        "solver": s["solver"],
        "plan": f"pp={plan.num_stages} {_meshes(plan)} B={plan.micro_batches}",
        "uniform_best": s.get("uniform_best"),
    }


def _meshes(plan) -> str:
    """"mesh=4x2", or per-stage sub-meshes run-length coded: "meshes=16x4,7*16x8,16x4"."""
    if plan.uniform:
        return f"mesh={'x'.join(map(str, plan.mesh.shape))}"
    return "meshes=" + ",".join(f"{n}*{sh}" if n > 1 else sh for sh, n in plan.stage_mesh_runs())


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(sorted(QUICK)))
    ap.add_argument("--case", action="append", default=[], help="run only these cases")
    ap.add_argument("--no-moe", action="store_true", help="skip the MoE cases (autopar_moe)")
    args = ap.parse_args()
    cases = [
        c
        for c in CASES
        if (not args.case or c[0] in args.case) and (not args.quick or c[0] in QUICK)
    ]
    head = (
        f"{'case':18s} {'spec':9s} {'search s':>8s} {'trace s':>7s} {'ours s':>9s} "
        f"{'grid s':>9s} {'ratio':>6s}  {'our plan':26s} {'winner':22s} best grid"
    )
    print(head)
    print("-" * len(head))
    for name, model, mesh, spec, batch, seq in cases:
        r = run_case(model, mesh, spec, batch, seq)
        ratio = r["ours"] / r["grid"] if r["grid"] else float("nan")
        grid = f"{r['grid']:9.3f}" if r["grid"] else f"{'none':>9s}"
        print(
            f"{name:18s} {spec:9s} {r['search']:8.2f} {r['trace']:7.2f} {r['ours']:9.3f} "
            f"{grid} {ratio:6.3f}  {r['plan']:26s} {r['solver']:22s} {r['grid_cfg']}",
            flush=True,
        )
        if r["uniform_best"] is not None:  # stage sub-meshes won; the uniform plan it beat
            print(f"{'':18s} {'':9s} uniform best {r['uniform_best']:.3f} s", flush=True)
    if not args.no_moe:
        from autopar_moe import MOE_CASES, print_moe_cases

        names = [c for c in args.case if c in {m[0] for m in MOE_CASES}]
        if names or not args.case:
            print()
            print_moe_cases(names, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
