"""Automatic parallel planner: cost models and solvers (costs in, plan out).

  hardware.py         HardwareSpec presets (h100, h200, a100, ascend910, cpu) and JSON specs
  collectives.py      alpha-beta collective costs, per-axis links, resharding costs
  ilp_problem.py      IntraOpProblem / Strategy / IntraOpSolution / NoFeasiblePlanError
  ilp_reduce.py       exact preprocessing (dominance, folding, low-degree elimination)
  ilp.py              intra-op MILP (scipy HiGHS): solve_intra_op, min_memory
  clustering.py       grouping of repeated layers into one weighted representative
  pipeline_costs.py   stage cost tables, Alpa sub-mesh shapes, device placement
  pipeline_dp.py      the stage-partition dynamic program
  pipeline.py         plan_pipeline (inter-op stages, micro-batches, schedule)
  optimizer_shard.py  training memory accounting (Adam, ZeRO-1, activations, recompute)

The solvers never look at the model graph or the hardware: callers turn both into costs.
"""

# --- planner front end: graph -> Plan -> per-rank programs (the automatic parallel planner) ---
#   sharding_rules.py  per-op, per-mesh-axis sharding strategies (RuleTable "sharding");
#                      sharding_shape_rules.py those of views, data movement and creation
#   strategies.py      whole-mesh node strategies, batch-dim tracking, re-batched shapes
#   layers.py          repeated-layer detection and the representative layer
#   cost_model.py      per-strategy compute/memory and resharding cost matrices
#   problem.py         the reduced graph's IntraOpProblem and segment evaluation
#   staging.py         stage costs, partitions and the step-time estimate
#   candidates.py      the pp x dp x tp x micro-batch configurations, cost caches
#   megatron_grid.py   the Megatron-style baseline grid and megatron_plan()
#   search.py          plan_parallel(): grid, ILP, memory multiplier, pipeline DP
#   submesh_search.py  stages on meshes of their own size and shape (Alpa's sub-meshes)
#   no_fit.py          the "nothing fits" error: the smallest per-device memory any plan needs
#   plan_build.py      Plan construction; reshard.py the collectives between placements
#   lower.py / lower_rank.py / lower_rules.py   lower_for_rank(): per-rank programs
#   cross_mesh.py      the pieces a value moves in between stage meshes of different shapes
#   simulate.py        simulate_plan(): every rank in one process (test oracle)
#   calibrate.py       `meshweave calibrate`: measure the local device into a HardwareSpec
_EXPORTS = {
    "plan_parallel": "search", "PlanningError": "strategies", "megatron_plan": "megatron_grid",
    "megatron_grid": "megatron_grid", "lower_for_rank": "lower", "shard_tensor": "lower",
    "LoweringError": "lower", "simulate_plan": "simulate", "Plan": "plan",
    "NoFeasiblePlanError": "ilp_problem",
}


def __getattr__(name: str):
    """Lazy exports: importing the package does not import the planner (PEP 562)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
