"""Rematerialization: choose which forward values the backward recomputes, under a memory budget.

Runs as AOTAutograd's partition function on the training step's joint graph
(frontend/joint.py), so the forward/backward IR pair it produces has the chosen saved set.
May import ir/ and passes/parallel/cost (the hardware roofline); nothing from runtime/ or
meshweave/.

  budget.py      MemoryBudget: a fraction in (0, 1] or a size ("2GiB"); RematError
  problem.py     the problem read off the joint graph: candidates, bytes, recompute cost
  solve.py       the ILP (HiGHS) for graphs up to EXACT_LIMIT candidates; the budget's floor
  lagrangian.py  bigger graphs: byte-price bisection over integral LPs, mixing per layer
  partition.py   the partition function: solve, then torch's extraction of the two graphs
"""
