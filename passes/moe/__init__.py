"""Mixture-of-experts recognition: MoE blocks in the IR -> `moe.experts` nodes (issue 16).

Whatever the module code looks like (dense dispatch over stacked weights as in moe-tiny, HF's
per-(token, expert) weight gathers with bmm, ...), a block is found by structure and accepted
by execution: the router (linear -> softmax -> top-k -> renormalise) stays as ordinary dense
ops; the dispatch + experts + combine subgraph that its top-k scores and ids feed is replaced
by one `moe.experts(x, weights, ids, w_in, w_gate, w_out, act=, layout=, fused_gate_up=)`
(ir/ops/moe.py holds the op's eager, shape and cost rules) only where running both on random
data agrees. Shared experts stay dense and are reported. A block that does not match stays
dense, with the reason in graph.meta["moe"], which cm.explain() prints.

  graph_walk.py  ancestry, dependency flags, view chains: the queries the matchers share
  router.py      top-k over the softmax/sigmoid of a linear: the candidate routers
  region.py      the combine output, the routing values, x and the closed region between them
  patterns.py    which moe.experts calls the expert weights' shapes allow (roles, layout, act)
  validate.py    run the region and each candidate call on random data; keep the first match
  shrink.py      the same program at a smaller width, for blocks too large to run
  shared.py      the dense shared expert summed with the routed output, named for the report
  report.py      MoEBlockReport / MoESummary: graph.meta["moe"]
  recognize.py   the pass: recognize_moe(graph) -> graph
"""

from __future__ import annotations

from .recognize import recognize_moe
from .report import MoEBlockReport, MoESummary

__all__ = ["MoEBlockReport", "MoESummary", "recognize_moe"]
