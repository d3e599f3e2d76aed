"""Automatic parallel planner: a graph and a device mesh in, a Plan and per-rank programs out.

The folders follow how a plan is made, each building only on the ones above it:

  strategies/  how each op can run over a mesh axis (SHARDING_RULES), whole-mesh strategies,
               batch-dim tracking, and the collectives between two placements (reshard.py)
  cost/        hardware specs and calibration, alpha-beta collectives, the per-mesh cost
               model, training memory (Adam, ZeRO-1, recompute), pipeline stage cost tables
  intra_op/    the intra-op sharding problem as a MILP (HiGHS), its exact reductions, primal
               heuristic and layer clustering: costs in, a choice per node out (no graph)
  plan.py      the Plan: what the planner decides, versioned and JSON-serializable
  search/      plan_parallel(): the graph's reduced problem, the configuration grid, the
               Megatron baseline, the pipeline DP, Alpa sub-meshes, building the Plan
  lower/       lower_for_rank(): per-rank programs with dist.* collectives, cross-mesh
               transfers, and simulate_plan() (every rank in one process: the test oracle)

A new pass family does not edit these files: its ops' sharding rules register in
strategies/axis.py's SHARDING_RULES from the family's own folder, as ir/ops register with the
op registry.
"""

_EXPORTS = {
    "plan_parallel": "search.search",
    "PlanningError": "strategies.node_strategies",
    "megatron_plan": "search.megatron_grid",
    "megatron_grid": "search.megatron_grid",
    "lower_for_rank": "lower.rank",
    "shard_tensor": "lower.setup",
    "LoweringError": "lower.setup",
    "simulate_plan": "lower.simulate",
    "Plan": "plan",
    "NoFeasiblePlanError": "intra_op.problem",
}


def __getattr__(name: str):
    """Lazy exports: importing the package does not import the planner (PEP 562)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
