"""Measure the local device and write a HardwareSpec (`meshweave calibrate`).

Measured: dense matmul FLOP/s in fp32 (and fp16/bf16 on CUDA), device memory (CUDA total
memory, or the host's RAM), memory bandwidth (a large copy), and optionally a two-process
gloo all-reduce on this host (latency from a tiny message, bandwidth from a large one) as the
intra-node link; and the host side of hybrid generation (passes/offload/): decode attention's
speed on the CPU cores and the host-device link (PCIe on CUDA). Everything else (devices per node, the inter-node link) comes from a preset.
Measured rates are achieved rates, so the spec's efficiency factors are 1.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from .hardware import HardwareSpec, HostSpec, LinkSpec, get_spec


def _timed(fn, iters: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def matmul_flops(size: int, dtype: torch.dtype, device: str, budget_s: float = 0.5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    once = _timed(lambda: a @ b, 1)
    iters = max(1, min(50, int(budget_s / max(once, 1e-6))))
    return 2 * size**3 / _timed(lambda: a @ b, iters)


def memory_bandwidth(device: str, nbytes: int = 1 << 27) -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / _timed(lambda: y.copy_(x), 5)  # read + write


def kernel_latency(device: str) -> float:
    """Seconds per call of a tiny in-place add issued back to back: the fixed cost of one op
    (dispatch and launch) that the roofline does not see."""
    x = torch.zeros(256, device=device)
    y = torch.zeros(256, device=device)
    return _timed(lambda: y.add_(x), 200)


def host_attention_rate(batch: int = 4, kv_heads: int = 8, ctx: int = 2048,
                        head_dim: int = 64) -> float:
    """Bytes of K/V cache per second that one decode step's attention (one query per
    sequence) reads on this host's cores: the CPU side of hybrid generation
    (passes/offload/). fp32, as the offloaded caches of the CPU tests are."""
    q = torch.randn(batch, kv_heads * 2, 1, head_dim)
    k = torch.randn(batch, kv_heads * 2, ctx, head_dim)
    v = torch.randn_like(k)
    attend = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        t = _timed(lambda: attend(q, k, v), 5)
    return batch * kv_heads * ctx * head_dim * 2 * 4 / t  # the K and V the GQA groups read


def host_link(cuda: bool, nbytes: int = 1 << 26) -> LinkSpec:
    """The host-device link: pinned host-to-device copies on CUDA (latency from 4 bytes,
    bandwidth from `nbytes`); without a GPU the "device" is the host, and the link is a
    host memory copy."""
    dev = "cuda" if cuda else "cpu"
    small, big = torch.zeros(1), torch.zeros(nbytes // 4)
    if cuda:
        small, big = small.pin_memory(), big.pin_memory()
    out_small, out_big = torch.empty(1, device=dev), torch.empty(nbytes // 4, device=dev)
    latency = _timed(lambda: out_small.copy_(small, non_blocking=True), 50)
    t = _timed(lambda: out_big.copy_(big, non_blocking=True), 5)
    return LinkSpec(latency_s=latency, bandwidth_Bps=nbytes / max(t - latency, 1e-9))


def memory_capacity(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9


# (kind, float32 elements) timed on 2 ranks: all-reduces of four sizes fit alpha and beta;
# one large all-gather and reduce-scatter give their efficiency against the ring model.
_LINK_CASES = [("all_reduce", 1), ("all_reduce", 1 << 14), ("all_reduce", 1 << 18),
               ("all_reduce", 1 << 22), ("all_gather", 1 << 22), ("reduce_scatter", 1 << 22)]


def time_collectives(cases: list, iters: int = 5) -> list[float]:
    """Median seconds of each (kind, float32 elements) collective over the default process
    group, which this rank has joined (every rank runs the same cases)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    times = []
    for kind, n in cases:
        full, part = torch.ones(n), torch.ones(max(1, n // world))
        op = {
            "all_reduce": lambda f=full: dist.all_reduce(f),
            "all_gather": lambda f=full, p=part: dist.all_gather_into_tensor(f, p),
            "reduce_scatter": lambda f=full, p=part: dist.reduce_scatter_tensor(p, f),
        }[kind]
        dist.barrier()
        op()  # warm-up
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            op()
            samples.append(time.perf_counter() - t0)
        times.append(sorted(samples)[len(samples) // 2])
    return times


def _collective_worker(rank: int, world: int, port: int, cases: list, out) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    times = time_collectives(cases)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def fit_link(cases: list, times: list[float], world: int = 2) -> LinkSpec:
    """alpha and beta by least squares over the ring all-reduces of `world` ranks
    (t = 2(n-1) alpha + 2(n-1)/n B / beta), then each other kind's efficiency: the ring
    model's bandwidth term over the measured one."""
    import numpy as np

    steps, frac = 2 * (world - 1), (world - 1) / world
    ar = [(4 * n, t) for (k, n), t in zip(cases, times) if k == "all_reduce"]
    design = np.array([[steps, 2 * frac * b] for b, _ in ar])
    (alpha, inv_beta), *_ = np.linalg.lstsq(design, np.array([t for _, t in ar]), rcond=None)
    alpha = max(float(alpha), 1e-7)
    beta = 1.0 / max(float(inv_beta), 1e-12)
    eff = []
    for (kind, n), t in zip(cases, times):
        if kind == "all_reduce":
            continue
        modelled = (4 * n * frac) / beta  # (n-1)/n of the bytes
        fixed = (world - 1) * alpha
        eff.append((kind, min(2.0, max(0.05, modelled / max(t - fixed, 1e-9)))))
    return LinkSpec(alpha, beta, tuple(eff))


def loopback_link(world: int = 2) -> LinkSpec:
    """Collectives between `world` gloo ranks on 127.0.0.1, fitted by fit_link. With more
    ranks than cores the fit includes the ranks competing for them, as a run of that many
    ranks on this machine does."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_collective_worker, args=(r, world, port, _LINK_CASES, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    times = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    return fit_link(_LINK_CASES, times, world)


def calibrate(
    base: str | None, size: int, comm: bool, device: str | None = None
) -> tuple[HardwareSpec, str]:
    """A spec for this device (`device`: "cuda" or "cpu", default: the GPU when there is
    one), and a human-readable report of what was measured."""
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    device = "cuda" if cuda else "cpu"
    preset = get_spec(base or ("h100" if cuda else "cpu"))
    flops = {"float32": matmul_flops(size, torch.float32, device)}
    if cuda:
        for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            flops[name] = matmul_flops(size, dt, device)
    else:
        flops.setdefault("float16", flops["float32"] / 2)
    bw = memory_bandwidth(device)
    latency = min(kernel_latency(device), 9e-4)
    mem = memory_capacity(device)
    intra = loopback_link() if comm else preset.intra_node
    name = (torch.cuda.get_device_name(0) if cuda else "local-cpu").replace(" ", "-").lower()
    # the host side of hybrid generation: its memory (half of the RAM for offloaded caches),
    # decode attention's speed on its cores, and the host-device link
    host = HostSpec(memory_bytes=memory_capacity("cpu") / 2,
                    attention_Bps=host_attention_rate(), link=host_link(cuda))
    spec = dataclasses.replace(
        preset,
        name=f"calibrated-{name}",
        flops=flops,
        memory_bytes=mem,
        memory_bandwidth=bw,
        intra_node=intra,
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        kernel_latency_s=latency,
        devices_per_node=torch.cuda.device_count() if cuda else preset.devices_per_node,
        host=host,
    )
    lines = [f"device {name} ({device})"]
    lines += [f"  matmul {k}: {v / 1e12:.3f} TFLOP/s" for k, v in sorted(flops.items())]
    lines.append(f"  memory {mem / 2**30:.1f} GiB, bandwidth {bw / 1e9:.1f} GB/s")
    lines.append(f"  per-kernel latency {latency * 1e6:.1f} us")
    src = "measured (gloo loopback)" if comm else f"from preset {preset.name}"
    lines.append(
        f"  intra-node link: {intra.latency_s * 1e6:.1f} us, "
        f"{intra.bandwidth_Bps / 1e9:.2f} GB/s ({src})"
        + "".join(f"; {k} at {v:.2f}x the ring bandwidth" for k, v in intra.efficiency)
    )
    lines.append(
        f"  host: {host.memory_bytes / 2**30:.1f} GiB for offloaded caches, decode attention "
        f"{host.attention_Bps / 1e9:.1f} GB/s of K/V, link {host.link.latency_s * 1e6:.1f} us, "
        f"{host.link.bandwidth_Bps / 1e9:.1f} GB/s ({'PCIe' if cuda else 'host copy'})")
    return spec, "\n".join(lines)
