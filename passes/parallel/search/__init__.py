"""Search: plan_parallel(), the automatic parallel planner, and the baseline it is compared with.

  search.py          plan_parallel(): configuration grid, ILP, memory multiplier, pipeline DP
  context.py         the reduced graph (pre + one representative layer + post) as a problem
  layers.py          repeated-layer detection and the representative layer
  candidates.py      the pp x dp x tp x micro-batch configurations, cost caches, pins
  staging.py         stage costs, partitions and the step-time estimate
  pipeline.py        plan_pipeline(): inter-op stages, micro-batches, schedule
  pipeline_dp.py     the stage-partition dynamic program
  submesh_search.py  stages on meshes of their own size and shape (Alpa's sub-meshes)
  megatron_grid.py   the Megatron-style baseline grid and megatron_plan()
  no_fit.py          the "nothing fits" error: the smallest per-device memory any plan needs
  plan_build.py      building the Plan from a configuration and a strategy choice

May import: meshweave.ir, ../strategies/, ../cost/, ../intra_op/ and ../plan.py.
"""
