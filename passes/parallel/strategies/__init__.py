"""Strategies: how each op can run over a device mesh, and how a value moves between layouts.

  axis.py            the vocabulary (AxisStrategy, OpView) and the SHARDING_RULES tables
  compute_rules.py   rules of pointwise ops, matmuls, attention, embedding, reductions, norms
  shape_rules.py     rules of views, data movement and tensor creation
  quant_rules.py     rules of quant.linear (packed weights: N freely, K at group boundaries)
  moe_rules.py       rules of moe.experts (batch, expert parallel, expert slicing), the ep axis
  node_strategies.py whole-mesh strategies (products of per-axis ones), batch-dim tracking
  reshard.py         the collectives that turn one placement of a value into another

May import: meshweave.ir only. Everything else in the planner builds on this folder.
"""

# The rule modules register into axis.py's tables when the package loads.
from . import compute_rules, moe_rules, quant_rules, shape_rules  # noqa: F401
