"""Per-rank execution of a Plan: micro-batches on a pipeline schedule, training steps.

A `RankExecutor` owns one rank's program (program.py: its stage's IR, its parameter shards and
its stage-to-stage transfers) and runs it:

  infer(inputs)              the global batch is cut into plan.micro_batches micro-batches and
                             each into this rank's shard (the inputs' placements); the stage
                             runs every micro-batch forward (receive, run IR, send); the last
                             stage's outputs are gathered (all-gather over the stage mesh,
                             then a send to rank 0) and returned on rank 0
  train_step(inputs, labels) forwards and backwards on plan.schedule ("gpipe" or "1f1b"),
                             activations and their gradients sent between stages; then the
                             gradients are completed and the optimizer steps (optim.py,
                             ZeRO-1 when plan.zero)

The IR runs on torch eager ops under autograd, so backward is torch's. `dist.*` nodes run
through this module's own differentiable implementations (DIST_OPS, the exact adjoints of
autograd_collectives), never the op registry's eager ones, so training works whatever those do.

Loss (documented choice): "ce" is next-token cross entropy, sum over the rank's tokens divided
by the number of label tokens in the global batch, so the sum over micro-batches and data-
parallel ranks is the mean over the global batch; "mean" is the mean of output 0. Ranks holding
identical copies of the loss (replicated over a mesh axis) scale it by 1/copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...ir.graph import Node, Value, map_values
from ...ir.sharding import Partial, Replicate, Shard
from ..reference import _last_uses, run_node
from . import autograd_collectives as ac
from .errors import DistributedError
from .optim import OptimConfig, ParamSync, ShardedOptimizer
from .program import RankProgram, split_ties
from .schedule import stage_schedule
from .shards import as_placements, local_shard, spec_from_placements

_GATHER_TAG = 1 << 20  # tags of the output gather; stage transfers use small tags
LOSSES = ("ce", "mean")


class RankExecutor:
    """Runs one rank's program of `plan`; every rank of the plan makes one."""

    def __init__(
        self,
        program: RankProgram,
        plan,
        *,
        training: bool = False,
        optim: OptimConfig | None = None,
        loss: str = "ce",
        device: str = "cpu",
        ties: Sequence[tuple[Sequence[str], Sequence[int]]] = (),
        own_tensors: bool = False,
    ):
        """`own_tensors`: the program's tensors belong to this executor (a rank's shards
        loaded from the checkpoint), so parameters are used and updated in place, not copied."""
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
        self.program, self.plan, self.rank = program, plan, program.rank
        self.stage = program.stage
        self.mesh = plan.stage_mesh(self.stage)  # global ranks as device ids
        self.size = self.mesh.size
        self.training, self.loss_kind, self.device = training, loss, device
        self.coords = self.mesh.rank_coords(self.rank)
        self.axis_ranks = [
            next(list(g) for g in self.mesh.groups(a) if self.rank in g)
            for a in range(self.mesh.ndim)
        ]
        self.stage_ranks = list(self.mesh.devices)
        self.is_last = self.stage == plan.num_stages - 1
        # Parameters get their own storage: tied copies must not alias (each is stepped), and
        # the rank's state is its shards alone, whatever the program's tensors share.
        param_names = {v.name for v in program.graph.inputs if v.kind == "param"}
        seen: set[int] = set()
        self.tensors = {}
        for k, t in program.graph.tensors.items():
            ptr = t.untyped_storage().data_ptr()
            copy = k in param_names and (not own_tensors or ptr in seen)
            seen.add(ptr)
            self.tensors[k] = t.detach().to(device, copy=copy)
        self.params = {k: self.tensors[k] for k in sorted(param_names)}
        self.p2p = ac.P2P()
        self.schedule = stage_schedule(
            plan.schedule, plan.num_stages, self.stage, plan.micro_batches, training
        )
        self._last_use = _last_uses(program.graph)
        self._dangling = _dangling_collectives(program.graph)
        self.optimizer = None
        if training:
            for p in self.params.values():
                p.requires_grad_(True)
            tie_ranks, full_ties = split_ties(ties, plan, self.stage, self.rank, program)
            self.optimizer = ShardedOptimizer(
                self.params,
                self._param_sync(),
                self.axis_ranks,
                self.rank,
                optim or OptimConfig(),
                tie_ranks,
                full_ties,
            )

    def _peer(self, stage: int) -> int:
        """The rank at this rank's mesh coordinates in `stage` (split programs: one mesh)."""
        return self.plan.stage_mesh(stage).devices[self.stage_ranks.index(self.rank)]

    # ---------------------------------------------------------------- placements
    def placements(self, v: Value) -> tuple:
        if self.program.outputs_replicated and v in self.program.graph.outputs:
            return tuple(Replicate() for _ in range(self.mesh.ndim))
        if v.placements is not None:
            return as_placements(v.placements, self.mesh.ndim)
        return self.plan.placement_of(v.name)

    def _param_sync(self) -> dict[str, ParamSync]:
        names = self.mesh.names
        zero_axis = names.index("dp") if self.plan.zero and "dp" in names else None
        out = {}
        for v in self.program.graph.inputs:
            if v.kind != "param":
                continue
            rep = tuple(a for a, p in enumerate(self.placements(v)) if isinstance(p, Replicate))
            z = zero_axis if zero_axis in rep and self.mesh.shape[zero_axis] > 1 else None
            out[v.name] = ParamSync(tuple(a for a in rep if a != z), z)
        return out

    # ---------------------------------------------------------------- inputs
    def _micro_batch(self, full: torch.Tensor, mb: int, dim: int | None = 0) -> torch.Tensor:
        m = self.plan.micro_batches
        if dim is None or m == 1:
            return full
        if full.shape[dim] % m:
            raise DistributedError(f"batch {full.shape[dim]} does not split into {m} micro-batches")
        return full.chunk(m, dim)[mb]

    def _input_shard(self, v: Value, full: torch.Tensor, mb: int) -> torch.Tensor:
        """This rank's piece of user input `v` for micro-batch `mb`."""
        prog = self.program
        dims = prog.batch_dims if prog.batch_dims is not None else {}
        chunk = self._micro_batch(full, mb, dims.get(v.name, 0))
        if prog.input_specs and v.name in prog.input_specs:
            from meshweave.passes.parallel.lower.setup import shard_tensor

            return shard_tensor(chunk, prog.input_specs[v.name])
        return local_shard(chunk, self.placements(v), self.coords, self.mesh.shape)

    def _stage_inputs(self, inputs: Sequence[torch.Tensor], mb: int) -> list[torch.Tensor]:
        g = self.program.graph
        out = []
        for v, i in zip(g.user_inputs, self.program.used_inputs):
            x = self._input_shard(v, inputs[i], mb)
            want = v.type.concrete_shape(g.hints()) if hasattr(v.type, "shape") else None
            if want is not None and tuple(x.shape) != tuple(want):
                raise DistributedError(
                    f"rank {self.rank}: input %{v.name} shard has shape {tuple(x.shape)} but the "
                    f"program expects {tuple(want)} (global batch / micro-batches / sharding)"
                )
            out.append(x.to(self.device))
        for t in self.program.recvs:
            peer = self._peer(t.src_stage)
            out.append(
                self.p2p.receive(
                    t.type.concrete_shape(g.hints()),
                    t.type.dtype,
                    self.device,
                    peer,
                    t.tag,
                    self.training,
                    key=mb,
                )
            )
        return out

    # ---------------------------------------------------------------- running the IR
    def run_program(self, args: list[torch.Tensor], mb: int) -> list[Any]:
        """Run the IR once (one micro-batch); dist.send nodes add backward roots."""
        g = self.program.graph
        self._inline_roots = []
        env: dict[Value, Any] = dict(zip(g.user_inputs, args))
        for v in g.state_inputs:
            env[v] = self.tensors[v.name]
        for i, n in enumerate(g.nodes):
            impl = DIST_OPS.get(n.op)
            if impl is None:
                run_node(n, env)
            else:
                _run_dist_node(self, n, env, impl, mb)
                if i in self._dangling and self.training:
                    self._keep_adjoint(env[n.outputs[0]])
            for v in self._last_use.get(i, ()):
                env.pop(v, None)
        return [env[v] for v in g.outputs]

    def _keep_adjoint(self, y) -> None:
        """A collective whose result this rank does not use (it sends no piece of a value the
        group reduced for a cross-mesh transfer) still runs its adjoint in backward, as the
        group's other ranks do: a zero-gradient root."""
        if isinstance(y, torch.Tensor) and y.requires_grad:
            self._inline_roots.append(y.sum() * 0)

    def _forward(self, mb: int, inputs, labels) -> None:
        outs = self.run_program(self._stage_inputs(inputs, mb), mb)
        n_model = self.program.num_outputs
        roots = list(self._inline_roots)
        for t, x in zip(self.program.sends, outs[n_model:]):
            peer = self._peer(t.dst_stage)
            roots.append(self.p2p.send(x, peer, t.tag, self.training))
        if self.is_last and n_model:
            if self.training:
                loss = self._loss(outs[0], self._micro_batch(labels, mb), labels.numel())
                self._loss_sum += float(loss.detach())
                roots.append(loss)
            else:
                self._outputs[mb] = outs[:n_model]
        self._saved[mb] = [r for r in roots if r is not None and r.requires_grad]

    def _backward(self, mb: int) -> None:
        roots = self._saved.pop(mb)
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(r) for r in roots])
        self.p2p.answer_unused(mb)

    def _loss(self, out: torch.Tensor, labels: torch.Tensor, n_global: int) -> torch.Tensor:
        out_value = self.program.graph.outputs[0]
        pl = self.placements(out_value)
        batch_axes = []
        for a, p in enumerate(pl):
            if isinstance(p, Partial):
                out = ac.all_reduce(out, self.axis_ranks[a])
            elif isinstance(p, Shard) and p.dim % out.dim() != 0:
                out = ac.all_gather(out, p.dim, self.axis_ranks[a])
            elif isinstance(p, Shard):
                batch_axes.append(a)
        copies = math.prod(s for a, s in enumerate(self.mesh.shape) if a not in batch_axes)
        lab_pl = [Shard(0) if a in batch_axes else Replicate() for a in range(self.mesh.ndim)]
        labels = local_shard(labels, lab_pl, self.coords, self.mesh.shape).to(out.device)
        if self.loss_kind == "ce":
            loss = (
                F.cross_entropy(
                    out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1), reduction="sum"
                )
                / n_global
            )
        else:
            loss = out.float().sum() / (n_global * out.shape[-1])
        return loss / copies

    # ---------------------------------------------------------------- public API
    def infer(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Run the global batch forward; the full outputs on rank 0, None on other ranks."""
        self._outputs: dict[int, list] = {}
        self._saved: dict[int, list] = {}
        with torch.no_grad():
            for _, mb in self.schedule:
                self._forward(mb, inputs, None)
            self.p2p.flush()
            return self.gather_outputs()

    def train_step(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> float | None:
        """One optimizer step on the global batch; the global loss on the last stage."""
        if not self.training:
            raise DistributedError("train_step on an executor built with training=False")
        self._saved, self._outputs, self._loss_sum = {}, {}, 0.0
        for kind, mb in self.schedule:
            if kind == "F":
                self._forward(mb, inputs, labels)
            else:
                self._backward(mb)
        self.p2p.flush()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if not self.is_last:
            return None
        total = torch.tensor([self._loss_sum], dtype=torch.float64, device=self.device)
        if self.size > 1:
            dist.all_reduce(total, group=ac.get_group(self.stage_ranks))
        return float(total.item())

    def gather_outputs(self) -> list[torch.Tensor] | None:
        """Full model outputs on rank 0 (all-gather on the last stage, then a send)."""
        full = None
        if self.is_last and self.program.num_outputs:
            values = self.program.graph.outputs[: self.program.num_outputs]
            per_mb = [
                [self._replicate(x, self.placements(v)) for x, v in zip(outs, values)]
                for _, outs in sorted(self._outputs.items())
            ]
            full = [torch.cat(parts, 0) if len(parts) > 1 else parts[0] for parts in zip(*per_mb)]
        first_last = self.plan.stage_mesh(self.plan.num_stages - 1).devices[0]
        if first_last == 0:
            return full if self.rank == 0 else None
        if self.rank == first_last:
            _send_tensors(full, 0, self.device)
        elif self.rank == 0:
            return _recv_tensors(first_last, self.device)
        return None

    def _replicate(self, x: torch.Tensor, pl) -> torch.Tensor:
        for a, p in enumerate(pl):
            if isinstance(p, Partial):
                x = ac._raw_all_reduce(x, self.axis_ranks[a])
            elif isinstance(p, Shard):
                x = ac._raw_all_gather(x, p.dim, self.axis_ranks[a])
        return x

    def param_shards(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def param_specs(self) -> dict[str, list]:
        """Value name -> the shard spec (lower.py's format) of this rank's piece of it."""
        given = self.program.graph.meta.get("shard_specs") or {}
        return {
            v.name: given.get(v.name) or spec_from_placements(
                self.placements(v), self.coords, self.mesh.shape)
            for v in self.program.graph.inputs if v.kind == "param"
        }


def _send_tensors(tensors: list[torch.Tensor], dst: int, device="cpu") -> None:
    """Send a list of tensors of any shape; headers travel on `device` too (NCCL needs it)."""
    dist.send(torch.tensor([len(tensors)], device=device), dst, tag=_GATHER_TAG)
    for t in tensors:
        t = t.contiguous()
        header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape], device=device)
        dist.send(torch.tensor([header.numel()], device=device), dst, tag=_GATHER_TAG + 1)
        dist.send(header, dst, tag=_GATHER_TAG + 2)
        dist.send(t, dst, tag=_GATHER_TAG + 3)


def _recv_tensors(src: int, device="cpu") -> list[torch.Tensor]:
    count = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(count, src, tag=_GATHER_TAG)
    out = []
    for _ in range(int(count)):
        n = torch.zeros(1, dtype=torch.long, device=device)
        dist.recv(n, src, tag=_GATHER_TAG + 1)
        header = torch.zeros(int(n), dtype=torch.long, device=device)
        dist.recv(header, src, tag=_GATHER_TAG + 2)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        t = torch.empty(tuple(int(s) for s in header[2 : 2 + ndim]), dtype=dtype, device=device)
        dist.recv(t, src, tag=_GATHER_TAG + 3)
        out.append(t)
    return out


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.int8,
    torch.uint8,
]


def _dangling_collectives(g) -> set[int]:
    """Indexes of dist.* collective nodes whose output nothing reads."""
    used = {v for n in g.nodes for v in n.inputs} | set(g.outputs)
    return {
        i for i, n in enumerate(g.nodes)
        if n.op in DIST_OPS and n.op not in ("dist.send", "dist.recv")
        and n.outputs and n.outputs[0] not in used
    }


# ------------------------------------------------------------------------ dist.* dispatch
# op name -> impl(executor, node, args, kwargs, mb) -> result. Args arrive with Values replaced
# by tensors; implementations use ac.* (differentiable) so training works.
DistImpl = Callable[[RankExecutor, Node, tuple, dict, int], Any]
DIST_OPS: dict[str, DistImpl] = {}


def register_dist_impl(op: str) -> Callable[[DistImpl], DistImpl]:
    def deco(fn: DistImpl) -> DistImpl:
        DIST_OPS[op] = fn
        return fn

    return deco


@register_dist_impl("dist.all_reduce")
def _all_reduce(ex, n, args, kwargs, mb):
    reduce = kwargs.get("reduce", "sum")
    if reduce == "max":  # no gradient (ir/ops/collectives.py)
        return ac.all_reduce_max(args[0], kwargs["group"])
    if reduce != "sum":
        raise DistributedError(f"dist.all_reduce: reduce must be 'sum' or 'max', got "
                               f"{reduce!r}")
    return ac.all_reduce(args[0], kwargs["group"])


@register_dist_impl("dist.all_gather")
def _all_gather(ex, n, args, kwargs, mb):
    return ac.all_gather(args[0], kwargs["dim"], kwargs["group"])


@register_dist_impl("dist.reduce_scatter")
def _reduce_scatter(ex, n, args, kwargs, mb):
    if kwargs.get("reduce", "sum") != "sum":
        raise DistributedError(f"dist.reduce_scatter: only 'sum', got {kwargs['reduce']!r}")
    return ac.reduce_scatter(args[0], kwargs["dim"], kwargs["group"])


@register_dist_impl("dist.all_to_all")
def _all_to_all(ex, n, args, kwargs, mb):
    return ac.all_to_all(args[0], kwargs["dim"], kwargs["concat_dim"], kwargs["group"])


@register_dist_impl("dist.send")
def _send(ex, n, args, kwargs, mb):
    """Its result (the IR's opaque token) is None; the backward root goes to the executor."""
    root = ex.p2p.send(args[0], kwargs["dst"], kwargs.get("tag", 0), ex.training)
    if root is not None:
        ex._inline_roots.append(root)


@register_dist_impl("dist.recv")
def _recv(ex, n, args, kwargs, mb):
    from ...ir.types import dtype_from_short

    dtype = kwargs["dtype"]
    dtype = dtype if isinstance(dtype, torch.dtype) else dtype_from_short(str(dtype))
    return ex.p2p.receive(
        kwargs["shape"], dtype, ex.device, kwargs["src"], kwargs.get("tag", 0), ex.training, key=mb
    )


def _run_dist_node(ex: RankExecutor, n: Node, env: dict, impl: DistImpl, mb: int) -> None:
    args = map_values(n.args, env.__getitem__)
    kwargs = map_values(n.kwargs, env.__getitem__)
    try:
        result = impl(ex, n, args, kwargs, mb)
    except DistributedError:
        raise
    except Exception as e:
        where = f" (from {n.source})" if n.source else ""
        raise DistributedError(
            f"rank {ex.rank}: {n} {n.op}{where} raised {type(e).__name__}: {e}", rank=ex.rank
        ) from e
    if n.multi_output:
        for o, r in zip(n.outputs, result):
            env[o] = r
    else:
        env[n.outputs[0]] = result
