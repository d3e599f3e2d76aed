"""The overlap scheduler: each decode step's dispatch, predicted from profiled piece times.

APEX's point is that the hybrid dispatch must follow predicted times, not fixed rules. Each
step this scheduler predicts the step time of every dispatch mode the current state allows
(passes/offload/costs.py: merged, pipelined; "gpu" once no host-resident sequence is still
running), with the live token counts of this step, and runs the fastest. Its piece times
start as the cost model's (the hardware spec) and are corrected by what the runtime
measures: per component (device linears, device attention, host attention, transfers), the
ratio of measured to predicted seconds over the steps so far scales the prediction. So the
choice moves as sequences grow (attention grows, the linears do not) and finish (finished
host rows cost the host nothing; with none left the step is device-only).

fixed="merged" (or another mode) turns the prediction off: a fixed rule, for comparison.
"""

from __future__ import annotations

from collections import Counter

from meshweave.passes.offload import COMPONENTS, DecoderShape, StepCosts


class OverlapScheduler:
    """Chooses each step's dispatch mode and keeps the busy fractions for the progress line."""

    def __init__(self, shape: DecoderShape, spec, n_gpu: int, n_cpu: int, capacity: int,
                 same_memory: bool, fixed: str | None = None) -> None:
        self.prior = StepCosts(shape, spec, same_memory=same_memory)
        self.shape, self.spec, self.same_memory = shape, spec, same_memory
        self.n_gpu, self.n_cpu, self.capacity = n_gpu, n_cpu, capacity
        self.fixed = fixed
        self.measured = dict.fromkeys(COMPONENTS, 0.0)
        self.predicted = dict.fromkeys(COMPONENTS, 0.0)
        self.modes: Counter[str] = Counter()
        self.wall = self.device_busy = self.host_busy = 0.0
        self.predicted_wall = self.decode_wall = 0.0
        self.steps = 0

    def scale(self) -> dict[str, float]:
        """Measured / predicted seconds per component so far (1 before any measurement)."""
        return {c: (self.measured[c] / self.predicted[c]) if self.predicted[c] > 0 else 1.0
                for c in COMPONENTS}

    def costs(self) -> StepCosts:
        return StepCosts(self.shape, self.spec, self.scale(), self.same_memory)

    def choose(self, cpu_live: int, cpu_active: int, width: int = 1) -> str:
        """The dispatch of the next step: cpu_live tokens cached by the cpu_active host rows
        still running."""
        if cpu_active == 0 or self.n_cpu == 0:
            return "gpu"
        if self.fixed is not None:
            return self.fixed
        if self.n_gpu == 0 or width > 1:
            return "merged"  # one sub-batch (or the prefill): nothing to pipeline against
        return self.costs().best_mode(self.n_gpu, self.n_cpu, self.capacity, cpu_live)[0]

    def record(self, mode: str, device: dict[str, float], host_seconds: float, wall: float,
               cpu_live: int, width: int = 1) -> None:
        """One step's measurements: device seconds per component ("lin", "gattn"), the host's
        attention seconds (thread-seconds / threads), and the step's wall time."""
        p, L = self.prior, self.shape.num_layers
        rows = self.n_gpu + self.n_cpu
        if mode == "pipelined":
            lin = L * (p.lin(self.n_gpu, width) + p.lin(self.n_cpu, width))
        else:
            lin = L * p.lin(rows, width)
        pred = {"lin": lin + p.head(rows, width),
                "gattn": L * p.gattn(self.n_gpu if mode != "gpu" else rows, self.capacity, width)
                if self.n_gpu or mode == "gpu" else 0.0,
                "cattn": L * p.cattn(cpu_live, width) if mode != "gpu" else 0.0}
        if width == 1:  # the prefill's times say little about decode steps
            for c, t in pred.items():
                if t > 0 and device.get(c, host_seconds if c == "cattn" else 0.0) > 0:
                    self.predicted[c] += t
                    self.measured[c] += host_seconds if c == "cattn" else device[c]
        self.modes[mode] += 1
        self.steps += 1
        if width == 1:  # the whole step against its prior prediction: the plan's feedback
            n_cpu = self.n_cpu if mode != "gpu" else 0
            self.predicted_wall += p.step_time(mode, self.n_gpu if n_cpu else rows, n_cpu,
                                               self.capacity, cpu_live)[0]
            self.decode_wall += wall
        self.wall += wall
        self.device_busy += sum(device.values())
        self.host_busy += host_seconds

    def busy(self) -> tuple[float, float]:
        """(device, host) busy fractions of the wall time so far (the host's averaged over
        its threads: record() gets thread-seconds / threads)."""
        if self.wall <= 0:
            return 0.0, 0.0
        return min(1.0, self.device_busy / self.wall), min(1.0, self.host_busy / self.wall)

    def line(self) -> str:
        gpu, cpu = self.busy()
        modes = ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items()))
        return f"GPU busy {gpu:.0%}, CPU busy {cpu:.0%}; steps by dispatch: {modes}"

    def wall_scale(self) -> float | None:
        """Measured / predicted seconds of the decode steps (None before any): what the next
        placement decision multiplies the hybrid prediction by."""
        return self.decode_wall / self.predicted_wall if self.predicted_wall > 0 else None

    def summary(self) -> dict:
        gpu, cpu = self.busy()
        return {"steps": self.steps, "dispatch": dict(self.modes), "gpu_busy": gpu,
                "cpu_busy": cpu, "scale": self.scale(), "wall_scale": self.wall_scale(),
                "wall_seconds": self.wall}
