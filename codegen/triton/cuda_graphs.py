"""CompileOptions(cuda_graphs=True): replay the generated module's launches from a CUDA graph.

At batch 1 a forward is bound by the host (Python allocating buffers and launching ~100
kernels); a CUDA graph replays all of them in one call, as torch.compile's "reduce-overhead"
mode does. One graph per input signature (shapes, dtypes, strides and scalar values):

  1. warm-up calls on a side stream, with copies of the inputs as static buffers: Triton
     compiles every kernel and the matmul chooser times its candidates (which synchronizes,
     so it must not happen while capturing);
  2. capture one call into a torch.cuda.CUDAGraph (its buffers come from the graph's pool);
  3. every later call copies its inputs into the static buffers, replays, and returns clones
     of the static outputs, so results are never overwritten by the next call (eager's
     semantics, unlike reduce-overhead's).

A module that cannot be captured (a node run by the reference executor that synchronizes,
say) runs without graphs from then on, with a warning that says why. At most MAX_GRAPHS
signatures are captured; calls with further signatures run without a graph (one warning).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def _signature(leaves: list[Any]) -> tuple:
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append((tuple(x.shape), x.dtype, tuple(x.stride()), x.device))
        else:
            sig.append(("value", x))
    return tuple(sig)


# Graphs one compiled model may hold: each keeps its own copies of the inputs and its memory
# pool, so inputs whose scalar values or strides keep changing must not capture without end.
MAX_GRAPHS = 8


class CudaGraphRunner:
    """Wraps a runner (leaves -> outputs) with capture-once, replay-after per signature."""

    def __init__(self, runner, warmup: int = 2, max_graphs: int = MAX_GRAPHS):
        self.runner = runner
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.disabled: str | None = None  # why graphs are off, once a capture failed
        self.uncaptured = 0  # calls run without a graph because max_graphs were held

    def __getattr__(self, name: str) -> Any:  # the wrapped runner's attributes (precompiled, rt)
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def __call__(self, leaves: list[Any]) -> list[Any]:
        if self.disabled is not None:
            return self.runner(leaves)
        key = _signature(leaves)
        entry = self.graphs.get(key)
        if entry is None and len(self.graphs) >= self.max_graphs:
            if not self.uncaptured:
                warnings.warn(
                    f"meshweave: {len(self.graphs)} CUDA graphs are held for this model (one per "
                    f"input signature: shapes, dtypes, strides and scalar values); calls with a "
                    f"new signature run without a graph", RuntimeWarning, stacklevel=2)
            self.uncaptured += 1
            return self.runner(leaves)
        if entry is None:
            try:
                entry = self._capture(leaves)
            except Exception as e:  # noqa: BLE001  reported, then the plain path runs
                self.disabled = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"meshweave: CUDA graph capture failed ({self.disabled}); this model runs "
                    f"without CUDA graphs", RuntimeWarning, stacklevel=2)
                torch.cuda.synchronize()
                return self.runner(leaves)
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in static_out]

    def _capture(self, leaves: list[Any]) -> tuple:
        static_in = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.runner(static_in)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.runner(static_in)
        return graph, static_in, static_out
