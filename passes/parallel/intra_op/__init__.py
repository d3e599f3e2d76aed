"""Intra-op: the sharding choice per node as a mixed-integer program (costs in, choice out).

  problem.py     IntraOpProblem / Strategy / IntraOpSolution / NoFeasiblePlanError
  reduce.py      exact preprocessing (dominance, folding, low-degree elimination)
  heuristic.py   primal heuristic: LP rounding, memory repair, local search
  ilp.py         the MILP (scipy HiGHS): solve_intra_op, min_memory
  clustering.py  grouping of repeated layers into one weighted representative

The solvers never look at the model graph or the hardware: search/ turns both into costs.
May import: nothing of meshweave but meshweave.ir.errors.
"""
