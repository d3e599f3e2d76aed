"""Compile a generated module's Triton kernels in parallel before its first real call.

Triton compiles a kernel the first time it is launched, so a cold first call compiles the
module's dozen-plus kernels (and the matmul candidates "auto" will time) one after another.
Triton 3.6 has `triton.AsyncCompileMode`: inside it, `kernel.warmup(...)` hands the compile to
an executor and returns at once. `precompile` runs the module's call() once with every kernel
launch turned into such a warmup (nothing is launched; the buffers it allocates are never read)
and the matmul chooser warming every candidate instead of timing them, then waits for all
compiles. The real first call then finds every kernel compiled.

Only on the GPU (the interpreter compiles nothing), and only for modules with no node on the
reference executor: such a node would run on the never-written buffers, and an index op on
garbage indices can fault the device. Any failure leaves the lazy path in place and says why.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class _Warmup:
    """Stands in for a @triton.jit kernel: kernel[grid](...) compiles without launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)


def precompile(runner, leaves: list[Any], has_fallbacks: bool) -> str:
    """Compile every kernel runner's first call launches, in parallel; return what happened."""
    if runner.rt.interpret:
        return "skipped: the interpreter compiles nothing"
    if has_fallbacks:
        return "skipped: nodes on the reference executor would read unwritten buffers"
    import triton
    from triton.runtime.jit import JITFunction

    from .fast_launch import FastLaunch

    if not hasattr(triton, "AsyncCompileMode"):
        return f"skipped: triton {triton.__version__} has no AsyncCompileMode"
    module = sys.modules[runner.call.__module__]
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, (JITFunction, FastLaunch))}
    workers = max(1, min(len(kernels) * 2, os.cpu_count() or 1, 32))
    try:
        for name, k in kernels.items():
            setattr(module, name, _Warmup(k))
        runner.rt.warming = True
        with ThreadPoolExecutor(max_workers=workers) as pool, triton.AsyncCompileMode(pool):
            runner(leaves)
    except Exception as e:  # noqa: BLE001  the lazy path still works; say why it was not used
        return f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    finally:
        runner.rt.warming = False
        for name, k in kernels.items():
            setattr(module, name, k)
    return f"compiled {len(kernels)} kernels and their variants on {workers} threads"
