"""Benchmark: eager vs torch.compile (Inductor, default mode) vs meshweave backend="triton".

    python benchmarks/codegen_bench.py                 # GPU: GPT-2 small + Llama ~1.1B, fp16
    python benchmarks/codegen_bench.py --tiny          # CPU smoke run (Triton interpreter)
    python benchmarks/codegen_bench.py --json out.json # also write the rows as JSON
    python benchmarks/codegen_bench.py --matmul autotune  # matmul tiles searched (slower compile)

Models: GPT-2 small (transformers GPT2Config defaults: 12 layers, hidden 768, 12 heads,
vocab 50257) and a Llama-style model of ~1.1B parameters built with the zoo's Llama builder
(22 layers, hidden 2048, 32 heads / 4 KV heads, SwiGLU 5632, vocab 32000, like TinyLlama).
Shapes: batch x seq 1x128 and 8x512. For every (model, shape) it reports the median forward
time over --iters runs (CUDA events on the GPU, perf_counter otherwise), the ratio to Inductor,
compile times (meshweave cold: compile() plus the first call, where Triton compiles the kernels
and matmul tiles are timed, with an empty kernel cache dir; cached: the same graph compiled
again with the cache warm and the generated module re-imported; Inductor's is its first call)
and the max abs error of the logits against eager. mw_ms is meshweave as compiled by default:
on a GPU that replays the kernels from a CUDA graph (CompileOptions(cuda_graphs=None) turns
graphs on for static-shape inference with every node in a kernel). On a GPU the script also
times, so that every comparison is mode for mode as well:
  mw_nographs_ms     the same kernels launched from Python every call (cuda_graphs=False),
                     against Inductor's default mode (inductor_ms);
  inductor_graphs_ms torch.compile(mode="reduce-overhead") (--inductor-graphs), Inductor's
                     CUDA-graph mode, against meshweave's default;
  mw_jit_launch_ms   no graphs, kernels launched through Triton's JIT dispatch
                     (MESHWEAVE_FAST_LAUNCH=0) instead of their compiled launchers;
  *_host_ms          the host's time to issue one call: near the call's time, the call is
                     bound by the host, not the GPU.
--profile prints each compiled model's top kernels by GPU time (meshweave without graphs).

No network access is needed: all weights are random. --tiny shrinks everything so the script
runs on a CPU under the Triton interpreter (TRITON_INTERPRET is set before triton loads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# A bare checkout (no `pip install`, e.g. a GPU box without network) imports meshweave from here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_env(tiny: bool) -> None:
    import importlib.util

    if "triton" in sys.modules:
        return
    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if tiny and not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"no tensor in output of type {type(out).__name__}")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median milliseconds per call."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _gpt2_builder(gpt2_cfg, tiny: bool):
    """(name, build) for GPT-2: transformers' GPT2LMHeadModel, or, where transformers is not
    installed (a bare GPU box), the zoo GPT at the same sizes: the same architecture (learned
    positions, pre-LayerNorm, tanh GELU, tied LM head), a few op-level details aside."""
    from meshweave.models.gpt import GPT, GPTConfig
    from meshweave.models.hf import build_hf_model

    name = "gpt2-tiny" if tiny else "gpt2-small"
    try:
        import transformers  # noqa: F401
    except ImportError:
        kw = gpt2_cfg.kwargs
        cfg = GPTConfig(
            vocab_size=gpt2_cfg.vocab_size,
            max_seq_len=kw.get("n_positions", 1024),
            hidden_size=kw.get("n_embd", 768),
            num_layers=kw.get("n_layer", 12),
            num_heads=kw.get("n_head", 12),
        )
        print(f"transformers is not installed: {name} is the zoo GPT at GPT2Config sizes")
        return f"{name}(zoo)", lambda: GPT(cfg)
    return name, lambda: build_hf_model(gpt2_cfg)


def build_models(tiny: bool, device: str, dtype, wanted: set | None = None):
    """(name, model, make_inputs(batch, seq)) for each benchmarked model in `wanted` (all if
    None), built one at a time so only one model is on the device at once."""
    import torch
    from meshweave.models.hf import HFModelConfig
    from meshweave.models.llama import Llama, LlamaConfig

    if tiny:
        gpt2_cfg = HFModelConfig(
            "gpt2",
            vocab_size=128,
            kwargs={"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64},
        )
        llama_cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden_size=176,
            max_seq_len=64,
        )
    else:
        gpt2_cfg = HFModelConfig("gpt2", vocab_size=50257)  # GPT2Config defaults otherwise
        llama_cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=22,
            num_heads=32,
            num_kv_heads=4,
            ffn_hidden_size=5632,
            max_seq_len=2048,
        )
    gpt2_name, gpt2_make = _gpt2_builder(gpt2_cfg, tiny)
    for name, make, vocab in (
        (gpt2_name, gpt2_make, gpt2_cfg.vocab_size),
        (
            "llama-1.1b" if not tiny else "llama-tiny",
            lambda: Llama(llama_cfg),
            llama_cfg.vocab_size,
        ),
    ):
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        torch.manual_seed(0)
        with torch.device(device):
            model = make()
        model = model.to(dtype).eval()

        def inputs(batch, seq, vocab=vocab):
            g = torch.Generator().manual_seed(1234)
            return (torch.randint(0, vocab, (batch, seq), generator=g).to(device),)

        params = sum(p.numel() for p in model.parameters())
        yield name, model, inputs, params


def bench_one(name, model, inputs, batch, seq, args, device) -> dict:
    import torch

    x = inputs(batch, seq)
    row = {"model": name, "batch": batch, "seq": seq}
    with torch.no_grad():
        ref = _first_tensor(model(*x))
        row["eager_ms"] = time_fn(lambda: model(*x), device, args.iters)

        if args.skip_inductor:
            row["inductor"] = "skipped"
        else:
            try:
                torch._dynamo.reset()
                compiled = torch.compile(model)
                t0 = time.perf_counter()
                got = _first_tensor(compiled(*x))
                _sync(device)
                row["inductor_compile_s"] = time.perf_counter() - t0
                row["inductor_ms"] = time_fn(lambda: compiled(*x), device, args.iters)
                row["inductor_max_err"] = (got.float() - ref.float()).abs().max().item()
                if device == "cuda":
                    row["inductor_host_ms"] = host_ms(lambda: compiled(*x), args.iters)
            except Exception as e:  # noqa: BLE001  reported in the table, not fatal
                row["inductor"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

        if device == "cuda" and args.inductor_graphs:  # Inductor's CUDA-graph mode
            try:
                torch._dynamo.reset()
                ro = torch.compile(model, mode="reduce-overhead")
                t0 = time.perf_counter()
                got = _first_tensor(ro(*x)).clone()
                _sync(device)
                row["inductor_graphs_compile_s"] = time.perf_counter() - t0
                row["inductor_graphs_ms"] = time_fn(lambda: ro(*x), device, args.iters)
                row["inductor_graphs_max_err"] = (got.float() - ref.float()).abs().max().item()
                del ro
            except Exception as e:  # noqa: BLE001  reported in the table, not fatal
                row["inductor_graphs"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        try:
            cm = _bench_meshweave(row, model, x, ref, args, device)
            if args.profile and device == "cuda":
                label = f"{name} {batch}x{seq}"
                if "inductor_ms" in row:
                    profile_kernels(lambda: compiled(*x), f"Inductor, {label}")
                profile_kernels(lambda: cm(*x), f"meshweave, {label}")
        except Exception as e:  # noqa: BLE001  reported in the table, not fatal
            import traceback

            traceback.print_exc()
            row["meshweave"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if "inductor_ms" in row and "mw_ms" in row:
        row["mw_vs_inductor"] = row["mw_ms"] / row["inductor_ms"]
    if "inductor_ms" in row and "mw_nographs_ms" in row:
        row["nographs_vs_inductor"] = row["mw_nographs_ms"] / row["inductor_ms"]
    if "inductor_graphs_ms" in row and "mw_ms" in row:
        row["mw_vs_inductor_graphs"] = row["mw_ms"] / row["inductor_graphs_ms"]
    if "inductor_compile_s" in row and "mw_cold_s" in row:
        row["cold_vs_inductor"] = row["mw_cold_s"] / row["inductor_compile_s"]
    return row


def _bench_meshweave(row: dict, model, x, ref, args, device):
    """Cold compile (empty cache), first call, timing, a cached compile; on the GPU also the
    same kernels without CUDA graphs and with Triton's JIT launches. Returns the compiled
    model without graphs (what the kernel profile reads) or the default one."""
    import torch
    from meshweave.codegen.triton.cuda_graphs import CudaGraphRunner

    import meshweave
    from meshweave import CompileOptions

    with torch.no_grad():
        cache_dir = tempfile.mkdtemp(prefix="mw_bench_cache_")
        os.environ["MESHWEAVE_CACHE_DIR"] = cache_dir
        opts = CompileOptions(backend="triton", verify=False)  # cuda_graphs: the default
        t0 = time.perf_counter()
        cm = meshweave.compile(model, x, options=opts)
        row["mw_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = _first_tensor(cm(*x))
        _sync(device)
        row["mw_first_call_s"] = time.perf_counter() - t0
        # Triton compiles, "auto" times matmul tiles and the CUDA graph is captured at the
        # first call: cold = compile() + the first call
        row["mw_cold_s"] = row["mw_compile_s"] + row["mw_first_call_s"]
        row["mw_cache"] = cm.artifacts["kernels"].cache_status
        row["mw_precompile"] = cm._runner.precompiled
        graphs = isinstance(cm._runner, CudaGraphRunner)
        row["mw_graphs"] = ("on" if graphs and not cm._runner.disabled else
                            f"capture failed: {cm._runner.disabled[:120]}" if graphs else "off")
        row["mw_kernels"] = len(cm.kernels)
        row["mw_fallback_nodes"] = len(cm.artifacts["kernels"].fallbacks)
        row["mw_max_err"] = (got.float() - ref.float()).abs().max().item()
        row["mw_ms"] = time_fn(lambda: cm(*x), device, args.iters)

        # Cached: same graph again; drop the imported module so it is re-imported from disk.
        _drop_generated_modules()
        t0 = time.perf_counter()
        cm2 = meshweave.compile(model, x, options=opts)
        cm2(*x)
        _sync(device)
        row["mw_cached_compile_s"] = time.perf_counter() - t0
        row["mw_cached_status"] = cm2.artifacts["kernels"].cache_status
        del cm2
        if device != "cuda":
            return cm
        plain = opts.replace(cuda_graphs=False)  # every launch from Python, every call
        cm_ng = meshweave.compile(model, x, options=plain)
        got = _first_tensor(cm_ng(*x))
        row["mw_nographs_max_err"] = (got.float() - ref.float()).abs().max().item()
        row["mw_nographs_ms"] = time_fn(lambda: cm_ng(*x), device, args.iters)
        row["mw_nographs_host_ms"] = host_ms(lambda: cm_ng(*x), args.iters)
        _drop_generated_modules()  # the same, launched through Triton's JIT dispatch
        os.environ["MESHWEAVE_FAST_LAUNCH"] = "0"
        try:
            cm_jit = meshweave.compile(model, x, options=plain)
            cm_jit(*x)
            row["mw_jit_launch_ms"] = time_fn(lambda: cm_jit(*x), device, args.iters)
        finally:
            del os.environ["MESHWEAVE_FAST_LAUNCH"]
            _drop_generated_modules()
        row["mw_ms_again"] = time_fn(lambda: cm(*x), device, args.iters)  # order effects?
    return cm_ng


def host_ms(fn, iters: int) -> float:
    """Median milliseconds the host takes to issue one call (no synchronization inside): next
    to the measured time per call it says whether a call is bound by the host or the GPU."""
    import torch

    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _drop_generated_modules() -> None:
    """Forget imported generated modules: the next compile imports its module afresh."""
    for mod in [m for m in sys.modules if m.startswith("meshweave_kernels_")]:
        del sys.modules[mod]


def profile_kernels(fn, label: str, calls: int = 5, top: int = 15) -> None:
    """Print the GPU kernels of `calls` calls of fn by GPU time (torch.profiler), and the sum of
    kernel time per call: set against the measured time per call it shows how much of that is
    the GPU working and how much is the host launching."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        events = list(prof.key_averages())
        attr = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
                else "self_cuda_time_total")
        events = [e for e in events if getattr(e, attr) > 0]
        total = sum(getattr(e, attr) for e in events) / calls / 1e3
        print(f"-- {label}: {total:.3f} ms of GPU kernel time per call, top {top} kernels:")
        for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
            print(f"   {getattr(e, attr) / calls / 1e3:8.3f} ms  x{e.count // calls:<3} "
                  f"{e.key[:100]}")
    except Exception as e:  # noqa: BLE001  a profile is an extra, never fatal
        print(f"-- {label}: profile failed: {type(e).__name__}: {e}")


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = [
        ("model", "{}"),
        ("batch", "{}"),
        ("seq", "{}"),
        ("eager_ms", "{:.3f}"),
        ("inductor_ms", "{:.3f}"),
        ("mw_ms", "{:.3f}"),
        ("mw_vs_inductor", "{:.2f}x"),
        ("mw_nographs_ms", "{:.3f}"),
        ("nographs_vs_inductor", "{:.2f}x"),
        ("inductor_graphs_ms", "{:.3f}"),
        ("mw_vs_inductor_graphs", "{:.2f}x"),
        ("mw_jit_launch_ms", "{:.3f}"),
        ("mw_nographs_host_ms", "{:.3f}"),
        ("inductor_host_ms", "{:.3f}"),
        ("inductor_compile_s", "{:.1f}"),
        ("mw_compile_s", "{:.1f}"),
        ("mw_first_call_s", "{:.1f}"),
        ("mw_cold_s", "{:.1f}"),
        ("cold_vs_inductor", "{:.2f}x"),
        ("mw_cached_compile_s", "{:.1f}"),
        ("mw_kernels", "{}"),
        ("mw_max_err", "{:.2e}"),
        ("inductor_max_err", "{:.2e}"),
    ]
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        cells = []
        for c, fmt in cols:
            v = r.get(c)
            cells.append(fmt.format(v) if v is not None else "-")
        print(" | ".join(cells))
        for k in ("inductor", "inductor_graphs", "meshweave", "mw_graphs", "mw_precompile",
                  "mw_cache",
                  "mw_cached_status"):
            if k in r and isinstance(r[k], str) and r[k] not in ("miss", "hit"):
                print(f"    {k}: {r[k]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models/shapes (runs on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--skip-inductor", action="store_true", help="do not run torch.compile")
    p.add_argument("--models", default="all", help="comma list: gpt2,llama (default all)")
    p.add_argument("--shapes", default=None, help="comma list of BxS, e.g. 1x128,8x512")
    p.add_argument("--inductor-graphs", action="store_true",
                   help="GPU: also time torch.compile(mode='reduce-overhead') (CUDA graphs)")
    p.add_argument("--profile", action="store_true",
                   help="GPU: print each compiled model's top kernels by GPU time")
    p.add_argument("--json", default=None, help="write the result rows to this file")
    p.add_argument("--matmul", default=None, choices=["auto", "autotune", "triton", "torch"],
                   help="meshweave's matmul policy (sets MESHWEAVE_MATMUL; default auto)")
    args = p.parse_args(argv)
    if args.matmul:
        os.environ["MESHWEAVE_MATMUL"] = args.matmul
    _setup_env(args.tiny)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        p.error("the full benchmark needs a GPU; use --tiny on a CPU")
    dtype = torch.float16 if device == "cuda" else torch.float32
    args.iters = args.iters or (20 if device == "cuda" else 3)
    shapes = [(1, 8), (2, 16)] if args.tiny else [(1, 128), (8, 512)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    wanted = None if args.models == "all" else set(args.models.split(","))
    rows = []
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    for name, model, inputs, params in build_models(args.tiny, device, dtype, wanted):
        for batch, seq in shapes:
            row = bench_one(name, model, inputs, batch, seq, args, device)
            row["params"] = params
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    header = (
        f"\ncodegen_bench on {gpu}, torch {torch.__version__}, dtype {dtype}, "
        f"median of {args.iters} iterations (ms); compile times in s"
    )
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
