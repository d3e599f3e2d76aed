"""Generation under memory pressure (issue 18): APEX-style hybrid CPU-GPU decoding against
device-only decoding and a fixed-rule split, in one run, under one device memory cap.

    python benchmarks/offload_bench.py            # CUDA: a llama-1B-class model (random
                                                  # weights), fp16, batch 64, 128 + 512 tokens
    python benchmarks/offload_bench.py --cpu      # tiny sizes, fp32: the "device" is the CPU
                                                  # too, so it shows that it runs, not speed

The cap (--memory-gib; default: the weights, one step's workspace and --fit = 60% of the
batch's KV caches) leaves room for part of the batch's caches. The host's decode-attention speed and
the host-device link are measured first (passes/parallel/cost/calibrate.py, as `meshweave
calibrate` does) and put into the hardware spec the plan is made on. Compared:

  gpu-only    the whole-step compiled programs, in consecutive rounds of the largest batch
              that fits the cap (what a device-only server runs under it)
  hybrid      meshweave's plan: the caches that do not fit stay on the CPU, the overlap
              scheduler picks each step's dispatch from profiled times
  fixed-half  half the batch's caches on the CPU (more if the cap forces it), one fixed
              dispatch (merged), no prediction

Each runs once to compile, then is timed twice (the faster run counts). Greedy tokens of hybrid and fixed-half are checked
against gpu-only's. Per-token latency is a decode step's mean time (each running sequence
gets one token per step). Last line:
`offload tokens/s gpu-only T0 (rounds of N), hybrid T1, fixed-half T2: hybrid/gpu-only R1, hybrid/fixed-half R2`
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import meshweave
from meshweave.models.llama import Llama, LlamaConfig
from meshweave.passes.offload import DecoderShape
from meshweave.passes.offload.placement import _device_bytes
from meshweave.passes.parallel.cost.calibrate import host_attention_rate, host_link
from meshweave.passes.parallel.cost.hardware import HostSpec, get_spec
from meshweave.runtime.generate import prefill_length

# llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8, ffn 8192), vocab cut to 32000
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                num_kv_heads=8, ffn_hidden_size=8192, max_seq_len=4096)
TINY = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            ffn_hidden_size=256, max_seq_len=512)


def measured_spec(base: str, cuda: bool):
    """The preset with this machine's host side measured (attention speed, link)."""
    spec = get_spec(base)
    host = HostSpec(memory_bytes=spec.host.memory_bytes, attention_Bps=host_attention_rate(),
                    link=host_link(cuda))
    return dataclasses.replace(spec, host=host)


def timed(cm, prompts, n, repeat=2, **kw):
    """(the last output, the best of `repeat` timed runs) after one run that compiles."""
    cm.generate(prompts, n, **kw)
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = cm.generate(prompts, n, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (CUDA), 16 (--cpu)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (CUDA), 8")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 (CUDA), 96")
    ap.add_argument("--fit", type=float, default=0.6,
                    help="share of the batch's KV caches the default cap leaves room for")
    ap.add_argument("--memory-gib", type=float, default=None, help="the device memory cap")
    ap.add_argument("--spec", default=None, help="base preset (default h100 / cpu)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    batch = args.batch or (64 if cuda else 16)
    plen = args.prompt_len or (128 if cuda else 8)
    new = args.new_tokens or (512 if cuda else 96)
    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_1B if cuda else TINY))
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(plen // 2, plen + 1, (batch,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    cache_len = max(lengths) + new
    shape = DecoderShape.of(model)
    prefill = prefill_length(prompts, cache_len + 1)  # as the runtime pads
    cap = args.memory_gib * 2**30 if args.memory_gib else _device_bytes(
        shape, int(batch * args.fit), batch, prefill, cache_len + 1)
    spec = measured_spec(args.spec or ("h100" if cuda else "cpu"), cuda)
    spec_file = "/tmp/meshweave_offload_spec.json"
    from meshweave.passes.parallel.cost.hardware import save_spec

    save_spec(spec, spec_file)
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__},"
          f" {cfg.num_layers} layers hidden {cfg.hidden_size}, {dtype}, batch {batch}, prompts "
          f"{min(lengths)}-{max(lengths)}, {new} new tokens, cap {cap / 2**30:.3f} GiB; host "
          f"attention {spec.host.attention_Bps / 1e9:.1f} GB/s, link "
          f"{spec.host.link.bandwidth_Bps / 1e9:.1f} GB/s (measured)")
    ids = torch.tensor([prompts[0]], device=device)
    opts = meshweave.CompileOptions(memory_limit=cap, hardware=spec_file)
    with torch.no_grad():
        capped = meshweave.compile(model, (ids,), options=opts)
        plain = meshweave.compile(model, (ids,), options=opts.replace(memory_limit=None))
    from meshweave.runtime.offload import hybrid_generator_for

    hybrid_gen = hybrid_generator_for(capped, cache_len, batch)
    plan = hybrid_gen.plan(prompts, new)
    print(plan.placement_line())
    rounds = plan.round_size if plan.mode == "gpu-rounds" else plan.predicted.get(
        "gpu_round_size", batch)
    rows = {}
    ref_tokens = []
    t_gpu, steps_gpu = 0.0, 0
    for start in range(0, batch, rounds):  # gpu-only: rounds of what fits
        out, t = timed(plain, prompts[start:start + rounds], new, cache_len=cache_len)
        ref_tokens += out.tokens
        t_gpu, steps_gpu = t_gpu + t, steps_gpu + out.steps
    n_tokens = sum(len(t) for t in ref_tokens)
    rows["gpu-only"] = (n_tokens / t_gpu, t_gpu / max(steps_gpu, 1), True)
    # the fixed rule: half the caches on the CPU (more if the cap forces it), one dispatch
    half = max(batch // 2, len(plan.cpu_rows))
    for name, kw in (("hybrid", {}), ("fixed-half", dict(cpu_sequences=half,
                                                          dispatch="merged"))):
        out, t = timed(capped, prompts, new, cache_len=cache_len, max_batch=batch, **kw)
        rows[name] = (out.new_tokens / t, t / max(out.steps, 1), out.tokens == ref_tokens)
        print(f"{name}: {out.offload['placement']}")
        if "progress" in out.offload:
            print(f"{name}: {out.offload['progress']}")
    for name, (tps, lat, same) in rows.items():
        print(f"{name:10s} {tps:10.1f} tokens/s, {lat * 1e3:8.2f} ms per token, tokens "
              f"{'equal gpu-only' if same else 'DIFFER from gpu-only'}")
    g0, h, f = rows["gpu-only"][0], rows["hybrid"][0], rows["fixed-half"][0]
    print(f"offload tokens/s gpu-only {g0:.1f} (rounds of {rounds}), hybrid {h:.1f}, fixed-half "
          f"{f:.1f}: hybrid/gpu-only {h / g0:.2f}, hybrid/fixed-half {h / f:.2f}")


if __name__ == "__main__":
    main()
