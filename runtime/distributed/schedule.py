"""Pipeline schedules: the order in which one stage runs forwards (F) and backwards (B).

    gpipe   all forwards, then all backwards (peak: every micro-batch's activations held)
    1f1b    warm-up forwards (num_stages - stage - 1), then alternate one forward and one
            backward, then cool-down backwards (peak: num_stages - stage micro-batches held)

Inference runs forwards only. Every stage runs the backwards of micro-batches in the same
order as the forwards, so stage s's B(i) always finds stage s+1's B(i) ahead of it.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")


def stage_schedule(
    kind: str, num_stages: int, stage: int, micro_batches: int, training: bool
) -> list[tuple[str, int]]:
    """[("F", i) | ("B", i), ...] for one stage."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}; known: {SCHEDULES}")
    if not 0 <= stage < num_stages or micro_batches < 1:
        raise ValueError(
            f"bad schedule request: stage {stage} of {num_stages}, {micro_batches} micro-batches"
        )
    forwards = [("F", i) for i in range(micro_batches)]
    if not training:
        return forwards
    if kind == "gpipe":
        return forwards + [("B", i) for i in range(micro_batches)]
    warmup = min(num_stages - stage - 1, micro_batches)
    order = [("F", i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(micro_batches - warmup, micro_batches)]
    return order


def peak_in_flight(order: list[tuple[str, int]]) -> int:
    """Most micro-batches whose forward ran and backward has not (activations held)."""
    live = peak = 0
    for kind, _ in order:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
