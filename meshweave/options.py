"""CompileOptions: every knob of meshweave.compile, typed, frozen and documented."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options for meshweave.compile.

    eager_fallback: ops with no registry entry run through torch eager (listed by explain());
        when False they raise UnsupportedOpError naming the op and the user's source line.
    backend: "eager" (reference executor), "triton" (generated kernels), or None to pick
        triton on CUDA and eager on CPU.
    strict: passed to torch.export (non-strict by default, as torch.export recommends).
    decompose: lower the trace to meshweave's core op set before conversion.
    passes: pass names to run, in order; None runs the default pipeline.
    dump_dir: write the IR after every pass here (also MESHWEAVE_DUMP_DIR).
    verify: run the IR verifier after every pass.
    check_inputs: validate call arguments against the traced signature.
    mesh: a meshweave.DeviceMesh (or a device count) to plan for: cm.plan, cm.report(path),
        per-rank cm.export_onnx(dir); dp/tp/pp-named axes give that Megatron layout, others
        the planner's search (meshweave.api.plan_for). Under a process group of the mesh's
        size, calling the model runs this rank's program (runtime/distributed/module.py).
        An "ep" axis beside them (dp=2,ep=2) makes moe.experts expert-parallel.
    plan: a saved parallel Plan (`meshweave plan --out FILE`): a Plan, or the path of its
        JSON, to run instead of planning for `mesh` (which may then be omitted; given, its size
        must be the plan's). It must have been made for the traced global batch.
    micro_batches: pipeline micro-batches of a dp/tp/pp-named mesh's plan.
    local_batch: with a plan that has a "dp" axis (and pipeline stages of one mesh, if any),
        every rank passes its own slice of the global batch (dim 0 of each tensor argument;
        the example too) and gets that slice's outputs, as DDP takes them: the outputs are
        not gathered over dp, and backward() of a loss averaged over the local batch gives
        DDP's averaged gradients.
        cm.data_parallel_rank() says which slice a rank feeds. The model is traced at the
        global batch (the example repeated dp times).
    hardware: hardware spec name or path used by cost models (default h100).
    training: compile the training step too: forward and backward IR from AOTAutograd's joint
        trace (frontend/joint.py); calls with grad enabled are differentiable.
    cuda_graphs: with backend "triton" on CUDA, capture the generated module's launches in a
        CUDA graph per input signature and replay it (like torch.compile's reduce-overhead
        mode, but outputs are fresh tensors); see codegen/triton/cuda_graphs.py. None (the default)
        turns it on where replay is exact and cheap to keep: backend "triton" on CUDA tensors,
        inference (training=False), static shapes, and no node left to the reference
        executor; True asks for it anyway (an error off CUDA), False never.
    quantize: a meshweave.QuantConfig: weight-only quantization of linear layers into
        `quant.linear` (passes/quant/), run after the default passes; inference only.
    calibration: example batches for QuantConfig(method="gptq"): a list of argument tuples
        (or single tensors) shaped like the traced example.
    quantized_weights: packed weights to reuse instead of quantizing (weight target ->
        {"qweight", "scales", "zeros"}, passes/quant's `packed_weights` of an earlier compile):
        how generation's cached-decoder programs get the CompiledModel's own GPTQ weights.
    memory_budget: with training=True, the rematerialization pass (passes/remat/) chooses
        what the backward recomputes: a fraction in (0, 1] of the activation bytes that saving
        everything needs (torch's activation_memory_budget), or a size such as "2GiB"; the
        saved set of least recompute time (cost model) under it is found by an ILP. None
        saves everything the backward reads.
    memory_limit: device memory that generation may use, in bytes or a size such as "6GiB":
        when a batch's KV caches do not fit it (or the `hardware` spec's memory), cm.generate
        keeps some sequences' caches, and the decode attention over them, on the CPU
        (passes/offload/, runtime/offload/; APEX-style hybrid execution). Under mesh=, the
        memory per device the parallel planner plans in: a training stage over it recomputes,
        at the budget the remat pass's curve says fits (StagePlan.memory_budget). None plans
        against the spec's device memory (a stage over it then recomputes whole layers).
    """

    eager_fallback: bool = True
    backend: str | None = None
    strict: bool = False
    decompose: bool = True
    passes: tuple[str, ...] | None = None
    dump_dir: str | None = None
    verify: bool = True
    check_inputs: bool = True
    mesh: Any = None
    plan: Any = None
    micro_batches: int = 1
    local_batch: bool = False
    hardware: str | None = None
    training: bool = False
    cuda_graphs: bool | None = None
    quantize: Any = None
    calibration: Any = None
    quantized_weights: Any = None
    memory_budget: Any = None
    memory_limit: Any = None

    def __post_init__(self):
        if self.backend not in (None, "eager", "triton"):
            raise ValueError(f"CompileOptions.backend={self.backend!r}: expected 'eager', "
                             f"'triton' or None")
        if self.cuda_graphs and self.backend == "eager":
            raise ValueError("CompileOptions.cuda_graphs=True replays generated Triton kernels: "
                             "it needs backend='triton' (or None on CUDA), not 'eager'")
        if self.memory_budget is not None:
            from meshweave.passes.remat.budget import MemoryBudget

            MemoryBudget.parse(self.memory_budget)  # raises on a bad budget, at construction
            if not self.training:
                raise ValueError(f"CompileOptions.memory_budget={self.memory_budget!r} chooses "
                                 f"what the backward recomputes: it needs training=True")
        if self.local_batch and self.mesh is None and self.plan is None:
            raise ValueError("CompileOptions.local_batch=True splits the batch over a plan's "
                             "dp axis: it needs mesh= (with a 'dp' axis) or plan=")
        if self.memory_limit is not None:
            from meshweave.passes.offload import memory_limit_bytes

            memory_limit_bytes(self.memory_limit)  # raises on a bad cap, at construction
        if self.passes is not None and not isinstance(self.passes, tuple):
            object.__setattr__(self, "passes", tuple(self.passes))

    def replace(self, **changes: Any) -> CompileOptions:
        return dataclasses.replace(self, **changes)


_default = [CompileOptions()]


def default_options() -> CompileOptions:
    return _default[-1]


@contextlib.contextmanager
def options_override(**changes: Any) -> Iterator[CompileOptions]:
    """Temporarily change the defaults used when compile() gets no options (for tests)."""
    _default.append(_default[-1].replace(**changes))
    try:
        yield _default[-1]
    finally:
        _default.pop()
