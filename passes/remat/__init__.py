"""Rematerialization: choose which forward values the backward recomputes, under a memory budget.

Works on the training step's forward/backward IR pair (frontend/joint.py). May import ir/,
passes/ and passes/parallel/cost (for op costs); nothing from runtime/ or meshweave/.
"""
