"""Hardware descriptions for the parallel planner's cost models.

A `HardwareSpec` holds the few numbers the alpha-beta communication model and the roofline
compute model need: peak FLOP/s per dtype, device memory and its bandwidth, how many devices
share a node, and the latency/bandwidth of the intra-node and inter-node links. Bandwidths are
bytes per second *per direction* per device; latencies are seconds per message (the alpha of
the alpha-beta model). Figures are vendor peak numbers (dense, no sparsity); the efficiency
factors scale them to what kernels and collectives typically reach.

Specs come from a preset name (`get_spec("h100")`) or a JSON file written by `save_spec`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def canonical_dtype(dtype: Any) -> str:
    """Map `torch.float16`, `"fp16"`, `"half"`... to `"float16"` (and likewise others)."""
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(name, name)


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One link class: `latency_s` per message, `bandwidth_Bps` bytes/s per direction.

    `efficiency`: (collective kind, achieved / modelled bandwidth) pairs for collectives the
    backend does not run as a bandwidth-optimal ring (gloo's all_gather and reduce_scatter
    reach a third of it on loopback); measured by `meshweave calibrate --comm`, 1 otherwise.
    """

    latency_s: float
    bandwidth_Bps: float
    efficiency: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_Bps <= 0:
            raise ValueError(f"LinkSpec: need latency >= 0 and bandwidth > 0, got {self}")
        pairs = tuple((str(k), float(v)) for k, v in self.efficiency)  # JSON gives lists
        if any(v <= 0 for _, v in pairs):
            raise ValueError(f"LinkSpec: collective efficiencies must be positive, got {pairs}")
        object.__setattr__(self, "efficiency", pairs)

    def bandwidth_for(self, kind: str) -> float:
        """Bytes/s a collective of `kind` achieves per direction on this link."""
        for k, v in self.efficiency:
            if k == kind:
                return self.bandwidth_Bps * v
        return self.bandwidth_Bps


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """The host CPU beside each device, for hybrid CPU-GPU generation (passes/offload/).

    `memory_bytes`: host memory the offloaded KV caches may use per device; `attention_Bps`:
    bytes of K/V cache per second that decode attention on the host's cores reads (it is
    memory-bound: `meshweave calibrate` times it); `link`: the host-device link (PCIe), used
    for the q, k, v and attention outputs that cross it each layer.
    """

    memory_bytes: float
    attention_Bps: float
    link: LinkSpec

    def __post_init__(self) -> None:
        if isinstance(self.link, Mapping):  # from JSON
            object.__setattr__(self, "link", LinkSpec(**self.link))
        if self.memory_bytes <= 0 or self.attention_Bps <= 0:
            raise ValueError(f"HostSpec: memory_bytes and attention_Bps must be positive, "
                             f"got {self.memory_bytes}, {self.attention_Bps}")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """Per-device capabilities plus the two link classes of a cluster of identical nodes."""

    name: str
    flops: Mapping[str, float] = dataclasses.field(hash=False)
    memory_bytes: float
    memory_bandwidth: float
    devices_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    # Fixed time of every kernel on top of the roofline (launch, ramp-up, tail): what keeps
    # small ops from taking roofline time. 0 for presets without a measurement.
    kernel_latency_s: float = 0.0
    # The host CPU and its link, for hybrid generation (None: the device has no host side).
    host: HostSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.host, Mapping):  # from JSON
            object.__setattr__(self, "host", HostSpec(**self.host))
        flops = {canonical_dtype(k): float(v) for k, v in dict(self.flops).items()}
        if not flops or any(v <= 0 for v in flops.values()):
            raise ValueError(f"HardwareSpec {self.name!r}: flops must be positive: {flops}")
        object.__setattr__(self, "flops", flops)
        if self.memory_bytes <= 0 or self.memory_bandwidth <= 0 or self.devices_per_node <= 0:
            raise ValueError(
                f"HardwareSpec {self.name!r}: memory_bytes, memory_bandwidth and "
                "devices_per_node must be positive"
            )
        for f in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"HardwareSpec {self.name!r}: {f} must be in (0, 1]")
        if not 0 <= self.kernel_latency_s < 1e-3:
            raise ValueError(f"HardwareSpec {self.name!r}: kernel_latency_s must be in "
                             f"[0, 1e-3) seconds, got {self.kernel_latency_s}")

    def peak_flops(self, dtype: Any) -> float:
        """Vendor peak FLOP/s for `dtype`; raises if the device has no such math mode."""
        key = canonical_dtype(dtype)
        if key not in self.flops:
            raise ValueError(
                f"HardwareSpec {self.name!r} has no FLOP rate for {key!r}; "
                f"known dtypes: {sorted(self.flops)}"
            )
        return self.flops[key]

    def compute_time(self, flops: float, bytes_moved: float = 0.0, dtype: Any = "float32") -> float:
        """Roofline estimate: the slower of the math and the memory traffic, plus the fixed
        per-kernel latency."""
        math_t = flops / (self.peak_flops(dtype) * self.compute_efficiency)
        mem_t = bytes_moved / (self.memory_bandwidth * self.memory_efficiency)
        return max(math_t, mem_t) + self.kernel_latency_s

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["flops"] = dict(self.flops)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HardwareSpec:
        d = dict(d)
        try:
            d["intra_node"] = LinkSpec(**d["intra_node"])
            d["inter_node"] = LinkSpec(**d["inter_node"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            fields = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"HardwareSpec: bad spec dict ({e}); expected fields {fields}") from e


GB = 1e9
GiB = 2**30
TFLOPS = 1e12

# Measured on an H200 (benchmarks/cost_model_check.py, RESULTS.md): ops the roofline puts at
# 1-2 us (a 1M-element add, a 1024x1024 layer norm, a 128-row GEMM) took 8-21 us each when
# issued back to back from Python, as the runtime issues them. 5 us is the floor of that gap.
GPU_KERNEL_LATENCY_S = 5e-6

# Hosts for hybrid generation (passes/offload/). A DGX H100/H200 has 2 TB of DDR5 and two
# 56-core Xeons (8 channels of DDR5-4800 each, ~600 GB/s in all) for 8 GPUs: per GPU 256 GB
# and a share of ~40 GB/s that decode attention reaches (memory-bound, ~50% of peak on its
# cores); each GPU has a PCIe Gen5 x16 link (64 GB/s per direction, ~50 achieved, ~10 us per
# transfer). DGX A100: 1 TB, PCIe Gen4 x16 (~25 GB/s achieved). Order-of-magnitude figures
# until `meshweave calibrate` measures the machine.
_PCIE5 = LinkSpec(latency_s=10e-6, bandwidth_Bps=50 * GB)
_PCIE4 = LinkSpec(latency_s=10e-6, bandwidth_Bps=25 * GB)
_PCIE3 = LinkSpec(latency_s=10e-6, bandwidth_Bps=12 * GB)
_DGX_HOST = HostSpec(memory_bytes=256 * GB, attention_Bps=40 * GB, link=_PCIE5)

PRESETS: dict[str, HardwareSpec] = {
    # NVIDIA H100 SXM5 80GB datasheet: 67 TFLOPS FP32 (non-tensor), 989 TFLOPS dense FP16/BF16
    # tensor core, 80 GB HBM3 at 3.35 TB/s. NVLink 4: 900 GB/s total = 450 GB/s per
    # direction. DGX H100: 8 GPUs/node, one ConnectX-7 NDR 400 Gb/s (50 GB/s) port per GPU.
    "h100": HardwareSpec(
        name="h100",
        flops={"float32": 67 * TFLOPS, "float16": 989 * TFLOPS, "bfloat16": 989 * TFLOPS},
        memory_bytes=80 * GB, memory_bandwidth=3.35e12, devices_per_node=8,
        intra_node=LinkSpec(latency_s=3e-6, bandwidth_Bps=450 * GB),
        inter_node=LinkSpec(latency_s=10e-6, bandwidth_Bps=50 * GB),
        compute_efficiency=0.6, memory_efficiency=0.8,
        kernel_latency_s=GPU_KERNEL_LATENCY_S, host=_DGX_HOST,
    ),
    # NVIDIA H200 SXM datasheet: same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s,
    # NVLink 900 GB/s total; HGX H200 nodes with 400 Gb/s NDR per GPU.
    "h200": HardwareSpec(
        name="h200",
        flops={"float32": 67 * TFLOPS, "float16": 989 * TFLOPS, "bfloat16": 989 * TFLOPS},
        memory_bytes=141 * GB, memory_bandwidth=4.8e12, devices_per_node=8,
        intra_node=LinkSpec(latency_s=3e-6, bandwidth_Bps=450 * GB),
        inter_node=LinkSpec(latency_s=10e-6, bandwidth_Bps=50 * GB),
        compute_efficiency=0.6, memory_efficiency=0.8,
        kernel_latency_s=GPU_KERNEL_LATENCY_S, host=_DGX_HOST,
    ),
    # NVIDIA A100 SXM4 80GB datasheet: 19.5 TFLOPS FP32, 312 TFLOPS dense FP16/BF16 tensor,
    # 80 GB HBM2e at 2.039 TB/s. NVLink 3: 600 GB/s total = 300 GB/s per direction.
    # DGX A100: 8 GPUs/node, one HDR 200 Gb/s (25 GB/s) port per GPU.
    "a100": HardwareSpec(
        name="a100",
        flops={"float32": 19.5 * TFLOPS, "float16": 312 * TFLOPS, "bfloat16": 312 * TFLOPS},
        memory_bytes=80 * GB, memory_bandwidth=2.039e12, devices_per_node=8,
        intra_node=LinkSpec(latency_s=4e-6, bandwidth_Bps=300 * GB),
        inter_node=LinkSpec(latency_s=10e-6, bandwidth_Bps=25 * GB),
        compute_efficiency=0.6, memory_efficiency=0.8,
        kernel_latency_s=GPU_KERNEL_LATENCY_S,
        host=HostSpec(memory_bytes=128 * GB, attention_Bps=40 * GB, link=_PCIE4),
    ),
    # NVIDIA T4 datasheet (APEX's card): 8.1 TFLOPS FP32, 65 TFLOPS FP16 tensor, 16 GB GDDR6
    # at 320 GB/s, PCIe Gen3 x16, one or a few per server; no NVLink (PCIe between cards).
    # A cloud T4 VM (n1-standard-16 class): 60 GB host memory, ~20 GB/s of attention.
    "t4": HardwareSpec(
        name="t4",
        flops={"float32": 8.1 * TFLOPS, "float16": 65 * TFLOPS},
        memory_bytes=16 * GB, memory_bandwidth=320 * GB, devices_per_node=4,
        intra_node=LinkSpec(latency_s=10e-6, bandwidth_Bps=12 * GB),
        inter_node=LinkSpec(latency_s=50e-6, bandwidth_Bps=4 * GB),
        compute_efficiency=0.6, memory_efficiency=0.8,
        kernel_latency_s=GPU_KERNEL_LATENCY_S,
        host=HostSpec(memory_bytes=60 * GB, attention_Bps=20 * GB, link=_PCIE3),
    ),
    # Huawei Ascend 910 (first generation, Hot Chips 31, 2019): 256 TFLOPS FP16 (Da Vinci
    # cube), 32 GB HBM2 (4 stacks) at ~1.2 TB/s, 3 HCCS ports of 240 Gb/s = 30 GB/s each,
    # integrated 100 Gb/s RoCE v2 (12.5 GB/s) for inter-server traffic. Atlas 800 (model
    # 9000) training servers hold 8 NPUs (two HCCS full-mesh groups of 4; we model one
    # 30 GB/s link per direction, the ring bottleneck). No published FP32 cube rate: the
    # figure below is our estimate of the vector units (32 cores x 64 fp32 lanes x FMA x
    # ~1 GHz ~= 4 TFLOPS); fp32 models normally run the cube in fp16 with fp32 accumulation.
    # The first-generation 910 has no bfloat16 math, so no bfloat16 entry.
    "ascend910": HardwareSpec(
        name="ascend910",
        flops={"float32": 4 * TFLOPS, "float16": 256 * TFLOPS},
        memory_bytes=32 * GiB, memory_bandwidth=1.2e12, devices_per_node=8,
        intra_node=LinkSpec(latency_s=5e-6, bandwidth_Bps=30 * GB),
        inter_node=LinkSpec(latency_s=15e-6, bandwidth_Bps=12.5 * GB),
        compute_efficiency=0.5, memory_efficiency=0.8,
    ),
    # A nominal multi-core server CPU "device" (one per node), e.g. for gloo runs on a laptop
    # or CI box: ~1 TFLOPS fp32 with AVX-512, 64 GB DRAM at ~100 GB/s; local "intra-node"
    # traffic through shared memory, 10 GbE between hosts. Order-of-magnitude figures.
    "cpu": HardwareSpec(
        name="cpu",
        flops={"float32": 1 * TFLOPS, "float16": 0.5 * TFLOPS, "bfloat16": 1 * TFLOPS},
        memory_bytes=64 * GB, memory_bandwidth=100 * GB, devices_per_node=8,
        intra_node=LinkSpec(latency_s=20e-6, bandwidth_Bps=10 * GB),
        inter_node=LinkSpec(latency_s=50e-6, bandwidth_Bps=1.25 * GB),
        compute_efficiency=0.5, memory_efficiency=0.7,
        # the "device" is the host itself: offloaded caches stay in the same DRAM and no
        # bytes cross a link (a copy at memory speed)
        host=HostSpec(memory_bytes=64 * GB, attention_Bps=35 * GB,
                      link=LinkSpec(latency_s=1e-6, bandwidth_Bps=50 * GB)),
    ),
}


def format_bytes(nbytes: float) -> str:
    """A size for messages: '1.50 GiB', '0.42 MiB', '12 bytes'."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} bytes"


def list_presets() -> list[str]:
    return sorted(PRESETS)


def save_spec(spec: HardwareSpec, path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f, indent=2)
        f.write("\n")


def load_spec(path: str | os.PathLike[str]) -> HardwareSpec:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"load_spec: {path} is not valid JSON: {e}") from e
    return HardwareSpec.from_dict(data)


def get_spec(name_or_path: str | os.PathLike[str] | HardwareSpec) -> HardwareSpec:
    """A preset by (case-insensitive) name, a spec loaded from a JSON file, or `spec` itself."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    text = os.fspath(name_or_path)
    key = text.strip().lower().replace("-", "").replace("_", "")
    if key in PRESETS:
        return PRESETS[key]
    if os.path.isfile(text):
        return load_spec(text)
    raise ValueError(
        f"unknown hardware {text!r}: not a preset ({', '.join(list_presets())}) "
        "and not an existing JSON spec file"
    )
