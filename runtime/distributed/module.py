"""This rank's part of a planned model, called like the model: compile(mesh=...) under a group.

    cm = meshweave.compile(model, args, options=CompileOptions(mesh=mesh, training=True))
    opt = torch.optim.AdamW(cm.parameters())     # this rank's shards
    loss = loss_fn(cm(*args), labels)            # every rank: the global batch, full outputs
    loss.backward(); opt.step()                  # the single-device gradients, shard by shard
    cm.state_dict()                              # full tensors, keyed like model.state_dict()

`RankModule` lowers the plan for this rank (the planner's `lower_for_rank`) and runs it with
the executor's machinery (executor.py): the global batch is cut into micro-batches and into
this rank's input shards, the stage runs each micro-batch forward, and the last stage's outputs
are replicated with differentiable collectives and sent to the other stages' ranks, so every
rank returns the full outputs.

The rank's backward is meshweave IR (rank_joint.py): at the first training call the program
is traced by AOTAutograd with its collectives as traceable ops whose gradients are their
exact adjoints, and the partitioned forward and backward graphs (`cm.forward_graph`,
`cm.backward_graph`, collectives as dist.* nodes) run on the reference executor, or as
generated Triton modules with backend="triton". A pipeline stage's receives and sends move
outside the traced step (its inputs and outputs). Programs that receive after they send, or
with ops that communicate inside (expert-parallel MoE), keep torch autograd over the forward
program; `backward_kind` says which runs, and why.

Gradients (the default convention): every rank computes the same loss from the full outputs
and calls backward(). The collectives' backwards are exact adjoints (autograd_collectives.py),
which sum over the ranks holding a copy, so the outputs' gradient is divided by the number of
last-stage ranks holding it (other stages' copies get none: the last stage speaks for the
loss). Earlier stages' backward starts at their sends, whose gradients come from the next
stage. Micro-batches' transfers have their own tags (P2P.tag_offset), because one autograd
call runs all their backwards in the engine's order. When autograd finishes, a queued callback
completes the gradients as the executor's optimizer does (optim.py: sum over the axes a shard
is replicated on, then over tied copies), counting only what this backward added, so gradient
accumulation over several backward() calls stays exact.

ZeRO-1: a torch optimizer over `cm.parameters()` keeps state for the rank's whole shards.
`cm.zero_optimizer(torch.optim.AdamW, lr=...)` shards that state over the plan's "dp" axis
instead: torch's ZeroRedundancyOptimizer over this rank's dp group, whose ranks hold the same
shards and (after the backward above) the same gradients; each steps the parameters it owns
and broadcasts them to the others.

Local batches (CompileOptions(local_batch=True), DDP's convention): each rank passes its own
slice of the global batch along the dp axis. The slices are all-gathered (inputs are small) and
laid out so that the usual cuts give each rank its own rows back; the lowering keeps the
outputs' dp slices (lower_for_rank's local_axis), so each rank gets its rows' outputs and the
logits are never gathered over dp (with pipeline stages of one mesh, from the last stage's
rank at its coordinates). The same division of the output gradients by
the last stage's copies then gives DDP's average of the ranks' local-mean gradients.

Weights: every rank holds the model (as with DDP); rank 0's parameters and buffers are
broadcast at the first call, and rank 0's plan is the one every rank runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ...ir.graph import Graph
from ...ir.sharding import Partial, Shard
from . import autograd_collectives as ac
from .errors import DistributedError
from .executor import RankExecutor
from .program import tied_params
from .rank_joint import JointTraceError
from .shards import assemble_from_specs

_MB_TAG_STRIDE = 1024  # tag offset between micro-batches (plan transfer tags are far smaller)


class RankModule:
    """One rank's program of `plan` for `graph`, differentiable when `training`."""

    def __init__(self, graph: Graph, plan, *, training: bool, device: str | torch.device,
                 local_batch: bool = False, partition=None, recomputed=None,
                 make_runner=None):
        """`partition`/`recomputed`: the rank joint's partition (passes/remat/ under
        CompileOptions.memory_budget) and the names it recomputes; `make_runner`: what runs
        its graphs (default the reference executor's program as generated Python,
        runtime/python_runner.py; the Triton backend's) (rank_joint.py)."""
        from ...passes.parallel.lower.rank import lower_for_rank
        from .groups import init_plan_groups
        from .program import program_from_lowered, tie_rank_groups

        if plan.zero:  # the user's torch optimizer steps whole shards (see the docstring)
            plan = dataclasses.replace(plan, zero=False)
        plan = _rank0_plan(plan)
        self.graph, self.plan, self.rank = graph, plan, dist.get_rank()
        _broadcast_tensors(graph)
        ties = tied_params(graph, plan)
        init_plan_groups(plan, tie_rank_groups(ties, plan))
        names = plan.stage_mesh(plan.stage_of_rank(self.rank)).names
        self.dp_axis = None  # local_batch: the mesh axis each rank's batch slice lies along
        if local_batch:
            if "dp" not in names:
                raise DistributedError(f"local_batch=True: the plan's mesh axes {names} have "
                                       f"no 'dp' axis to split the batch over")
            self.dp_axis = names.index("dp")
        lowered = lower_for_rank(graph, plan, self.rank, local_axis=self.dp_axis)
        self.program = program_from_lowered(lowered, graph, plan, self.rank)
        self.ex = RankExecutor(self.program, plan, training=training, device=str(device),
                               ties=ties)
        self.training = training
        self.pending: dict | None = None  # during a backward: the gradients from before it
        self.joint, self.backward_kind = None, None
        if training:
            self._build_joint(partition, recomputed, make_runner)
        self.targets = {v.name: v.target for v in graph.inputs if v.kind == "param"}

    def _build_joint(self, partition, recomputed, make_runner) -> None:
        """The rank's forward and backward as IR (rank_joint.py), where the program allows."""
        from ..python_runner import python_runner
        from .rank_joint import build_rank_joint, untraceable

        why = untraceable(self.program.graph)
        if why is not None:
            self.backward_kind = f"torch autograd over the forward program: {why}"
            return
        self.joint = build_rank_joint(self.program.graph, self.ex.tensors,
                                      optimize=_rank_passes,
                                      make_runner=make_runner or python_runner,
                                      partition=partition, recomputed=recomputed)
        self.backward_kind = "meshweave IR (the rank's joint graph)"

    def _run(self, args: list[torch.Tensor], mb: int, grad: bool) -> list[Any]:
        """One micro-batch of the program: the joint's differentiable forward when training
        (its backward is the backward IR), else the forward-only program."""
        ex, joint = self.ex, self.joint
        if grad and joint is not None:
            ex._inline_roots = []
            got = [_receive(ex, kw, mb) for kw in joint.recvs]
            try:
                outs = list(joint.fn(*args, *got))
            except JointTraceError as e:  # tracing communicates nothing: every rank falls back
                if joint.recvs:  # the values are received: no rank may fall back after that
                    raise
                self.joint = None
                self.backward_kind = f"torch autograd over the forward program: {e}"
            else:
                n = len(outs) - len(joint.sends)
                for x, kw in zip(outs[n:], joint.sends):
                    root = ex.p2p.send(x, kw["dst"], kw.get("tag", 0), True)
                    if root is not None:
                        ex._inline_roots.append(root)
                return outs[:n]
        return ex.run_program(args, mb)

    # ------------------------------------------------------------------ calling
    def __call__(self, leaves: list[Any]) -> list[torch.Tensor]:
        ex = self.ex
        if self.dp_axis is not None:
            leaves = self._global_batch(leaves)
        grad = self.training and torch.is_grad_enabled()
        ex.training = grad  # both ends of every transfer agree: all ranks call alike
        ex._saved, ex._outputs = {}, {}
        roots: list[torch.Tensor] = []
        per_mb: list[list[torch.Tensor]] = []
        try:
            for mb in range(self.plan.micro_batches):
                ex.p2p.tag_offset = mb * _MB_TAG_STRIDE
                outs = self._run(ex._stage_inputs(leaves, mb), mb, grad)
                roots += ex._inline_roots
                n_model = self.program.num_outputs
                for t, x in zip(self.program.sends, outs[n_model:]):
                    roots.append(ex.p2p.send(x, ex._peer(t.dst_stage), t.tag, grad))
                if ex.is_last:
                    values = self.program.graph.outputs[:n_model]
                    per_mb.append([_replicate(ex, x, v) for x, v in zip(outs, values)])
        finally:
            ex.p2p.tag_offset = 0
        if not grad:
            ex.p2p.flush()
        full = [torch.cat(p, 0) if len(p) > 1 else p[0] for p in zip(*per_mb)]
        full = self._to_every_stage(full)
        roots = [r for r in roots if r is not None and r.requires_grad]
        if not grad or not (roots or any(o.requires_grad for o in full)):
            return full
        copies = ex.size if ex.is_last else None
        return list(_Boundary.apply(self, copies, len(roots), *roots, *full))

    def memory_stats(self, leaves: list[Any], remat: dict | None = None) -> dict[str, Any]:
        """One forward and backward of this rank's joint on its first micro-batch, measured
        (runtime/memory.py: saved bytes by saved-tensor hooks, peak live bytes from the
        reference executor) beside the estimates from the rank's IR. A collective: every rank
        calls it. Gradients are restored afterwards, so measuring does not train."""
        from ...runtime.memory import estimate_peak, estimate_saved, measure_step

        joint = self.joint
        if joint is None:
            raise DistributedError(f"memory_stats measures the rank's backward IR; this "
                                   f"rank's backward is {self.backward_kind}")
        if joint.recvs or joint.sends:
            raise DistributedError("memory_stats: a pipeline stage's step needs its peers' "
                                   "transfers; measure a plan of one stage")
        if self.dp_axis is not None:
            leaves = self._global_batch(leaves)
        args = self.ex._stage_inputs(leaves, 0)
        with torch.enable_grad():
            got = measure_step(lambda: list(joint.fn(*args)), list(self.ex.params.values()),
                               args)
        fw, bw = joint.forward, joint.backward
        num_saved = fw.meta.get("num_saved", 0)
        saved_est = estimate_saved(fw, num_saved)
        sol = (remat or {}).get("solution")
        return {
            "rank": self.rank,
            "budget": str(remat["budget"]) if remat and remat.get("budget") else None,
            "saved_bytes_estimated": int(sol.saved_bytes) if sol else saved_est,
            "saved_bytes_measured": got["saved_bytes"],
            "peak_bytes_estimated": estimate_peak(fw, bw, num_saved),
            "peak_bytes_measured": got["peak_bytes"],
            "peak_source": got["peak_source"],
        }

    def _global_batch(self, leaves: list[Any]) -> list[Any]:
        """local_batch: the global batch from every dp rank's slice (a differentiable
        all-gather of the inputs, which are small beside the activations), laid out so that
        the executor's micro-batch and dp cuts hand each rank back its own rows, in order."""
        ex, dp = self.ex, self.ex.mesh.shape[self.dp_axis]
        m = self.plan.micro_batches
        out = []
        for x in leaves:
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                out.append(x)
                continue
            if x.shape[0] % m:
                raise DistributedError(f"local_batch=True: a rank's batch of {x.shape[0]} does "
                                       f"not split into {m} micro-batches")
            every = ac.all_gather(x.to(ex.device), 0, ex.axis_ranks[self.dp_axis])
            rest = tuple(x.shape[1:])
            every = every.reshape(dp, m, x.shape[0] // m, *rest).transpose(0, 1)
            out.append(every.reshape(dp * x.shape[0], *rest))
        return out

    def data_parallel_rank(self) -> tuple[int, int]:
        """(this rank's index along the plan's dp axis, the dp size): which slice of the
        global batch it feeds under local_batch=True (as DistributedSampler's rank)."""
        names = tuple(self.ex.mesh.names)
        if "dp" not in names:
            return 0, 1
        a = names.index("dp")
        return self.ex.coords[a], self.ex.mesh.shape[a]

    def _to_every_stage(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last stage's outputs on every rank (a broadcast from its first rank; with
        local batches, each rank's own rows from the last stage's rank at its coordinates)."""
        if self.plan.num_stages == 1:
            return full
        if self.dp_axis is not None:
            return self._from_my_twin(full)
        src = self.plan.stage_mesh(self.plan.num_stages - 1).devices[0]
        meta = [[(tuple(o.shape), o.dtype) for o in full] if self.rank == src else None]
        dist.broadcast_object_list(meta, src=src)
        if self.rank == src:
            sent = [o.detach().contiguous() for o in full]
        else:
            sent = [torch.empty(s, dtype=d, device=self.ex.device) for s, d in meta[0]]
        for t in sent:
            dist.broadcast(t, src=src)
        return full if self.ex.is_last else sent

    def _from_my_twin(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        """local_batch with pipeline stages: the last stage's rank at each mesh coordinate
        sends its outputs (that coordinate's dp rows) to the ranks at the same coordinate in
        the other stages (copies: the last stage speaks for the loss, as without local
        batches)."""
        from .executor import _recv_tensors, _send_tensors

        ex, last = self.ex, self.plan.num_stages - 1
        if ex.is_last:
            sent = [o.detach().contiguous() for o in full]
            for stage in range(last):
                _send_tensors(sent, ex._peer(stage), ex.device)
            return full
        return _recv_tensors(ex._peer(last), ex.device)

    # ------------------------------------------------------------------ after backward
    def finish_backward(self) -> None:
        """Flush transfers, complete this backward's gradients, add back what was there."""
        ex, before, self.pending = self.ex, self.pending, None
        ex.p2p.flush()
        for mb in range(self.plan.micro_batches):
            ex.p2p.answer_unused(mb)
        ex.p2p.flush()
        ex.optimizer.sync_grads()
        ex.optimizer.sync_ties()
        for name, g in before.items():
            p = ex.params[name]
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(fully qualified name, this rank's shard), in the IR's parameter order."""
        return [(self.targets.get(n, n), p) for n, p in self.ex.params.items()]

    def zero_optimizer(self, optimizer_class, **defaults):
        """ZeRO-1 over the plan's dp axis: torch's ZeroRedundancyOptimizer over this rank's
        shards, partitioned among the ranks of its dp group (see the module docstring)."""
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from .groups import get_group

        ex = self.ex
        if not self.training:
            raise DistributedError("zero_optimizer: the model was compiled without "
                                   "training=True; there is nothing to optimize")
        names = ex.mesh.names
        if "dp" not in names:
            raise DistributedError(f"zero_optimizer: ZeRO-1 shards optimizer state over a "
                                   f"'dp' axis, and this stage's mesh has axes {names}; plan "
                                   f"on a mesh with a dp axis, e.g. DeviceMesh((2, 2), "
                                   f"('dp', 'tp'))")
        axis = names.index("dp")
        sharded = [n for n, s in ex.optimizer.sync.items() if axis not in s.sum_axes]
        if sharded and ex.mesh.shape[axis] > 1:
            raise DistributedError(f"zero_optimizer: parameters {sharded[:4]} are not "
                                   f"replicated over the dp axis, so its ranks hold different "
                                   f"shards of them; ZeRO-1 needs dp replicas")
        group = get_group(ex.axis_ranks[axis])
        return ZeroRedundancyOptimizer(list(ex.params.values()), optimizer_class,
                                       process_group=group, **defaults)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameters (gathered from every rank's shards) and buffers, keyed like the
        model's state_dict. A collective: every rank must call it."""
        mine = ({n: p.detach().cpu() for n, p in self.ex.params.items()}, self.ex.param_specs())
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        params = assemble_params(self.graph, self.plan, every)
        out = {}
        for v in self.graph.inputs:
            if v.kind == "param":
                out[v.target] = params[v.target]
            elif v.kind == "buffer" and v.target:
                out[v.target] = self.graph.tensors[v.name].detach().clone()
        return out


def assemble_params(graph: Graph, plan, ranks) -> dict[str, torch.Tensor]:
    """Full parameters by fully qualified name, from each rank's (shards, shard specs)."""
    targets = {v.name: v.target for v in graph.inputs if v.kind == "param"}
    pieces: dict[str, list] = {}
    for shards, specs in ranks:
        for name, t in shards.items():
            pieces.setdefault(name, []).append((specs[name], t))
    params = {
        targets.get(n, n): assemble_from_specs(tuple(graph.tensors[n].shape), p)
        for n, p in pieces.items()
    }
    # A tied weight the IR never reads (export routes every use through one copy) has the
    # value of the copy that ran.
    for names, _ in tied_params(graph, plan):
        ran = [n for n in names if n in pieces]
        for n in names:
            if n not in pieces and ran:
                params[targets.get(n, n)] = params[targets.get(ran[0], ran[0])]
    return params


def _replicate(ex: RankExecutor, x: torch.Tensor, v) -> torch.Tensor:
    """An output value made whole on every rank of the stage, differentiably (the planner's
    lowering already did; split programs' outputs are gathered here)."""
    for a, p in enumerate(ex.placements(v)):
        if isinstance(p, Partial):
            x = ac.all_reduce(x, ex.axis_ranks[a])
        elif isinstance(p, Shard):
            x = ac.all_gather(x, p.dim, ex.axis_ranks[a])
    return x


class _Boundary(torch.autograd.Function):
    """Where the user's autograd graph meets this rank's: outputs in, gradients out.

    Backward seeds the rank's program: the outputs' gradients divided by the last stage's
    copies (None elsewhere), and 1 for each send root; it queues `finish_backward`."""

    @staticmethod
    def forward(ctx, module, copies, n_roots, *tensors):
        ctx.module, ctx.copies = module, copies
        ctx.roots = [(r.dtype, r.device) for r in tensors[:n_roots]]
        return tuple(t.detach().clone() for t in tensors[n_roots:])

    @staticmethod
    def backward(ctx, *grads):
        module = ctx.module
        if module.pending is None:  # the first boundary this backward reaches
            module.pending = {}
            for name, p in module.ex.params.items():
                module.pending[name], p.grad = p.grad, None
            torch.autograd.Variable._execution_engine.queue_callback(module.finish_backward)
        roots = [torch.ones((), dtype=d, device=dev) for d, dev in ctx.roots]
        if ctx.copies is None:
            outs = [None] * len(grads)
        else:
            outs = [None if g is None else g / ctx.copies for g in grads]
        return (None, None, None, *roots, *outs)


def _receive(ex: RankExecutor, kw: dict, mb: int) -> torch.Tensor:
    """A dist.recv the rank joint takes as an input: received before the traced step, its
    backward sending the gradient back (autograd_collectives.P2P)."""
    from ...ir.types import dtype_from_short

    dtype = kw["dtype"] if isinstance(kw["dtype"], torch.dtype) else dtype_from_short(
        str(kw["dtype"]))
    return ex.p2p.receive(kw["shape"], dtype, ex.device, kw["src"], kw.get("tag", 0), True,
                          key=mb)


def _rank_passes(graph: Graph) -> Graph:
    """The passes a rank's joint graphs take: shape propagation, verified after it (no CSE or
    DCE: a collective one rank merges or drops would leave the others waiting)."""
    from ...passes.pipeline import Pass, run_pipeline
    from ...passes.shape_prop import shape_prop

    return run_pipeline(graph, [Pass("shape_prop", shape_prop)])


def _rank0_plan(plan):
    """Rank 0's plan, on every rank: one plan, whatever each rank's search found."""
    from ...passes.parallel.plan import Plan

    box = [plan.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return plan if dist.get_rank() == 0 else Plan.from_json(box[0])


def _broadcast_tensors(graph: Graph) -> None:
    """Every rank starts from rank 0's weights (as DDP does at construction)."""
    with torch.no_grad():
        for name in sorted(graph.tensors):
            t = graph.tensors[name]
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                if not t.is_contiguous():
                    raise DistributedError(f"tensor {name} is not contiguous; cannot broadcast")
                dist.broadcast(t.data, src=0)

