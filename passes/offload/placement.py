"""The hybrid placement: which sequences keep their KV cache (and decode attention) on the host.

`plan_offload` takes the batch's prompt lengths, the new tokens asked for, the static cache
capacity per sequence, a HardwareSpec and a device memory cap, and returns an OffloadPlan:

  gpu-only    everything fits the device: no host side at all
  hybrid      the device holds the weights, the step's workspace and as many sequences'
              caches as fit; the rest (the shortest prompts: host attention reads live tokens,
              so short contexts cost it least) keep theirs in host memory, where the host's
              cores attend over them each step
  gpu-rounds  the batch runs as consecutive device-only sub-batches of the largest size that
              fits: chosen when the cost model predicts it faster than hybrid, or when the host
              cannot hold the offloaded caches

The weights always stay on the device. The decision compares predicted tokens/s
(passes/offload/costs.py). Bad input is an OffloadError before anything runs: a cap below
the weights names the smallest workable cap, a host that cannot hold the offloaded caches
names what they need.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from meshweave.passes.parallel.cost.hardware import format_bytes

from .costs import DecoderShape, StepCosts

GiB = 2**30
MODES = ("gpu-only", "hybrid", "gpu-rounds")


class OffloadError(ValueError):
    """A placement that cannot run: says what, and the smallest cap or size that would."""


@dataclass(frozen=True)
class OffloadPlan:
    """Where each sequence's KV cache lives. gpu_rows / cpu_rows: indices into the batch;
    round_size: sequences per device-only round (gpu-rounds; the batch for the others)."""

    mode: str
    batch: int
    capacity: int
    gpu_rows: tuple[int, ...]
    cpu_rows: tuple[int, ...]
    round_size: int
    memory: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu_rows"], d["cpu_rows"] = list(self.gpu_rows), list(self.cpu_rows)
        return d

    def to_json(self) -> str:
        return json.dumps({"offload": self.to_dict()}, indent=2)

    def placement_line(self) -> str:
        m = self.memory
        head = (f"placement: {self.mode}, {len(self.cpu_rows)} of {self.batch} sequences keep "
                f"their KV cache on the CPU")
        if self.mode == "gpu-rounds":
            head += f" (rounds of {self.round_size} on the device)"
        return (f"{head}; device {format_bytes(m['device_used'])} of {format_bytes(m['limit'])} (weights "
                f"{format_bytes(m['weights'])}, {format_bytes(m['kv_per_sequence'])} of cache per "
                f"sequence), host {format_bytes(m['host_used'])}; {self.reason}")


def workspace_bytes(shape: DecoderShape, device_rows: int, rows: int, width: int,
                    capacity: int, full_logits: bool = False) -> int:
    """Transient device memory of one step: activations of `rows` x `width` tokens (hidden
    states, q/k/v, the MLP), the logits (of each row's last token, as the hybrid runtime
    computes them; of every token with `full_logits`, as the whole-step program does), and
    the new copy of one layer's cache that the functional update writes for the device rows."""
    # live at once: x, the normed x, q, k, v, y, the residual, the MLP's gate/up/product
    act = rows * width * (7 * shape.hidden + 3 * shape.ffn) * shape.elem_bytes
    logits = rows * (width if full_logits else 1) * shape.vocab * shape.elem_bytes
    layer_cache = shape.kv_bytes_per_token // shape.num_layers * capacity
    return act + logits + device_rows * layer_cache


def _device_bytes(shape, n_dev, rows, width, capacity, full_logits=False) -> int:
    kv = shape.kv_bytes_per_token * capacity
    return shape.weight_bytes + n_dev * kv + workspace_bytes(shape, n_dev, rows, width,
                                                             capacity, full_logits)


def _largest_fit(shape, limit, rows_of, batch, width, capacity, full_logits=False) -> int:
    """The most device-resident sequences (0..batch) whose bytes stay within `limit`;
    rows_of(n): the rows a step runs with n of them on the device."""
    best = -1
    for n in range(batch + 1):
        if _device_bytes(shape, n, rows_of(n), width, capacity, full_logits) <= limit:
            best = n
    return best


def memory_limit_bytes(value: Any) -> float:
    """CompileOptions.memory_limit in bytes: a positive number of bytes or a size string
    such as '6GiB' (units as the remat budget's: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OffloadError(f"memory_limit={value!r}: expected bytes (a positive number) or a "
                           f"size string such as '6GiB'")
    if isinstance(value, str):
        from meshweave.passes.remat.budget import MemoryBudget, RematError

        try:
            return float(MemoryBudget.parse(value).nbytes)
        except RematError as e:
            raise OffloadError(str(e).replace("memory_budget", "memory_limit")) from None
    if not value > 0 or value != value:
        raise OffloadError(f"memory_limit={value!r}: expected a positive number of bytes")
    return float(value)


def _rounds_only(shape, batch, capacity, width, n_alone, limit, kv, smallest, spec):
    dev = _device_bytes(shape, n_alone, n_alone, width, capacity, True)
    host = spec.host.memory_bytes if spec.host is not None else 0.0
    memory = dict(limit=limit, weights=float(shape.weight_bytes), kv_per_sequence=float(kv),
                  smallest_cap=float(smallest), host_limit=float(host),
                  device_used=float(dev), host_used=0.0)
    return OffloadPlan("gpu-rounds", batch, capacity, tuple(range(batch)), (), n_alone, memory,
                       {}, f"the whole batch's step workspace does not fit {format_bytes(limit)}")


def plan_offload(shape: DecoderShape, prompt_lengths: Sequence[int], max_new_tokens: int,
                 capacity: int, spec, memory_limit: float | None = None, *,
                 prefill_len: int | None = None, cpu_sequences: int | None = None,
                 same_memory: bool = False, measured: dict[str, float] | None = None
                 ) -> OffloadPlan:
    """The placement of one batch (module docstring). `memory_limit`: device bytes the plan
    may use (default the spec's device memory); `cpu_sequences` forces that many sequences
    onto the host (a fixed-rule split, for comparison); `same_memory`: the "device" is the
    host (CPU-only runs), so nothing crosses a link; `measured`: measured / predicted step
    seconds of earlier runs, per mode ("hybrid", "gpu-rounds"), that scale the predictions
    (the runtime's profile: runtime/offload/hybrid.py); a mode not measured yet is scaled as
    the measured one, so one mode's profile alone does not flip the decision."""
    batch = len(prompt_lengths)
    if batch == 0:
        raise OffloadError("offload: an empty batch has nothing to place")
    width = max(prefill_len or max(prompt_lengths), 1)  # the prefill's width dominates
    limit = float(memory_limit if memory_limit is not None else spec.memory_bytes)
    if not limit > 0:
        raise OffloadError(f"offload: memory cap {memory_limit!r}: expected a positive size")
    kv = shape.kv_bytes_per_token * capacity
    floor_hybrid = _device_bytes(shape, 0, batch, width, capacity)
    floor_rounds = _device_bytes(shape, 1, 1, width, capacity, True)
    smallest = min(floor_hybrid, floor_rounds)
    if limit < smallest:
        raise OffloadError(
            f"offload: a device memory cap of {format_bytes(limit)} is below what the weights "
            f"({format_bytes(shape.weight_bytes)}) and one step's workspace need: the smallest "
            f"workable cap is {format_bytes(smallest)} (--memory-gib {smallest / GiB:.6f}: "
            f"{'every cache on the CPU' if floor_hybrid <= floor_rounds else 'one sequence at a time'})")
    n_hybrid = _largest_fit(shape, limit, lambda n: batch, batch, width, capacity)
    n_alone = max(0, _largest_fit(shape, limit, lambda n: max(n, 1), batch, width, capacity,
                                  True))
    if cpu_sequences is not None:
        if not 0 <= cpu_sequences <= batch:
            raise OffloadError(f"offload: cpu_sequences={cpu_sequences}: expected 0..{batch}")
        if batch - cpu_sequences > max(n_hybrid, 0):
            raise OffloadError(
                f"offload: {batch - cpu_sequences} device-resident sequences do not fit "
                f"{format_bytes(limit)} (at most {max(n_hybrid, 0)} do)")
        n_hybrid = batch - cpu_sequences
    fits = _device_bytes(shape, batch, batch, width, capacity, True) <= limit
    if cpu_sequences == 0 and not fits:
        raise OffloadError(f"offload: cpu_sequences=0 runs the whole-step programs, which do "
                           f"not fit {format_bytes(limit)} at batch {batch}")
    if cpu_sequences is None and not fits:
        n_hybrid = min(n_hybrid, batch - 1)  # the whole-step program does not fit: offload
    n_cpu = batch - max(n_hybrid, 0)
    if n_hybrid < 0:  # not even every cache on the host leaves room for the step: rounds
        return _rounds_only(shape, batch, capacity, width, n_alone, limit, kv, smallest, spec)
    host = spec.host
    costs = StepCosts(shape, spec, same_memory=same_memory) if host is not None else None
    mean_live = sum(prompt_lengths) / batch + max_new_tokens / 2
    predicted: dict[str, Any] = {}
    order = sorted(range(batch), key=lambda b: (prompt_lengths[b], b))
    cpu_rows = tuple(sorted(order[:n_cpu]))
    gpu_rows = tuple(b for b in range(batch) if b not in cpu_rows)
    memory = dict(limit=limit, weights=float(shape.weight_bytes), kv_per_sequence=float(kv),
                  smallest_cap=float(smallest),
                  host_limit=float(host.memory_bytes) if host is not None else 0.0)

    def made(mode, gpu, cpu, size, reason):
        rounds = mode != "hybrid"  # the whole-step program, full logits
        dev = _device_bytes(shape, size if rounds else len(gpu), size if rounds else batch,
                            width, capacity, rounds)
        return OffloadPlan(mode, batch, capacity, tuple(gpu), tuple(cpu), size,
                           memory | dict(device_used=float(dev), host_used=float(len(cpu) * kv)),
                           predicted, reason)

    if n_cpu == 0:
        return made("gpu-only", range(batch), (), batch, "every cache fits the device")
    factor = dict(measured or {})
    if factor:
        predicted["measured_scale"] = dict(factor)
        for mode in ("hybrid", "gpu-rounds"):  # a mode not run yet: the same gap as the other
            factor.setdefault(mode, next(iter(factor.values())))
    if costs is not None and n_alone >= 1:
        t = costs.step_time("gpu", n_alone, 0, capacity, 0)[0] * factor.get("gpu-rounds", 1.0)
        predicted.update(gpu_rounds_tokens_per_s=n_alone / t, gpu_round_size=n_alone)
    if costs is not None:
        mode, t = costs.best_mode(len(gpu_rows), n_cpu, capacity, int(n_cpu * mean_live))
        t *= factor.get("hybrid", 1.0)
        predicted.update(hybrid_tokens_per_s=batch / t, hybrid_dispatch=mode)
    host_need = n_cpu * kv
    host_ok = host is not None and host_need <= host.memory_bytes
    if not host_ok:
        why = ("the spec describes no host" if host is None else
               f"the host's {format_bytes(host.memory_bytes)} for offloaded caches cannot hold the "
               f"{format_bytes(host_need)} of {n_cpu} sequences' caches")
        if n_alone >= 1 and cpu_sequences is None:
            return made("gpu-rounds", range(batch), (), n_alone, f"no hybrid plan: {why}")
        raise OffloadError(f"offload: {why}; lower the batch or raise the memory cap")
    if cpu_sequences is None and n_alone >= 1 and \
            predicted["gpu_rounds_tokens_per_s"] >= predicted["hybrid_tokens_per_s"]:
        return made("gpu-rounds", range(batch), (), n_alone,
                    f"predicted {predicted['gpu_rounds_tokens_per_s']:.0f} tokens/s on the "
                    f"device alone, {predicted['hybrid_tokens_per_s']:.0f} hybrid")
    reason = ("fixed split" if cpu_sequences is not None else
              f"predicted {predicted['hybrid_tokens_per_s']:.0f} tokens/s hybrid "
              f"({predicted['hybrid_dispatch']}), "
              f"{predicted.get('gpu_rounds_tokens_per_s', 0):.0f} on the device alone")
    return made("hybrid", gpu_rows, cpu_rows, batch, reason)
