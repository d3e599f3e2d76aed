"""Cost: what a plan costs in time and memory on given hardware.

  hardware.py        HardwareSpec presets (h100, h200, a100, t4, ascend910, cpu), host sides, JSON
  calibrate.py       `meshweave calibrate`: measure the local device into a HardwareSpec
  collectives.py     alpha-beta collective costs, per-axis links, resharding costs
  cost_model.py      per-strategy compute/memory and resharding cost matrices of one mesh
  optimizer_shard.py training memory: parameters, gradients, Adam states (ZeRO-1), activations
  pipeline_costs.py  stage cost tables, Alpa sub-mesh shapes and device placement
  moe_cost.py        expert parallelism's dispatch and combine all-to-all
  saved_rules.py     what autograd saves per op (rule table), a graph's saved activations;
                     checked by benchmarks/activation_check.py, not yet used by cost_model

May import: meshweave.ir and ../strategies/. The search builds on this folder, never the reverse.
"""
