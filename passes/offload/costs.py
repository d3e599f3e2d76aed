"""What one decode step of a rotary decoder costs on each side of a hybrid CPU-GPU placement.

`DecoderShape` reads the few sizes that matter off a model (on any device, meta included):
per-layer weight bytes, K/V bytes per cached token, the widths that cross the host link.
`StepCosts` prices the pieces of one step with the device's roofline (HardwareSpec) and the
host's measured attention speed and link (HostSpec), each times a `scale` factor: 1 for the
planner's prediction, the ratio measured / predicted once the runtime's scheduler
(runtime/offload/scheduler.py) has profiled the pieces. `step_time` composes them per
dispatch mode, the same formulas for the plan and for the scheduler:

  gpu        every cache on the device: per layer lin(B) + gattn(B)
  merged     one batch: per layer lin(B) + max(gattn(G), xfer(C) + cattn(C)); the device
             waits for the host's attention before the layer's output projection
  pipelined  two sub-batches (NEO/APEX's asymmetric pipelining): the host attends for the C
             rows while the device runs the G rows' whole layer: per layer
             lin(C) + max(lin(G) + gattn(G), xfer(C) + cattn(C)); the weights are read twice

lin = the layer's linears and norms (memory-bound at decode: the weights' bytes), gattn /
cattn = attention over the cached tokens on the device (static caches: every slot) and on
the host (live tokens only), xfer = q, k, v to the host and the attention output back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

MODES = ("gpu", "merged", "pipelined")
COMPONENTS = ("lin", "gattn", "cattn", "xfer")


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a rotary decoder that the hybrid costs and the memory plan need."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    elem_bytes: int
    layer_weight_bytes: int  # one decoder layer's parameters
    other_weight_bytes: int  # embedding, final norm, lm_head
    ffn: int = 0  # the MLP's inner width

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecoderShape:
        cfg, layers = getattr(model, "config", None), getattr(model, "layers", None)
        if cfg is None or layers is None or not hasattr(layers[0], "attn"):
            raise TypeError(f"offload: expected a rotary decoder (models/llama.py "
                            f"RotaryDecoder: layers with attn, and a config), got "
                            f"{type(model).__name__}")
        attn = layers[0].attn
        p = next(model.parameters())
        seen: set[int] = set()

        def nbytes(params) -> int:
            total = 0
            for t in params:
                if id(t) not in seen:  # tied weights count once
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            return total

        layer = nbytes(layers[0].parameters())
        rest_layers = sum(nbytes(lay.parameters()) for lay in layers[1:])
        other = nbytes(model.parameters())
        if rest_layers != layer * (len(layers) - 1):
            raise TypeError("offload: the decoder's layers differ in size; the hybrid plan "
                            "assumes identical layers")
        mlp = sum(t.numel() for t in layers[0].mlp.parameters())
        ffn = mlp // (3 * int(cfg.hidden_size))  # SwiGLU: gate, up, down
        return cls(len(layers), int(cfg.hidden_size), attn.num_heads, attn.num_kv_heads,
                   attn.head_dim, int(cfg.vocab_size), p.element_size(), layer, other, ffn)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one cached token, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.elem_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_weight_bytes + self.other_weight_bytes

    def crossing_bytes(self, tokens: int) -> int:
        """Bytes over the host link per layer for `tokens` query tokens: q, k, v to the
        host, the attention output back."""
        per = 2 * self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim
        return tokens * per * self.elem_bytes


class StepCosts:
    """Per-layer piece times of a decode step (seconds), each times its `scale` factor."""

    def __init__(self, shape: DecoderShape, spec, scale: Mapping[str, float] | None = None,
                 same_memory: bool = False) -> None:
        if spec.host is None:
            raise ValueError(f"offload: hardware spec {spec.name!r} describes no host (CPU "
                             f"memory, attention speed, link); give a spec with one "
                             f"(`meshweave calibrate` writes it)")
        self.shape, self.spec, self.host = shape, spec, spec.host
        self.scale = dict.fromkeys(COMPONENTS, 1.0) | dict(scale or {})
        self.same_memory = same_memory  # the "device" is the host: nothing crosses a link
        self.dtype = {2: "float16", 4: "float32"}.get(shape.elem_bytes, "float32")

    def lin(self, rows: int, width: int = 1) -> float:
        if rows <= 0:
            return 0.0
        s = self.shape
        tokens = rows * width
        flops = 2 * tokens * s.layer_weight_bytes / s.elem_bytes
        act = 6 * tokens * s.hidden * s.elem_bytes
        # ~6 kernels (norms, projections, activations) pay the fixed launch latency each
        t = self.spec.compute_time(flops, s.layer_weight_bytes + act, self.dtype)
        return self.scale["lin"] * (t + 5 * self.spec.kernel_latency_s)

    def head(self, rows: int, width: int = 1) -> float:
        """The embedding gather, final norm and lm_head, once per step over all rows."""
        s = self.shape
        flops = 2 * rows * width * s.hidden * s.vocab
        t = self.spec.compute_time(flops, s.other_weight_bytes / 2, self.dtype)
        return self.scale["lin"] * (t + 3 * self.spec.kernel_latency_s)

    def gattn(self, rows: int, slots: int, width: int = 1) -> float:
        """Device attention of `rows` sequences over `slots` cache slots each (static)."""
        if rows <= 0:
            return 0.0
        s = self.shape
        kv = rows * slots * 2 * s.num_kv_heads * s.head_dim * s.elem_bytes
        flops = 4 * rows * width * slots * s.num_heads * s.head_dim
        # the functional cache update writes a new copy of this layer's cache
        t = self.spec.compute_time(flops, 2 * kv, self.dtype)
        return self.scale["gattn"] * (t + 3 * self.spec.kernel_latency_s)

    def cattn(self, live_tokens: int, width: int = 1) -> float:
        """Host attention over `live_tokens` cached tokens in all (summed over sequences)."""
        if live_tokens <= 0:
            return 0.0
        s = self.shape
        kv = live_tokens * 2 * s.num_kv_heads * s.head_dim * s.elem_bytes * width
        return self.scale["cattn"] * kv / self.host.attention_Bps

    def xfer(self, rows: int, width: int = 1) -> float:
        if rows <= 0 or self.same_memory:
            return 0.0
        link = self.host.link
        t = 2 * link.latency_s + self.shape.crossing_bytes(rows * width) / link.bandwidth_Bps
        return self.scale["xfer"] * t

    def step_time(self, mode: str, n_gpu: int, n_cpu: int, gpu_slots: int, cpu_live: int,
                  width: int = 1) -> tuple[float, float, float]:
        """(step seconds, device busy seconds, host busy seconds) of one step in `mode`:
        n_gpu sequences with device caches of gpu_slots slots each, n_cpu with host caches
        holding cpu_live live tokens in all."""
        L = self.shape.num_layers
        rows = n_gpu + n_cpu
        head = self.head(rows, width)
        if mode == "gpu":
            if n_cpu:
                raise ValueError("offload: mode 'gpu' has no host-resident sequence")
            dev = L * (self.lin(rows, width) + self.gattn(rows, gpu_slots, width)) + head
            return dev, dev, 0.0
        ga = self.gattn(n_gpu, gpu_slots, width)
        ca = self.cattn(cpu_live, width)
        host = self.xfer(n_cpu, width) + ca
        if mode == "merged":
            lin = self.lin(rows, width)
            return L * (lin + max(ga, host)) + head, L * (lin + ga) + head, L * ca
        if mode == "pipelined":
            lin_c, lin_g = self.lin(n_cpu, width), self.lin(n_gpu, width)
            return (L * (lin_c + max(lin_g + ga, host)) + head,
                    L * (lin_c + lin_g + ga) + head, L * ca)
        raise ValueError(f"offload: unknown dispatch mode {mode!r}; expected one of {MODES}")

    def best_mode(self, n_gpu: int, n_cpu: int, gpu_slots: int, cpu_live: int,
                  width: int = 1) -> tuple[str, float]:
        """The hybrid dispatch mode of least predicted step time, and that time."""
        if n_cpu == 0:
            return "gpu", self.step_time("gpu", n_gpu, 0, gpu_slots, 0, width)[0]
        if n_gpu == 0:
            return "merged", self.step_time("merged", 0, n_cpu, gpu_slots, cpu_live, width)[0]
        times = {m: self.step_time(m, n_gpu, n_cpu, gpu_slots, cpu_live, width)[0]
                 for m in ("merged", "pipelined")}
        mode = min(times, key=times.get)
        return mode, times[mode]
