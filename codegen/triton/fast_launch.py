"""Launch compiled Triton kernels without JITFunction.run's per-call dispatch.

`kernel[grid](*args)` on a @triton.jit function binds the arguments, computes their
specialization, hashes a cache key, reads a handful of environment-backed knobs, asks the
driver for the device and stream and builds launch metadata: tens of microseconds per launch,
which at batch 1 costs more than the kernels run (GPT-2 small makes ~90 launches a forward).
Inductor avoids the same cost by calling the compiled binary's launcher directly.

`FastLaunch` wraps a JITFunction with the same `kernel[grid](*args, **constexprs)` interface.
The first launch for an argument specialization goes through Triton (which compiles, caches
and launches); FastLaunch then keeps that CompiledKernel's launcher under a key at least as fine as Triton's
specialization of the positional arguments (Triton: dtype and 16-byte alignment of tensors,
int width, == 1 and divisibility by 16 of ints; FastLaunch.key: tensors by dtype and
alignment, ints by value, the rest through Triton's `native_specialize_impl`), plus the
keyword arguments (constexprs, num_warps, ...). A later launch with the same key calls the
launcher with the stream the generated call() read once (`begin_call`). Launch hooks (set by
Triton-level profilers such as proton) are not called on the fast path; set
MESHWEAVE_FAST_LAUNCH=0 to use Triton's path for every launch.
"""

from __future__ import annotations

import inspect
import threading

import torch

_Tensor = torch.Tensor
MAX_ENTRIES = 4096  # launchers kept per kernel (a key per argument specialization)
_tls = threading.local()  # .stream: the raw CUDA stream of the call in progress on this thread


def set_stream(stream: int | None) -> None:
    """Called once per generated call(): the stream every fast launch of the call uses."""
    _tls.stream = stream


def current_raw_stream() -> int:
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())


class FastLaunch:
    """A @triton.jit kernel, launched through its compiled launcher once specialized."""

    def __init__(self, fn):
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        self.fn = fn
        self.__name__ = getattr(fn, "__name__", repr(fn))
        self._spec = native_specialize_impl
        self._backend = BaseBackend
        self._params = list(inspect.signature(fn.fn).parameters.values())
        self._entries: dict[tuple, tuple] = {}
        self.hits = 0  # fast launches, for tests and benchmarks
        self.misses = 0  # launches that went through Triton

    def __repr__(self) -> str:
        return f"FastLaunch({self.__name__})"

    def warmup(self, *args, grid, **kwargs):  # precompile.py compiles through this
        return self.fn.warmup(*args, grid=grid, **kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """At least as fine as Triton's specialization of `args` (tests check that): plain
        tensors by (dtype, 16-byte aligned), ints by their value (finer than Triton's width,
        == 1 and divisible by 16; a static-shape module passes the same ints every call),
        anything else by Triton's own native_specialize_impl. About half the cost of calling
        native_specialize_impl on every argument."""
        spec, be, tensor = self._spec, self._backend, _Tensor
        return (*[(a.dtype, not a.data_ptr() & 15) if type(a) is tensor else
                  a if type(a) is int else spec(be, a, False, True, True) for a in args],
                *kwargs.items())

    def launch(self, grid, args: tuple, kwargs: dict) -> None:
        stream = getattr(_tls, "stream", None)
        key = self.key(args, kwargs)
        entry = self._entries.get(key)
        if entry is None or stream is None:
            self.misses += 1
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            if stream is not None and kernel is not None and not hasattr(kernel, "result"):
                if len(self._entries) >= MAX_ENTRIES:  # ints of ever-new dynamic sizes
                    self._entries.clear()
                self._entries[key] = (*launcher(kernel), self._tail(len(args), kwargs))
            return
        self.hits += 1
        run, function, pre, tail = entry
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, *pre,
            *args, *tail)

    def _tail(self, npos: int, kwargs: dict) -> tuple:
        """The values of the parameters after the positional ones, in signature order, as
        JITFunction.run passes them (keyword arguments, else defaults)."""
        tail = []
        for p in self._params[npos:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.default is not inspect.Parameter.empty:
                tail.append(p.default)
            else:
                raise TypeError(f"{self.__name__}: no value for parameter {p.name!r}")
        return tuple(tail)


def launcher(kernel) -> tuple:
    """(callable, function handle, the arguments between the stream/function and the kernel's
    own) for a compiled kernel. CUDA launchers without scratch memory are called at their C
    entry point (`launch`), skipping the Python wrapper that would only pass None scratch
    buffers; any other launcher through its own __call__, as JITFunction.run calls it."""
    run = kernel.run  # first: loads the binary, which sets kernel.function
    function, packed = kernel.function, kernel.packed_metadata
    entry = getattr(run, "launch", None)
    if (callable(entry) and getattr(run, "global_scratch_size", None) == 0
            and getattr(run, "profile_scratch_size", None) == 0):
        return entry, function, (run.launch_cooperative_grid, run.launch_pdl, None, None,
                                 packed, None, None, None)
    return run, function, (packed, None, None, None)


def install(module) -> int:
    """Wrap every @triton.jit kernel among a generated module's globals (once per module);
    return how many are wrapped."""
    from triton.runtime.jit import JITFunction

    n = 0
    for name, value in list(vars(module).items()):
        if isinstance(value, JITFunction):
            setattr(module, name, FastLaunch(value))
        if isinstance(getattr(module, name), FastLaunch):
            n += 1
    return n
