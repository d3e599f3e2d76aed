"""Hybrid CPU-GPU generation: the runtime of an OffloadPlan (passes/offload/).

  pieces.py     the decoder step cut at attention, as compiled programs (weights as inputs, so
                one program per shape serves every layer); DeviceTimer
  host.py       HostCaches: the host-resident KV caches and the threads that attend over them
  scheduler.py  OverlapScheduler: each step's dispatch from profiled, predicted piece times
  hybrid.py     HybridGenerator: plan a batch, run it (device-only rounds or hybrid);
                hybrid_generator_for(cm): a CompiledModel's, under its memory_limit
"""

from __future__ import annotations

from .hybrid import METHODS, HybridGenerator, hybrid_generator_for
from .scheduler import OverlapScheduler

__all__ = ["METHODS", "HybridGenerator", "OverlapScheduler", "hybrid_generator_for"]
