"""Per-device training memory: parameters, gradients, Adam states (ZeRO-1), activations.

Pure accounting functions used to fill the memory column of the planners' cost tables.

Parameters: a tensor of `numel` elements under `placements` keeps ceil(numel / f) elements per
device, f the product of the mesh axes it is sharded over (Replicate keeps it whole; a
parameter is never Partial). Mixed-precision Adam keeps, per local element: the low-precision
weight and gradient (`param_bytes`, `grad_bytes`), an fp32 master copy (when the weights are
not already fp32) and two fp32 moments. ZeRO-1 additionally shards those optimizer states
over the data-parallel axis when the parameter is replicated there.

Activations: without recomputation a stage keeps every layer's saved activations for each
in-flight micro-batch; with recomputation it keeps only the stage input per in-flight
micro-batch, plus one layer's activations while that layer's backward is recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from meshweave.ir.mesh import AxisRef, DeviceMesh
from meshweave.ir.sharding import Partial, Placement, Shard

SCHEDULES = ("1f1b", "gpipe")
FP32_BYTES = 4


def inflight_microbatches(
    schedule: str, num_microbatches: int, num_stages: int, stage_index: int
) -> int:
    """Micro-batches whose activations stage `stage_index` holds at its peak.

    GPipe runs all forwards before any backward: B. 1F1B starts backwards as soon as the
    last stage can: min(B, num_stages - stage_index).
    """
    if schedule == "gpipe":
        return num_microbatches
    if schedule == "1f1b":
        return min(num_microbatches, num_stages - stage_index)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; known: {SCHEDULES}")


def shard_factor(placements: Sequence[Placement], mesh: DeviceMesh) -> int:
    """How many pieces a tensor is cut into: product of the sizes of its Shard axes."""
    if len(placements) != mesh.ndim:
        raise ValueError(f"{len(placements)} placements for a {mesh.ndim}-d mesh {mesh}")
    return math.prod(s for p, s in zip(placements, mesh.shape) if isinstance(p, Shard))


@dataclasses.dataclass(frozen=True)
class ParamMemory:
    """Bytes per device, by kind."""

    weights: float = 0.0
    grads: float = 0.0
    master_weights: float = 0.0
    optimizer_moments: float = 0.0

    @property
    def optimizer_states(self) -> float:
        return self.master_weights + self.optimizer_moments

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer_states

    def __add__(self, other: ParamMemory) -> ParamMemory:
        return ParamMemory(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                     dataclasses.astuple(other))))


def param_training_memory(
    numel: int,
    placements: Sequence[Placement],
    mesh: DeviceMesh,
    *,
    param_bytes: int = 2,
    grad_bytes: int | None = None,
    master_weights: bool | None = None,
    num_moments: int = 2,
    zero1: bool = False,
    dp_axis: AxisRef | None = None,
) -> ParamMemory:
    """Per-device memory of one trainable parameter under `placements` (Adam by default).

    `master_weights` defaults to "param_bytes < 4" (fp32 master copy for fp16/bf16 weights);
    `num_moments` is 2 for Adam/AdamW, 1 for momentum SGD, 0 for plain SGD.
    """
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"a parameter cannot be Partial: {tuple(placements)}")
    local = math.ceil(numel / shard_factor(placements, mesh))
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    master = param_bytes < FP32_BYTES if master_weights is None else master_weights
    state_numel = local
    if zero1:
        if dp_axis is None:
            raise ValueError("zero1=True needs the data-parallel mesh axis (dp_axis)")
        a = mesh.axis_index(dp_axis)
        if not isinstance(placements[a], Shard):  # already sharded over dp: nothing to add
            state_numel = math.ceil(local / mesh.shape[a])
    return ParamMemory(
        weights=float(local * param_bytes),
        grads=float(local * grad_bytes),
        master_weights=float(state_numel * FP32_BYTES if master else 0),
        optimizer_moments=float(state_numel * FP32_BYTES * num_moments),
    )


def params_training_memory(
    params: Iterable[tuple[int, Sequence[Placement]]], mesh: DeviceMesh, **kwargs: object
) -> ParamMemory:
    """Sum of `param_training_memory` over (numel, placements) pairs; same keywords."""
    total = ParamMemory()
    for numel, placements in params:
        total = total + param_training_memory(numel, placements, mesh, **kwargs)  # type: ignore[arg-type]
    return total


def activation_memory(
    layer_activation_bytes: Sequence[float],
    inflight: int = 1,
    recompute: bool = False,
    stage_input_bytes: float = 0.0,
) -> float:
    """Peak per-device activation bytes of a stage holding `inflight` micro-batches.

    `layer_activation_bytes[i]` is what layer i saves for backward for one micro-batch on this
    device. With `recompute`, each micro-batch keeps only `stage_input_bytes` and one layer's
    activations are live at a time during the recomputed backward.
    """
    if inflight < 0:
        raise ValueError(f"inflight must be >= 0, got {inflight}")
    if not recompute:
        return float(inflight * sum(layer_activation_bytes))
    if inflight == 0:
        return 0.0
    return float(inflight * stage_input_bytes + max(layer_activation_bytes, default=0.0))
