"""CompiledModel: what meshweave.compile returns. Called like the model it came from."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from meshweave.ir.errors import MeshweaveError
from meshweave.ir.graph import Graph
from meshweave.ir.printer import print_graph
from meshweave.options import CompileOptions
from meshweave.runtime.reference import run_graph
from meshweave.signature import Signature


class CompiledModel:
    """A traced, optimized model.

    .graph        the optimized IR (printable)
    .explain()    a readable summary: ops, fallbacks, passes, dynamic dims
    .dump(dir)    write the IR (and backend artifacts) under `dir`
    .export_onnx(dir)  ONNX artifacts, checked in onnxruntime
    """

    def __init__(self, graph: Graph, signature: Signature, out_spec: pytree.TreeSpec,
                 options: CompileOptions, frontend_graph: Graph, model_name: str):
        self.graph = graph
        self.frontend_graph = frontend_graph
        self.signature = signature
        self.out_spec = out_spec
        self.options = options
        self.model_name = model_name
        self.backend = options.backend or "eager"
        self.cuda_graphs = ""  # the triton backend: whether calls replay CUDA graphs, and why
        self._runner: Callable[[list[Any]], list[Any]] = self._run_reference
        self.artifacts: dict[str, Any] = {}
        self.kernels: list = []  # generated kernels (codegen fills it for backend="triton")
        self.joint = None  # CompileOptions(training=True): frontend.joint.JointProgram
        self.remat: dict[str, Any] = {}  # its partition: passes/remat/ problem and solution
        self.plan = None  # CompileOptions(mesh=...): the parallel Plan
        self._rank = None  # under the plan's process group: runtime.distributed RankModule
        self.rank_remat: dict[str, Any] = {}  # its partition (passes/remat/), under a budget
        self.source_model = None  # the traced nn.Module and meshweave.compile (api.py):
        self.compile_fn = None  # cm.generate compiles the model's KV-cache steps with them

    # --- calling -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._on_meta():
            raise RuntimeError(
                f"{self.model_name} was compiled on the meta device (shapes without weights): "
                f"it can print, dump, plan, report and export ONNX structure, but not run; "
                f"build the model with real weights (e.g. on 'cpu', or load a checkpoint) and "
                f"compile it again to call it")
        if self.options.check_inputs:
            leaves = self.signature.flatten(args, kwargs)
        else:
            leaves = pytree.tree_flatten((args, kwargs))[0]
        if self.plan is not None and self.plan.world_size > 1:
            return pytree.tree_unflatten(self._rank_module(leaves)(leaves), self.out_spec)
        if self.joint is not None and torch.is_grad_enabled():
            # the training step: differentiable, the backward IR runs on .backward()
            return pytree.tree_unflatten(list(self.joint.fn(*leaves)), self.out_spec)
        outs = self._runner(leaves)
        outs = self._apply_mutations(outs, leaves)
        return pytree.tree_unflatten(outs, self.out_spec)

    def _on_meta(self) -> bool:
        meta = self.__dict__.get("_meta")
        if meta is None:
            meta = self._meta = any(getattr(t, "is_meta", False)
                                    for t in self.graph.tensors.values())
        return meta

    def _rank_module(self, leaves: list[Any]):
        """This rank's program of the plan (runtime/distributed/module.py), built at the first
        call under a process group of the plan's size; a clear error otherwise."""
        import torch.distributed as dist

        n, mesh = self.plan.world_size, self.plan.mesh
        if not (dist.is_available() and dist.is_initialized()):
            raise MeshweaveError(
                f"{self.model_name} was compiled with mesh={mesh} ({n} devices): calling it "
                f"runs one rank's program, under a process group of {n} ranks. Run the script "
                f"with `torchrun --nproc-per-node {n} script.py` (gloo on the CPU, NCCL on "
                f"GPUs); without one, cm.plan, cm.report(path) and cm.export_onnx(dir) work, "
                f"and compile() without mesh= runs on one device"
            )
        if dist.get_world_size() != n:
            raise MeshweaveError(
                f"{self.model_name} was planned for {n} devices (mesh={mesh}), but the process "
                f"group has {dist.get_world_size()} ranks: start {n} ranks, or compile with a "
                f"mesh of {dist.get_world_size()} devices"
            )
        if self._rank is None:
            from meshweave.runtime.distributed.module import RankModule

            tensors = [*(x for x in leaves if isinstance(x, torch.Tensor)),
                       *self.graph.tensors.values()]
            device = next((t.device for t in tensors if t.device.type == "cuda"), "cpu")
            kw = {}
            budget = self._rank_budget()
            if self.options.training and budget is not None:
                from meshweave.passes.remat.partition import partition_for

                self.rank_remat = report = {}  # this rank's partition under the budget
                kw["partition"] = partition_for(None, self.options.hardware, report,
                                                getattr(device, "type", device), budget)
                kw["recomputed"] = lambda: report.get("recomputed", [])
            if self.backend == "triton":  # the rank's joint graphs get generated kernels
                from meshweave.codegen import triton_runner

                kw["make_runner"] = triton_runner(self.options)
            self._rank = RankModule(self.graph, self.plan, training=self.options.training,
                                    device=device, local_batch=self.options.local_batch, **kw)
        return self._rank

    def _rank_budget(self):
        """This rank's rematerialization budget: CompileOptions.memory_budget, else its plan
        stage's (StagePlan.memory_budget, raised to the smallest feasible if need be)."""
        from meshweave.passes.remat.budget import MemoryBudget

        if self.options.memory_budget is not None:
            return MemoryBudget.parse(self.options.memory_budget)
        import torch.distributed as dist

        stage = self.plan.stages[self.plan.stage_of_rank(dist.get_rank())]
        if stage.memory_budget is None:
            return None
        return MemoryBudget(fraction=stage.memory_budget, at_least_feasible=True)

    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, cache_len: int | None = None,
                 max_batch: int | None = None, **kwargs: Any):
        """Generate with compiled prefill/decode programs over a static KV cache (decoder LMs:
        models/llama.py). method="greedy"|"sample"|"sjd"|"prompt_lookup"|"jacobi"|"medusa"
        (medusa_heads=, tree=, acceptance=), temperature=, top_p=, eos_token_id=, seed=;
        returns a runtime.generate.Generation. A quantized model decodes with its own packed
        weights. Under CompileOptions(memory_limit=...), a batch whose KV caches do not fit
        runs hybrid CPU-GPU (runtime/offload/: greedy or sample; cpu_sequences= and dispatch=
        fix the split and the dispatch); the result's `offload` holds the plan and the
        scheduler's figures."""
        if self.options.memory_limit is not None:  # plan against the cap: runtime/offload/
            from meshweave.runtime.offload import hybrid_generator_for as generator_for
        else:
            from meshweave.runtime.generate import generator_for
        gen = generator_for(self, cache_len=cache_len, max_batch=max_batch)
        return gen.generate(input_ids, max_new_tokens, **kwargs)

    # --- parameters ----------------------------------------------------------------------------
    def named_parameters(self):
        """(fully qualified name, tensor): with a plan, under its process group, this rank's
        shards (for the optimizer); with training=True the model's own parameters, which the
        compiled step reads and whose .grad backward() fills; otherwise the graph's weights."""
        if self.plan is not None and self.plan.world_size > 1:
            yield from self._rank_module([]).named_parameters()
            return
        if self.joint is not None:  # the training step reads (and fills .grad on) the model's
            yield from self.source_model.named_parameters()
            return
        seen = set()
        for v in self.graph.inputs:
            t = self.graph.tensors.get(v.name)
            if v.kind == "param" and t is not None and id(t) not in seen:
                seen.add(id(t))
                yield v.target, t

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def data_parallel_rank(self) -> tuple[int, int]:
        """(this rank's index along the plan's dp axis, the dp size), under the plan's process
        group: the slice of the global batch a rank feeds with CompileOptions(local_batch=True).
        (0, 1) without a plan."""
        if self.plan is None or self.plan.world_size == 1:
            return 0, 1
        return self._rank_module([]).data_parallel_rank()

    def zero_optimizer(self, optimizer_class=torch.optim.AdamW, **defaults):
        """ZeRO-1 (a plan with a dp axis, under its process group): an optimizer over this
        rank's shards whose state is partitioned over the dp ranks (torch's
        ZeroRedundancyOptimizer; runtime/distributed/module.py). Used like any optimizer."""
        if self.plan is None or self.plan.world_size == 1:
            raise MeshweaveError(
                f"cm.zero_optimizer: {self.model_name} has no multi-device plan to shard the "
                f"optimizer state over; compile with CompileOptions(mesh=DeviceMesh((2,), "
                f"('dp',)), training=True), or use a torch optimizer on cm.parameters()")
        return self._rank_module([]).zero_optimizer(optimizer_class, **defaults)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded tensors keyed like model.state_dict() (with a plan: gathered from
        every rank's shards, a collective that every rank calls)."""
        if self.plan is not None and self.plan.world_size > 1:
            return self._rank_module([]).state_dict()
        return {v.target: self.graph.tensors[v.name].detach().clone() for v in self.graph.inputs
                if v.kind in ("param", "buffer") and v.name in self.graph.tensors and v.target}

    def report(self, path: str, **kwargs: Any) -> str:
        """Write the HTML report of the plan (CompileOptions(mesh=...)) to `path`."""
        from meshweave.report import write_report

        if self.plan is None:
            raise MeshweaveError("cm.report: this model was compiled without mesh=, so there "
                                 "is no plan to report; pass CompileOptions(mesh=...)")
        return write_report(path, self.plan, self.graph, **kwargs)

    @property
    def forward_graph(self):
        """Training: the forward IR (user outputs, then the values saved for backward). Under
        mesh= in a process group: this rank's, once its first training call traced it."""
        mine = self._rank_graph("forward")
        if mine is not None or self.joint is None:
            return mine
        return self.joint.forward

    @property
    def backward_graph(self):
        """Training: the backward IR (saved values and output gradients -> input gradients).
        Under mesh=: this rank's, the adjoints of its collectives included (rank_joint.py)."""
        mine = self._rank_graph("backward")
        if mine is not None or self.joint is None:
            return mine
        return self.joint.backward

    def _rank_graph(self, kind: str):
        joint = getattr(self._rank, "joint", None)
        return joint.graphs.get(kind) if joint is not None else None

    @property
    def backward_kind(self) -> str | None:
        """Under mesh= with training: what runs this rank's backward, the rank's backward IR
        or (expert-parallel MoE, a receive after a send, an untraceable program) torch
        autograd, with the reason."""
        return getattr(self._rank, "backward_kind", None)

    def memory_stats(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One training step on (args, kwargs), measured beside the estimates: the bytes kept
        between forward and backward and the peak live bytes (runtime/memory.py), and the
        rematerialization pass's budget, saved set and recompute cost (passes/remat/)."""
        if self.plan is not None and self.plan.world_size > 1 and self.options.training:
            leaves = self.signature.flatten(args, kwargs)  # this rank's step
            return self._rank_module(leaves).memory_stats(leaves, self.rank_remat)
        if self.joint is None:
            raise ValueError("memory_stats() measures a training step: compile with "
                             "CompileOptions(training=True)")
        from meshweave.runtime.memory import estimate_peak, measure_step

        leaves = self.signature.flatten(args, kwargs)
        state = self.joint.parameters
        with torch.enable_grad():
            measured = measure_step(lambda: list(self.joint.fn(*leaves)), state, leaves)
        sol = self.remat["solution"]
        return {
            "budget": str(self.remat["budget"]) if self.remat["budget"] is not None else None,
            "saved_bytes_estimated": int(sol.saved_bytes),
            "saved_bytes_measured": measured["saved_bytes"],
            "full_saved_bytes": int(sol.full_bytes),
            "peak_bytes_estimated": estimate_peak(self.joint.forward, self.joint.backward,
                                                  len(self.joint.saved)),
            "peak_bytes_measured": measured["peak_bytes"],
            "peak_source": measured["peak_source"],
            "recomputed_nodes": len(sol.recomputed),
            "recompute_flops": int(sol.recompute_flops),
            "recompute_seconds_estimated": sol.recompute_seconds,
        }

    def _run_reference(self, leaves: list[Any]) -> list[Any]:
        return run_graph(self.graph, leaves)

    def _apply_mutations(self, outs: list[Any], leaves: list[Any]) -> list[Any]:
        mutations = self.graph.meta.get("mutations") or []
        if not mutations:
            return outs
        drop = set()
        user_names = [v.target for v in self.graph.user_inputs]
        for index, kind, target in mutations:
            drop.add(index)
            if kind == "buffer_mutation":
                v = next(v for v in self.graph.inputs if v.target == target)
                self.graph.tensors[v.name].copy_(outs[index])
            else:
                leaves[user_names.index(target)].copy_(outs[index])
        return [o for i, o in enumerate(outs) if i not in drop]

    # --- inspection ----------------------------------------------------------------------------
    @property
    def fallback_ops(self) -> list[tuple[str, str]]:
        return [(n.op, n.source) for n in self.graph.nodes if n.attrs.get("fallback")]

    def explain(self) -> str:
        g = self.graph
        n_params = sum(t.numel() for v, t in ((v, g.tensors.get(v.name)) for v in g.inputs)
                       if t is not None and v.kind == "param")
        lines = [
            f"meshweave compiled model: {self.model_name}",
            f"  backend: {self.backend}"
            + (f"; CUDA graphs {self.cuda_graphs}" if self.cuda_graphs else ""),
            "  inputs: " + ", ".join(f"%{v.name}: {v.type}" for v in g.user_inputs),
            (f"  parameters: {n_params:,} elements in "
             f"{sum(1 for v in g.inputs if v.kind == 'param')} tensors"),
            f"  nodes: {len(self.frontend_graph.nodes)} traced -> {len(g.nodes)} after passes",
        ]
        if g.symbols:
            lines.append("  dynamic dims: " + ", ".join(
                f"{s} in [{lo}, {'inf' if hi is None else hi}] (traced at {h})"
                for s, (h, lo, hi) in g.symbols.items()))
        lines.append("  passes: " + ", ".join(
            f"{r.name} ({r.seconds * 1e3:.1f} ms, {r.nodes_before}->{r.nodes_after})"
            for r in g.provenance))
        counts = sorted(g.op_counts().items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("  ops: " + ", ".join(f"{op} x{c}" for op, c in counts))
        fallbacks = self.fallback_ops
        if fallbacks:
            lines.append(f"  eager fallback ({len(fallbacks)} nodes, no registry entry):")
            lines += [f"    {op}  at {src or '?'}" for op, src in fallbacks]
        else:
            lines.append("  eager fallback: none")
        flops, moved = _total_cost(g)
        lines.append(f"  estimated FLOPs per call: {flops:,}; bytes moved (unfused): {moved:,}")
        if self.joint is not None:
            j = self.joint
            bw_fallback = sum(1 for n in j.backward.nodes if n.attrs.get("fallback"))
            lines.append(
                f"  training (AOTAutograd joint trace): forward {len(j.forward.nodes)} nodes, "
                f"backward {len(j.backward.nodes)} nodes ({bw_fallback} through the eager "
                f"fallback), {len(j.saved)} values saved for backward; both run on the "
                f"{'generated Triton modules' if self.backend == 'triton' else 'reference executor'}"
                f" (calls under torch.no_grad() run the inference program)"
            )
            sol = self.remat.get("solution")
            if sol is not None:
                budget = self.remat["budget"]
                lines.append(
                    f"  rematerialization (passes/remat/): budget "
                    f"{budget if budget is not None else 'none (save all)'}; saves "
                    f"{sol.saved_bytes:,.0f} of {sol.full_bytes:,.0f} activation bytes, "
                    f"recomputes {len(sol.recomputed)} nodes ({sol.recompute_flops:,.0f} FLOPs, "
                    f"~{sol.recompute_seconds * 1e6:.1f} us estimated); cm.memory_stats(*args) "
                    f"measures it")
        moe = g.meta.get("moe")
        if moe is not None:  # passes/moe/: per block, recognised or why it stayed dense
            lines.append(f"  mixture of experts: {moe.summary()}")
            lines += [f"    {line}" for line in moe.lines()]
        for name, art in self.artifacts.items():
            summary = getattr(art, "summary", None)
            if callable(summary):
                lines.append(f"  {name}: {summary()}")
        return "\n".join(lines)

    def dump(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        written = []
        for name, g in (("frontend", self.frontend_graph), ("final", self.graph)):
            path = os.path.join(directory, f"{name}.mwir")
            with open(path, "w") as f:
                f.write(print_graph(g))
            written.append(path)
        path = os.path.join(directory, "explain.txt")
        with open(path, "w") as f:
            f.write(self.explain() + "\n")
        written.append(path)
        for name, art in self.artifacts.items():
            dumper = getattr(art, "dump", None)
            if callable(dumper):
                written += dumper(directory)
        return written

    def export_onnx(self, directory: str, inputs=None, **kwargs: Any):
        """Export the optimized graph as ONNX (opset 18), checked and run in onnxruntime.

        With plan=<Plan> (default: cm.plan, from CompileOptions(mesh=...)), writes one file per
        rank segment plus manifest.json.
        """
        from meshweave.codegen.onnx.export import export_onnx

        if self.plan is not None:
            kwargs.setdefault("plan", self.plan)
        return export_onnx(self, directory, inputs, **kwargs)

    def __repr__(self) -> str:
        return f"<CompiledModel {self.model_name}: {len(self.graph.nodes)} nodes, {self.backend}>"


def _total_cost(g: Graph) -> tuple[int, int] | None:
    """FLOPs and bytes moved per call, at the traced sizes of any dynamic dims."""
    from meshweave.ir.registry import node_cost

    hints = g.hints()
    flops = moved = 0
    for n in g.nodes:
        try:
            f, b = node_cost(n)
        except (AttributeError, TypeError, IndexError):
            continue
        flops += int(f.subs(hints) if hasattr(f, "subs") else f)
        moved += int(b.subs(hints) if hasattr(b, "subs") else b)
    return flops, moved
