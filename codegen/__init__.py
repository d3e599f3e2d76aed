"""Codegen: the optimized IR to code, one folder per target.

    attach_triton_backend(cm)      # called by meshweave.compile for backend="triton"
    triton_runner(options)(graph)  # one graph of a training step (a model's, or a rank's)

  triton/   the default backend: fusion schedule, lowering rule tables, the kernel templates
            (triton/kernels/: pointwise, reduction, matmul, flash attention), the generated
            wrapper module, its on-disk cache, launchers and CUDA-graph replay
  onnx/     ONNX export: one file, or per-rank segments cut at collectives, with a manifest
  mlir/     MLIR text of the IR through torch-mlir's FX importer
  folding.py  what the IR rewrites ahead of a target share (dead-code removal, a record of
              each traced value that needs no kernel any more)

This file holds what meshweave.compile sees of the Triton backend: CodegenConfig, the kernels
artifact, and attach_triton_backend, which runs the pre-passes, generates or loads the module
and installs its call(). A target's folder imports ir/, runtime/reference.py, passes/ and
codegen/folding.py; no target imports another (ONNX export reads the per-rank programs of
passes/parallel/lower/, never Triton's).

Without CUDA the kernels run under Triton's interpreter, which must be on before triton is
first imported; torch.export imports it, so meshweave.compile calls
prepare_triton_backend(options, model) before tracing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from meshweave import env

from ..ir.errors import MeshweaveError
from ..ir.types import TensorType
from .triton.tvalues import CodegenError

__all__ = [
    "CodegenConfig",
    "CodegenError",
    "KernelExecutionError",
    "KernelInfo",
    "KernelsArtifact",
    "attach_triton_backend",
]


MATMUL_POLICIES = ("auto", "autotune", "triton", "torch")


@dataclasses.dataclass(frozen=True)
class CodegenConfig:
    """Knobs of the Triton backend (explicit, immutable; tests pass their own).

    matmul: "auto" (on the GPU, time cuBLAS + the epilogue kernel against the template at one
        tile chosen by shape, per shape, once: one template compile per matmul kernel, which
        keeps cold compiles short, like Inductor's default mode; the template under the
        interpreter), "autotune" (the same against four more tiles: slower to compile, like
        max-autotune), "triton" (always the template) or "torch" (always cuBLAS + epilogue).
        Attention follows the same policy: the flash-attention kernel or torch SDPA, timed
        once per shape on the GPU under "auto". Default: $MESHWEAVE_MATMUL, else "auto".
    fuse: fuse across ops; False emits one kernel per op (for debugging and comparisons).
    cache_dir: kernel cache root; default <MESHWEAVE_CACHE_DIR or ~/.cache/meshweave>/kernels.
    use_cache: read and write the on-disk cache.
    """

    matmul: str = dataclasses.field(default_factory=env.matmul_policy)
    fuse: bool = True
    cache_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self):
        if self.matmul not in MATMUL_POLICIES:
            raise ValueError(
                f"CodegenConfig.matmul={self.matmul!r}: expected one of {MATMUL_POLICIES} "
                f"(also settable as $MESHWEAVE_MATMUL)"
            )


class KernelExecutionError(MeshweaveError):
    """A generated module raised; names the module file to read."""


@dataclasses.dataclass
class KernelInfo:
    """One kernel launch site of a compiled model."""

    name: str  # the Triton kernel function it launches
    kind: str  # pointwise | reduction | matmul | attention | attention_train | quant | moe
    nodes: list[str]  # covered IR nodes, by output value name
    ops: list[str]
    sources: list[str]  # the user source lines of those nodes
    source: str  # the kernel's source text


class KernelsArtifact:
    """cm.artifacts["kernels"]: what explain() and dump() show about generated code."""

    def __init__(
        self,
        kernels: list[KernelInfo],
        fallbacks: list[dict],
        module_path: str,
        module_source: str,
        cache_status: str,
        key: str,
        folded: dict[str, str] | None = None,
    ):
        self.folded = dict(folded or {})  # traced nodes a codegen pre-pass removed -> why
        self.kernels = kernels
        self.fallbacks = fallbacks
        self.module_path = module_path
        self.module_source = module_source
        self.cache_status = cache_status
        self.key = key

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for k in self.kernels:
            kinds[k.kind] = kinds.get(k.kind, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        text = (
            f"{len(self.kernels)} Triton launch sites ({parts}), "
            f"{len(self.fallbacks)} nodes on the reference executor; cache {self.cache_status}"
            f"; module {self.module_path}"
        )
        for f in self.fallbacks:
            text += f"\n    not compiled: %{f['node']} ({f['op']}): {f['reason']}"
        if self.folded:
            text += f"\n    {len(self.folded)} traced nodes need no kernel: " + "; ".join(
                sorted({f"{why}: " + ", ".join(f"%{n}" for n, w in self.folded.items()
                                                if w == why) for why in self.folded.values()}))
        return text

    def dump(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        src = os.path.join(directory, "kernels.py")
        with open(src, "w") as f:
            f.write(self.module_source)
        listing = os.path.join(directory, "kernels.txt")
        with open(listing, "w") as f:
            f.write(f"cache key {self.key} ({self.cache_status})\n\n")
            for i, k in enumerate(self.kernels):
                f.write(
                    f"[{i}] {k.name} ({k.kind}): "
                    + ", ".join(f"%{n} ({op})" for n, op in zip(k.nodes, k.ops))
                    + "\n"
                )
                f.writelines(f"      {s}\n" for s in k.sources)
            f.write(
                f"\nnot compiled ({len(self.fallbacks)} nodes, run by the reference executor):\n"
            )
            f.writelines(f"  %{fb['node']} ({fb['op']}): {fb['reason']}\n" for fb in self.fallbacks)
            if self.folded:
                f.write(f"\nno kernel needed ({len(self.folded)} nodes):\n")
                f.writelines(f"  %{n}: {why}\n" for n, why in self.folded.items())
        return [src, listing]


class _Runner:
    def __init__(self, call, state: list, rt, path: str, has_fallbacks: bool = True):
        self.call, self.state, self.rt, self.path = call, state, rt, path
        self.has_fallbacks = has_fallbacks
        self.precompiled: str | None = None  # what precompile.py did before the first call
        # Kernels index parameters and buffers as contiguous; the rare strided one is copied
        # per call (not once, so that buffer mutations written back by CompiledModel count).
        self.strided = [
            i for i, t in enumerate(state) if hasattr(t, "is_contiguous") and not t.is_contiguous()
        ]

    def __call__(self, leaves: list[Any]) -> list[Any]:
        if self.precompiled is None:
            from .triton.precompile import precompile

            self.precompiled = "running"
            self.precompiled = precompile(self, leaves, self.has_fallbacks)
        state = self.state
        if self.strided:
            state = list(state)
            for i in self.strided:
                state[i] = state[i].contiguous()
        try:
            self.rt.begin_call()
            return self.call(list(leaves), state, self.rt)
        except MeshweaveError:
            raise
        except Exception as e:  # re-raised with the generated module to read, never swallowed
            raise KernelExecutionError(
                f"generated module {self.path} raised {type(e).__name__}: {e}"
            ) from e


def _on_cuda(graph) -> bool:
    return any(isinstance(v.type, TensorType) and v.type.device == "cuda" for v in graph.inputs)


def _options_key(cm, config: CodegenConfig, interpret: bool) -> dict:
    o = cm.options
    return {
        "eager_fallback": o.eager_fallback,
        "decompose": o.decompose,
        "passes": o.passes,
        "training": o.training,
        "matmul": config.matmul,
        "fuse": config.fuse,
        "interpret": interpret,
    }


def prepare_triton_backend(options=None, model=None) -> None:
    """Hook for meshweave.compile to call *before* tracing, because torch.export imports
    triton: when backend="triton" will run kernels under the interpreter (no CUDA, or a model
    on the CPU), switch the interpreter on while that is still possible. No-op otherwise."""
    import torch

    from .triton.mode import imported_interpreted

    if getattr(options, "backend", "triton") != "triton" or imported_interpreted() is not None:
        return
    on_cuda = torch.cuda.is_available()
    if on_cuda and model is not None:
        on_cuda = any(t.is_cuda for t in list(model.parameters()) + list(model.buffers()))
    if not on_cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # documented in meshweave/env.py


def attach_triton_backend(cm, config: CodegenConfig | None = None) -> None:
    """Generate (or load from the cache) the Triton module for cm.graph and make cm run it."""
    from .triton.causal_mask import fold_causal_masks
    from .triton.gqa import fold_gqa_repeats
    from .triton.mode import device_name, ensure_triton_mode

    config = config or CodegenConfig()
    # the kernels' graph: the traced one with K/V repeats and constant causal masks folded
    graph = fold_causal_masks(fold_gqa_repeats(cm.graph))
    interpret = ensure_triton_mode(_on_cuda(graph))
    from .triton.cache import STATS, CorruptEntry, KernelCache, cache_key
    from .triton.wrapper import generate_module

    root = config.cache_dir or os.path.join(env.cache_dir(), "kernels")
    device = device_name(interpret)
    key = cache_key(graph, _options_key(cm, config, interpret), device)
    cache = KernelCache(root)
    entry, status = None, "miss"
    if config.use_cache:
        try:
            entry = cache.load(key)
        except CorruptEntry as e:
            status = f"rebuilt ({e})"
    if entry is None:
        gen = generate_module(graph, interpret, config.fuse, key)
        meta = {
            "graph": graph.name,
            "device": device,
            "kernels": [dataclasses.asdict(r) for r in gen.kernels],
            "fallbacks": gen.fallbacks,
        }
        if not config.use_cache:
            root = os.path.join(root, "_uncached")
        path = KernelCache(root).store(key, gen.source, meta)
        entry = KernelCache(root).load(key)
        STATS["rebuilt" if status.startswith("rebuilt") else "miss"] += 1
        entry.status = status
        entry.path = path
    else:
        STATS["hit"] += 1
    _install(cm, graph, entry, interpret, config, root, key)


def _install(cm, graph, entry, interpret: bool, config: CodegenConfig, root: str, key: str) -> None:
    from .triton import fast_launch
    from .triton.runtime import KernelRuntime

    nodes = graph.nodes
    kernels = []
    for r in entry.meta["kernels"]:
        covered = [nodes[i] for i in r["nodes"]]
        srcs = list(dict.fromkeys(n.source for n in covered if n.source))
        kernels.append(
            KernelInfo(
                r["name"],
                r["kind"],
                [n.outputs[0].name for n in covered],
                [n.op for n in covered],
                srcs,
                r["text"],
            )
        )
    fallbacks = [
        {
            "node": nodes[f["node"]].outputs[0].name,
            "op": nodes[f["node"]].op,
            "reason": f["reason"],
            "source": nodes[f["node"]].source,
        }
        for f in entry.meta["fallbacks"]
    ]
    choices = os.path.join(root, f"matmul_choices_{entry.meta['device'].replace(' ', '_')}.json")
    rt = KernelRuntime(graph, interpret, config.matmul, None if interpret else choices)
    if not interpret and env.fast_launch():
        fast_launch.install(entry.module)
    state = [graph.tensors[v.name] for v in graph.state_inputs]
    cm._runner = _Runner(entry.module.call, state, rt, entry.path, bool(fallbacks))
    cm.kernels = kernels
    with open(entry.path) as f:
        module_source = f.read()
    cm.artifacts["kernels"] = KernelsArtifact(
        kernels, fallbacks, entry.path, module_source, entry.status, key,
        graph.meta.get("folded"),
    )


def triton_runner(options):
    """The Triton backend for one graph of a training step (forward or backward; under
    mesh=, each rank's: its collectives run through torch inside the generated module)."""
    from types import SimpleNamespace

    def make(graph):
        holder = SimpleNamespace(graph=graph, options=options, artifacts={}, kernels=[],
                                 _runner=None)
        attach_triton_backend(holder)
        graph.meta["kernels"] = holder.artifacts["kernels"]
        return holder._runner

    return make
