"""Cost: what a plan costs in time and memory on given hardware.

  hardware.py        HardwareSpec presets (h100, h200, a100, ascend910, cpu) and JSON specs
  calibrate.py       `meshweave calibrate`: measure the local device into a HardwareSpec
  collectives.py     alpha-beta collective costs, per-axis links, resharding costs
  cost_model.py      per-strategy compute/memory and resharding cost matrices of one mesh
  optimizer_shard.py training memory: parameters, gradients, Adam states (ZeRO-1), activations
  pipeline_costs.py  stage cost tables, Alpa sub-mesh shapes and device placement

May import: meshweave.ir and ../strategies/. The search builds on this folder, never the reverse.
"""
