"""Runtimes: the reference executor (the oracle) and, in runtime/distributed, the multi-rank one."""

from .reference import ExecutionError, run_graph, run_node

__all__ = ["ExecutionError", "run_graph", "run_node"]
