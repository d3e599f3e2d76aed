"""Hybrid CPU-GPU generation under memory pressure (APEX): the placement and its cost model.

When a batch's KV caches do not fit the device's memory (the hardware spec's, or a cap from
CompileOptions(memory_limit=...) / `--memory-gib`), some sequences keep their cache, and the
decode attention over it, in host memory; the weights stay on the device. May import torch
and passes/parallel/cost (the hardware specs) only: the decoder pieces, the overlap
scheduler and the generation loop that run a plan are runtime/offload/'s.

  costs.py      DecoderShape (sizes read off a model) and StepCosts: per-layer piece times on
                each side, composed per dispatch mode (gpu, merged, pipelined)
  placement.py  plan_offload -> OffloadPlan (gpu-only, hybrid or gpu-rounds; which sequences
                go to the host), the memory model, OffloadError, memory_limit_bytes (CompileOptions.memory_limit)
"""

from __future__ import annotations

from .costs import COMPONENTS, MODES as DISPATCH_MODES, DecoderShape, StepCosts
from .placement import (MODES, OffloadError, OffloadPlan, memory_limit_bytes, plan_offload,
                        workspace_bytes)

__all__ = ["COMPONENTS", "DISPATCH_MODES", "DecoderShape", "MODES", "OffloadError",
           "OffloadPlan", "StepCosts", "memory_limit_bytes", "plan_offload",
           "workspace_bytes"]
