"""How long the rematerialization pass takes on a big joint graph, traced on the meta device.

    python benchmarks/remat_scale.py                 # GPT-3 175B, 96 layers, seq 2048
    python benchmarks/remat_scale.py --layers 4      # quick

The joint forward+backward graph comes from AOTAutograd on meta tensors (no memory needed); the
pass (passes/remat/: build the problem, solve at each budget) is timed alone, apart from the
trace. The issue's bar: at most 10 s for the 96-layer graph. The MILP column is the exact
solver stopped at its time limit, for comparison with the Lagrangian route that big graphs take.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._functorch.aot_autograd import aot_module_simplified

from meshweave.frontend.joint import _FlatOutputs
from meshweave.models.registry import build_model
from meshweave.passes.parallel.cost.hardware import get_spec
from meshweave.passes.remat.problem import build_problem
from meshweave.passes.remat.solve import solve


class _Done(Exception):
    pass


def joint_problem(name: str, layers: int, seq: int, spec):
    model, inputs = build_model(name, device="meta", batch=1, seq=seq, num_layers=layers)
    ep = torch.export.export(model.train(), inputs, strict=False)
    found = {}

    def partition(joint, _inputs, *, num_fwd_outputs, **_kw):
        t0 = time.perf_counter()
        found["problem"] = build_problem(joint, num_fwd_outputs, spec)
        found["build_s"] = time.perf_counter() - t0
        raise _Done

    try:
        aot_module_simplified(_FlatOutputs(ep.module()), list(inputs), fw_compiler=lambda g, e: g,
                              bw_compiler=lambda g, e: g, partition_fn=partition)
    except _Done:
        pass
    return found["problem"], found["build_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--milp", action="store_true", help="also run the MILP (5 s limit)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    problem, build_s = joint_problem(args.model, args.layers, args.seq, get_spec("h100"))
    print(f"{args.model} x{args.layers} seq {args.seq}: joint traced in "
          f"{time.perf_counter() - t0:.1f} s; {len(problem.candidates)} candidates, "
          f"{len(problem.needed)} read by the backward, {problem.full_bytes / 2**30:.2f} GiB "
          f"saved at budget 1.0; problem built in {build_s:.2f} s")
    worst = 0.0
    for b in (0.7, 0.5, 0.3, 0.1):
        sol = solve(problem, b * problem.full_bytes)
        worst = max(worst, build_s + sol.solve_seconds)
        line = (f"budget {b}: saved {sol.saved_bytes / problem.full_bytes:.3f}, recompute "
                f"{sol.recompute_flops / 1e12:.2f} TFLOP ({sol.recompute_seconds * 1e3:.2f} ms "
                f"est.), gap {sol.gap:.2%}, solve {sol.solve_seconds:.2f} s")
        if args.milp:
            m = solve(problem, b * problem.full_bytes, exact=True, time_limit=5.0)
            line += f" | MILP 5 s: {m.recompute_seconds * 1e3:.2f} ms, gap {m.gap:.2%}"
        print(line, flush=True)
    print(f"pass time (build + solve), worst budget: {worst:.2f} s")


if __name__ == "__main__":
    main()
