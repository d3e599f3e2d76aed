"""Memory of a training step, measured from the tensors the runtime holds, and estimated.

    with LiveBytes(exclude=params_and_inputs) as meter:   # run_graph feeds the active meter
        ...run a step...
    meter.peak                      # most bytes of activations alive at once
    saved = SavedBytes(exclude=...) # saved_tensors_hooks: bytes kept between forward and backward
    estimate_peak(forward, backward, saved_bytes)   # the same liveness, on the IR's types
    estimate_call_peak(graph)       # one inference call's peak, on the IR's types

Bytes are counted per storage, so views of one tensor count once; the storages of parameters,
buffers and the call's inputs are excluded (they are alive whatever the step saves).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..ir.graph import Graph
from ..ir.registry import lookup
from ..ir.types import TensorType

_ACTIVE: list[LiveBytes] = []


def active_meter() -> LiveBytes | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _key(t: torch.Tensor) -> tuple[int, int] | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class LiveBytes(contextlib.AbstractContextManager):
    """Live activation bytes over time: each storage counted once while any holder keeps it."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.holders: dict[int, list] = {}  # data_ptr -> [holders, nbytes]
        self.current = 0
        self.peak = 0

    def add(self, t: Any) -> None:
        k = _key(t)
        if k is None or k[0] in self.exclude or k[1] == 0:
            return
        entry = self.holders.get(k[0])
        if entry is None:
            self.holders[k[0]] = [1, k[1]]
            self.current += k[1]
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1

    def drop(self, t: Any, *, all_holders: bool = False) -> None:
        k = _key(t)
        entry = self.holders.get(k[0]) if k else None
        if entry is None:
            return
        entry[0] = 0 if all_holders else entry[0] - 1
        if entry[0] <= 0:
            self.current -= entry[1]
            del self.holders[k[0]]

    def __enter__(self) -> LiveBytes:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)


class SavedBytes(contextlib.AbstractContextManager):
    """The bytes autograd keeps for backward during the block (saved_tensors_hooks)."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        k = _key(t)
        if k is not None and k[0] not in self.exclude:
            self.storages[k[0]] = k[1]
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def storage_ptrs(tensors) -> set[int]:
    return {k[0] for k in map(_key, tensors) if k is not None}


def _nbytes(v) -> int:
    return v.type.nbytes() if isinstance(v.type, TensorType) else 0


def _produces(n) -> int:
    """Bytes a node allocates: none for a view (it shares its input's storage)."""
    info = lookup(n.op)
    if info is not None and info.category == "view":
        return 0
    return sum(_nbytes(o) for o in n.outputs)


def _simulate(graph: Graph, live_inputs: list, start: int) -> tuple[int, int]:
    """(peak, end) live bytes running `graph` as the reference executor frees values: a view
    shares its base's storage, which is freed when the last of them dies."""
    keep = set(graph.outputs) | set(graph.inputs)
    last: dict[Any, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last[v] = i
    root: dict[Any, Any] = {}
    aliases: dict[Any, int] = {}
    cur = start
    for v in live_inputs:
        root[v], aliases[v] = v, 1
        cur += _nbytes(v)
    peak = cur
    for i, n in enumerate(graph.nodes):
        own = _produces(n) > 0 or not n.inputs
        for o in n.outputs:
            r = o if own else root.get(n.inputs[0])
            if r is None:  # a view of a parameter or saved input: no new storage
                continue
            root[o] = r
            aliases[r] = aliases.get(r, 0) + 1
            if r is o:
                cur += _nbytes(o)
        peak = max(peak, cur)
        for v in set(n.inputs):
            if last.get(v) == i and v not in keep and v in root:
                r = root[v]
                aliases[r] -= 1
                if aliases[r] == 0:
                    cur -= _nbytes(r)
    return peak, cur


def estimate_saved(forward: Graph, num_saved: int) -> int:
    """Bytes of the storages the forward's last `num_saved` outputs (the values saved for
    backward) hold, from the IR's types: each storage once, views of parameters and inputs
    (which are alive anyway) not counted, as SavedBytes measures."""
    root: dict[Any, Any] = {}
    for n in forward.nodes:
        own = _produces(n) > 0 or not n.inputs
        for o in n.outputs:
            r = o if own else root.get(n.inputs[0])
            if r is not None:
                root[o] = r
    saved = forward.outputs[len(forward.outputs) - num_saved:] if num_saved else []
    return sum(_nbytes(r) for r in {root[v] for v in saved if v in root})


def estimate_call_peak(graph: Graph) -> int:
    """One inference call's peak live activation bytes from the IR's types (parameters, buffers
    and the call's inputs excluded), as the reference executor frees values: what a graph
    traced on the meta device will need at run time beyond its weights and inputs."""
    return _simulate(graph, [], 0)[0]


def estimate_peak(forward: Graph, backward: Graph, num_saved: int) -> int:
    """The step's peak live bytes from the IR's types: the forward (its outputs, saved values
    included, stay alive), then the backward on the saved values and one gradient per output."""
    fw_peak, fw_end = _simulate(forward, [], 0)
    tangents = backward.inputs[num_saved:]
    bw_peak, _ = _simulate(backward, tangents, fw_end)
    return max(fw_peak, bw_peak)


def measure_step(step, state: list[torch.Tensor], inputs: list[Any]) -> dict[str, Any]:
    """Run `step()` (a forward, then backward with one gradient of ones per float output) and
    measure it: the bytes saved for backward and the peak live bytes (the reference executor
    feeds the meter; on CUDA, torch.cuda.max_memory_allocated above the step's start). The
    gradients of `state` are restored afterwards, so measuring does not train."""
    exclude = storage_ptrs(state) | storage_ptrs(t for t in inputs if isinstance(t, torch.Tensor))
    grads = [p.grad for p in state]
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in state)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        with LiveBytes(exclude) as meter, SavedBytes(exclude) as saved:
            outs = [o for o in step() if isinstance(o, torch.Tensor) and o.requires_grad]
        kept = saved.nbytes
        with meter:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        del outs
        result = {"saved_bytes": kept, "peak_bytes": meter.peak if meter.peak else None,
                  "peak_source": "reference executor (live storages)"}
        if cuda:
            torch.cuda.synchronize()
            result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            result["peak_source"] = "torch.cuda.max_memory_allocated"
        elif not meter.peak:
            result["peak_source"] = "not measured (the generated module allocates itself)"
        return result
    finally:
        for p, g in zip(state, grads):
            p.grad = g
