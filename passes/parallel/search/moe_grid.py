"""The exhaustive EP x TP x PP x DP x micro-batch grid of an MoE graph: the search's yardstick.

`moe_grid(state, n_devices)` enumerates, independently of candidates.stage_meshes, every
layout Megatron-LM / DeepSpeed-MoE users would try by hand on `n_devices`:

  pp   every divisor of the device count up to the number of layers (uniform layer split);
  tp   every divisor of the rest that divides the devices of a node (TP stays in a node);
  ep   every divisor of the data-parallel degree dp that divides the expert count E: the
       stage mesh is (dp / ep, ep, tp) named ("dp", "ep", "tp"), ep = 1 being (dp, tp) with
       the experts replicated (strategies/moe_rules.py pins moe.experts to the ep strategy
       on the "ep" axis and every other op to data parallelism on it);
  B    every micro-batch count dividing batch / dp (at least pp in a pipeline), not only the
       few that candidates.microbatch_options keeps;
  recomputation off and on.

Each point is costed with the Megatron layout (megatron_grid.evaluate_megatron: column/row TP,
expert slicing on tp) under the planner's own cost model (the same PlannerState caches,
context.assignment_segments, staging.evaluate_partition), so a searched plan's estimate and a
grid entry's are directly comparable: benchmarks/autopar_moe.py prints their ratio.
"""

from __future__ import annotations

import time

from meshweave.ir.mesh import DeviceMesh
from .candidates import Config, PlannerState
from .megatron_grid import GridEntry, GridResult, evaluate_grid
from ..strategies.moe_rules import EP_AXIS
from ..strategies.node_strategies import PlanningError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid_meshes(
    n_devices: int, experts: int, devices_per_node: int
) -> list[tuple[int, DeviceMesh]]:
    """(pp, stage mesh) of every pp x dp x ep x tp factorisation of `n_devices` (module doc);
    pp is not capped here (moe_grid caps it by the layers)."""
    out = []
    for pp in _divisors(n_devices):
        rest = n_devices // pp
        for tp in _divisors(rest):
            if devices_per_node % tp:
                continue
            dp = rest // tp
            for ep in _divisors(dp):
                if experts % ep:
                    continue
                if ep == 1:
                    out.append((pp, DeviceMesh((dp, tp), ("dp", "tp"))))
                else:
                    out.append((pp, DeviceMesh((dp // ep, ep, tp), ("dp", EP_AXIS, "tp"))))
    return out


def all_microbatches(batch: int, pp: int, dp: int, training: bool) -> list[int]:
    """Every micro-batch count B with batch / B samples splitting over dp (B >= pp when
    pipelining; inference without a pipeline runs the batch whole)."""
    if batch % dp:
        return []
    per = batch // dp
    opts = [b for b in _divisors(per) if b >= min(pp, per)]
    if not training and pp == 1:
        return opts[:1]
    return opts


def moe_grid(state: PlannerState, n_devices: int, max_stages: int | None = None) -> GridResult:
    """Every point of the module doc's grid with its step estimate; `best` is the fastest that
    fits in memory (None when none does). Raises PlanningError for a dense graph."""
    if not state.experts:
        raise PlanningError("moe_grid: the graph has no moe.experts node (a dense model has no "
                            "expert-parallel degree to grid over; use megatron_grid)")
    t0 = time.perf_counter()
    cap = min(state.n_units, max_stages or state.n_units)
    configs = []
    for pp, mesh in grid_meshes(n_devices, state.experts, state.spec.devices_per_node):
        if pp > cap:
            continue
        dp = mesh.shape[0] * (mesh.shape[1] if mesh.ndim == 3 else 1)
        configs += [Config(pp, mesh, b)
                    for b in all_microbatches(state.batch, pp, dp, state.training)]
    return evaluate_grid(state, configs, t0)


def describe(entry: GridEntry) -> str:
    """"pp=2 dp=4 ep=8 tp=1 B=8" (+ " recompute")."""
    m = entry.config.mesh
    size = dict(zip(m.names, m.shape))
    text = (f"pp={entry.config.pp} dp={size.get('dp', 1)} ep={size.get(EP_AXIS, 1)} "
            f"tp={size.get('tp', 1)} B={entry.config.micro_batches}")
    return text + (" recompute" if entry.recompute else "")


__all__ = ["all_microbatches", "describe", "grid_meshes", "moe_grid"]
