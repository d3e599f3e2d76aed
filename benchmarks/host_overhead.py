"""Host (CPU) time of one forward: meshweave's generated call() vs eager PyTorch.

    python benchmarks/host_overhead.py [--layers 12] [--iters 200]

At batch 1 a GPT-2 forward on a GPU is bound by the host: the time Python spends allocating
buffers, computing launch grids and launching kernels. This measures that part on any machine,
with GPT-2 small's structure (12 layers, 12 heads, the zoo GPT) at a width so small that no
arithmetic is left to time (hidden 96, vocab 512, 1x8 tokens):
  * meshweave compiles it for the Triton backend, then every Triton launch in the generated
    module is replaced by a no-op, so what is timed is the wrapper itself (allocations, views,
    launch grids, the matmul dispatch);
  * the competitor is eager PyTorch on the CPU running the same model: its module calls, op
    dispatch and (tiny) CPU kernels, i.e. eager's host cost per forward.
A third figure puts codegen/triton/fast_launch.py back in front of each kernel (specialization key,
entry lookup, the launcher call) with a launcher that does nothing: the host cost of the GPU
path short of the driver's cuLaunchKernel. The GPU benchmark (codegen_bench.py) measures the
whole forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # compile only; no kernel runs here
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _NoLaunch:
    """Stands in for a compiled Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoOpKernel:
    """What a compiled kernel offers FastLaunch, with a launcher that launches nothing."""

    function, packed_metadata = 0, None

    @staticmethod
    def run(*args):
        return None


class _NoOpJit:
    """A kernel whose "compile" returns _NoOpKernel: FastLaunch's hot path (specialization
    key, entry lookup, argument tuple, launcher call) runs for real, the GPU part is a no-op."""

    def __init__(self, fn):
        self.fn = fn.fn  # FastLaunch reads the kernel's signature from here

    def run(self, *args, grid, warmup, **kwargs):
        return _NoOpKernel()


def _median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)

    import torch
    from meshweave.models.gpt import GPT, GPTConfig

    import meshweave

    cfg = GPTConfig(vocab_size=512, max_seq_len=64, hidden_size=96,
                    num_layers=args.layers, num_heads=12)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        backend="triton", verify=False))
    from meshweave.codegen.triton.fast_launch import FastLaunch, set_stream

    module = sys.modules[cm._runner.call.__module__]
    stubbed = {k: v for k, v in vars(module).items() if k.startswith("triton_") and hasattr(v, "run")}
    with torch.no_grad():
        for k in stubbed:
            setattr(module, k, _NoLaunch())
        mw = _median_ms(lambda: cm._runner([x]), args.iters)
        mw_api = _median_ms(lambda: cm(x), args.iters)
        for k, v in stubbed.items():  # the GPU path: FastLaunch in front of a no-op launcher
            setattr(module, k, FastLaunch(_NoOpJit(v)))
        set_stream(0)  # what begin_call() sets on a GPU
        mw_fast = _median_ms(lambda: cm._runner([x]), args.iters)
        eager = _median_ms(lambda: model(x), args.iters)
    print(f"GPT-2 small structure ({args.layers} layers, 12 heads), hidden 96, 1x8 tokens: "
          f"{len(cm.kernels)} launch sites ({len(stubbed)} distinct kernels), "
          f"torch {torch.__version__}; median of {args.iters}")
    print(f"  meshweave generated call(), launches stubbed:    {mw:.3f} ms")
    print(f"  meshweave CompiledModel.__call__ (input checks): {mw_api:.3f} ms")
    print(f"  generated call() with FastLaunch, no-op launcher: {mw_fast:.3f} ms")
    print(f"  eager PyTorch on the CPU (tiny kernels):         {eager:.3f} ms")
    print(f"  ratio meshweave call() / eager: {mw / eager:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
