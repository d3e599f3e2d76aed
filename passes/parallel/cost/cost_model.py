"""Cost model of one stage mesh and micro-batch size: node strategies, memory, resharding.

`MeshModel` evaluates, for every node strategy (strategies.py), the per-device forward time of
one micro-batch (roofline of the op's FLOPs and bytes on its LOCAL shapes; problem.py scales
it x3 for forward + backward in training, x4 with recomputation) and the bytes it saves for
backward; for every graph input placement its memory (weights, or in training weights +
grads + Adam states, ZeRO-1 sharding the states over mesh axis 0); and for every edge the
matrix of resharding costs between the producer's and the consumer's strategies
(`CommTable`, shared by all micro-batch sizes of one mesh).

Edge costs in training follow the gradients too (DTensor semantics, per mesh axis): the
gradient of a consumer input is Partial when the input is replicated but the consumer's work
is split over that axis (the Megatron "f" all-reduce), Replicate when the input was Partial
(the backward of an all-reduce is free), else the input's placement; it is resharded back to
the producer's placement (Partial producers take a replicated gradient). Parameter gradients
that need no forward collective are reduced once per step (data-parallel gradient sync), not
once per micro-batch: they are returned separately as `per_step`. Values no gradient reaches
(rotary tables, masks, integer ids: nothing upstream is a trainable parameter) pay no backward
collective at all (`edge_kind`). Under expert parallelism (the ep strategy of moe.experts) a
node's time includes its dispatch and combine all-to-all (moe_cost.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshweave.ir.graph import Graph, Node, Value, map_values
from meshweave.ir.mesh import DeviceMesh
from meshweave.ir.registry import lookup
from meshweave.ir.sharding import Partial, Replicate, Shard
from meshweave.ir.types import TensorType
from .collectives import _transition_rank, collective_time, link_for_axis, resharding_cost
from .hardware import HardwareSpec, canonical_dtype
from .moe_cost import exchange_time
from .optimizer_shard import param_training_memory
from ..strategies.axis import node_inputs
from ..strategies.compute_rules import VOCAB_SOFTMAX
from ..strategies.moe_rules import check_ep_mesh, restrict_for_ep
from ..strategies.node_strategies import (
    BatchInfo,
    NodeStrategy,
    Placements,
    effective_types,
    local_shape,
    mesh_strategies,
    placements_valid,
)

R, P = Replicate(), Partial()
ACTIVATION, PARAM, NO_GRAD = 0, 1, 2  # edge kinds: how a value's gradient flows back
_NO_SAVE = {"view", "sym", "constant", "assert", "creation"}


def grad_free_values(graph: Graph) -> set[Value]:
    """Values no gradient flows into: everything not downstream of a floating parameter."""
    has_grad = {v for v in graph.inputs if v.kind == "param" and isinstance(v.type, TensorType)
                and v.type.dtype.is_floating_point}
    for n in graph.nodes:
        if any(v in has_grad for v in n.inputs):
            has_grad.update(o for o in n.outputs if isinstance(o.type, TensorType)
                            and o.type.dtype.is_floating_point)
    return {v for v in graph.all_values() if v not in has_grad}


def compute_dtype(graph: Graph, spec: HardwareSpec) -> str:
    """The dtype the math runs in: the parameters' (fp16 on devices without bf16 math)."""
    for v in graph.inputs:  # packed quantized weights (int32 words, uint8 zeros) do not count
        if v.kind == "param" and isinstance(v.type, TensorType) and v.type.dtype.is_floating_point:
            dt = canonical_dtype(v.type.dtype)
            if dt in spec.flops:
                return dt
            return "float16" if "float16" in spec.flops else next(iter(spec.flops))
    return "float32" if "float32" in spec.flops else next(iter(spec.flops))


class MeshModel:
    """Costs of every strategy of every node for one stage mesh and micro-batch size."""

    def __init__(
        self,
        graph: Graph,
        types: dict[Value, Any],
        batch: BatchInfo,
        mesh: DeviceMesh,
        micro_batch: int,
        spec: HardwareSpec,
        *,
        training: bool,
        dtype: str,
        zero: bool = True,
        comm: CommTable | None = None,
        restrict_outer: bool = True,
    ):
        self.graph, self.mesh, self.spec = graph, mesh, spec
        self.micro_batch, self.training, self.dtype = micro_batch, training, dtype
        self.zero = zero and training and mesh.shape[0] > 1
        self.types = effective_types(graph, batch, micro_batch, types)
        self.comm = comm or CommTable(mesh, spec, training)
        self.restrict_outer = restrict_outer
        # Strategies depend on the micro-batch only through divisibility by mesh factors, so
        # they are enumerated once per canonical micro-batch and shared across sizes.
        # (a graph whose batch dim is lost, e.g. at a loss's sum, is planned at its traced
        # batch only, so it keeps that batch here too)
        self.canon = micro_batch if batch.lost_at else canonical_batch(micro_batch, mesh.size)
        self._strat_types = self.types if self.canon == micro_batch else None
        self._batch, self._traced_types = batch, types
        self._grad_free = grad_free_values(graph) if training else set()
        check_ep_mesh(graph, mesh, types)  # an "ep" axis needs moe.experts nodes it divides

    # ------------------------------------------------------------------ strategies
    def strategies(self, n: Node) -> list[NodeStrategy]:
        key = (n, self.canon)
        s = self.comm.strategies.get(key)
        if s is None:
            if self._strat_types is None:
                self._strat_types = effective_types(
                    self.graph, self._batch, self.canon, self._traced_types
                )
            s = mesh_strategies(
                n,
                self._strat_types,
                self.mesh.shape,
                batch=self._batch if self.restrict_outer else None,
            )
            s = self.comm.strategies[key] = restrict_for_ep(n, s, self.mesh, self._batch)
        return s

    def input_options(
        self, v: Value, consumers: Sequence[tuple[Sequence[NodeStrategy], int]]
    ) -> list[Placements]:
        """Placements a graph input may take: replicated, plus any a consumer asks for."""
        t = self.types.get(v)
        opts: list[Placements] = [tuple(R for _ in self.mesh.shape)]
        for strats, i in consumers:
            for s in strats:
                pl = s.ins[i]
                if pl is None or pl in opts or any(isinstance(p, Partial) for p in pl):
                    continue
                if isinstance(t, TensorType) and placements_valid(pl, t.shape, self.mesh.shape):
                    opts.append(pl)
        return opts

    # ------------------------------------------------------------------ node costs
    def node_costs(self, n: Node, strats: Sequence[NodeStrategy]) -> tuple[np.ndarray, np.ndarray]:
        """(time of one micro-batch's forward, bytes saved for backward) of each strategy."""
        info = lookup(n.op)
        cat = info.category if info is not None else "other"
        times, mem = [], []
        for s in strats:
            flops, moved, out_bytes = self._local_cost(n, s)
            t = self.spec.compute_time(flops, moved, self.dtype) if flops or moved else 0.0
            # expert parallelism's dispatch + combine all-to-all (moe_cost.py)
            t += exchange_time(n, s, self._local_of, self.mesh.shape, self.comm.links,
                               self.training)
            t += self._vocab_softmax_time(n, s)
            times.append(t)
            mem.append(out_bytes if self.training and cat not in _NO_SAVE else 0.0)
        return np.array(times), np.array(mem, dtype=float)

    def _vocab_softmax_time(self, n: Node, s: NodeStrategy) -> float:
        """A vocab-parallel log-softmax's all-reduces over each axis that splits the vocab:
        the rows' max and sum of exponentials (fp32) in the forward, the sum of the
        gradients in the backward; returned per forward (the training multiplier is 3)."""
        if n.op != "aten._log_softmax.default" or VOCAB_SOFTMAX not in s.tags:
            return 0.0  # (the vocab-parallel embedding's tag is "vocab" too)
        local = self._local(n.outputs[0], s.outs[0], self.mesh.shape)
        dim = n.args[1] % len(local.shape)
        rows_bytes = 4.0 * math.prod(local.shape) / max(1, local.shape[dim])
        t = 0.0
        for a, tag in enumerate(s.tags):
            if tag == VOCAB_SOFTMAX and self.mesh.shape[a] > 1:
                ar = collective_time("all_reduce", rows_bytes, self.mesh.shape[a],
                                     self.comm.links[a])
                t += ar * (3.0 / 3.0 if self.training else 2.0)
        return t

    def _local_cost(self, n: Node, s: NodeStrategy) -> tuple[float, float, float]:
        ms = self.mesh.shape
        in_local = [self._local(v, pl, ms) for v, pl in zip(node_inputs(n), s.ins)]
        out_local = [self._local(o, pl, ms) for o, pl in zip(n.outputs, s.outs)]
        return _op_cost(n, tuple(in_local), tuple(out_local))

    def _local_of(self, v: Value, pl: Placements | None) -> Any:
        return self._local(v, pl, self.mesh.shape)

    def _local(self, v: Value, pl: Placements | None, ms: Sequence[int]) -> Any:
        t = self.types.get(v, v.type)
        if not isinstance(t, TensorType):
            return t
        return TensorType(local_shape(t.shape, pl, ms), t.dtype, t.device)

    def input_memory(self, v: Value, opts: Sequence[Placements]) -> np.ndarray:
        """Per-device bytes of graph input `v` under each placement option."""
        t = self.types.get(v)
        if not isinstance(t, TensorType) or v.kind == "user":
            return np.zeros(len(opts))
        numel, item = math.prod(t.shape), int(nbytes(TensorType((1,), t.dtype)))
        out = []
        for pl in opts:
            if v.kind == "param" and self.training:
                m = param_training_memory(
                    numel,
                    pl,
                    self.mesh,
                    param_bytes=item,
                    zero1=self.zero,
                    dp_axis=0 if self.zero else None,
                )
                out.append(m.total)
            else:
                out.append(math.prod(local_shape(t.shape, pl, self.mesh.shape)) * item)
        return np.array(out, dtype=float)

    # ------------------------------------------------------------------ edge costs
    def intern(self, pls: Sequence[Placements | None]) -> np.ndarray:
        return self.comm.intern(pls)

    def edge_matrix(
        self,
        v: Value,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        dst_split: Sequence[tuple[bool, ...]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """([src x dst] seconds per micro-batch, [src x dst] seconds per step) of the edge
        carrying `v` from producer placements `src_ids` into consumer input placements
        `dst_ids` (interned) of consumers whose work is split as `dst_split`."""
        t = self.types.get(v)
        size = nbytes(t) if isinstance(t, TensorType) else 0.0
        return self.comm.edge_matrix(src_ids, dst_ids, dst_split, size, self.edge_kind(v))

    def edge_kind(self, v: Value) -> int:
        """PARAM, NO_GRAD (nothing trainable upstream) or ACTIVATION."""
        if v.kind == "param":
            return PARAM
        return NO_GRAD if v in self._grad_free else ACTIVATION

    @property
    def zero_sync_factor(self) -> float:
        """With ZeRO-1 the runtime reduces gradients as a reduce-scatter plus an all-gather
        (runtime/distributed/optim.py), not one all-reduce: the same ring bytes, at those
        kinds' bandwidths. The gradient reduction's per-byte time is multiplied by this."""
        if not self.zero:
            return 1.0
        link = self.comm.links[0]
        ar = link.bandwidth_for("all_reduce")
        rs, ag = link.bandwidth_for("reduce_scatter"), link.bandwidth_for("all_gather")
        return 0.5 * (ar / rs + ar / ag)

    def reshard_time(self, src: Placements, dst: Placements, nbytes: float) -> float:
        return self.comm.reshard_time(src, dst, nbytes)

    def value_bytes(self, v: Value, pl: Placements | None) -> float:
        t = self.types.get(v)
        if not isinstance(t, TensorType):
            return 0.0
        return nbytes(TensorType(local_shape(t.shape, pl, self.mesh.shape), t.dtype))


_ITEMSIZE: dict[Any, int] = {}


def nbytes(t: TensorType) -> float:
    """t.nbytes() without building a tensor per call (TensorType.itemsize does)."""
    size = _ITEMSIZE.get(t.dtype)
    if size is None:
        size = _ITEMSIZE[t.dtype] = t.itemsize
    return float(math.prod(t.shape) * size)


_NO_TRAFFIC = {"view", "sym", "constant", "assert"}


def _op_cost(n: Node, in_local: tuple, out_local: tuple) -> tuple[float, float, float]:
    """(FLOPs, bytes moved, output bytes) of `n` on local types; memoised by shapes."""
    key = (id(n), tuple(_sig(t) for t in in_local), tuple(_sig(t) for t in out_local))
    hit = _OP_COST.get(key)
    if hit is not None and hit[0] is n:
        return hit[1]
    info = lookup(n.op)
    out_bytes = sum(nbytes(t) for t in out_local if isinstance(t, TensorType))
    if info is None:
        res = (0.0, 0.0, out_bytes)
    else:
        it = iter(in_local)
        args = map_values((n.args, n.kwargs), lambda v: next(it))
        flops = info.flops(args[0], args[1], list(out_local)) if info.flops else 0
        if info.bytes is not None:
            moved = float(info.bytes(args[0], args[1], list(out_local)))
        elif info.category in _NO_TRAFFIC:
            moved = 0.0
        else:
            moved = out_bytes + sum(nbytes(t) for t in in_local if isinstance(t, TensorType))
        res = (float(flops), float(moved), out_bytes)
    if len(_OP_COST) > 500_000:
        _OP_COST.clear()
    _OP_COST[key] = (n, res)
    return res


def _sig(t: Any) -> Any:
    return (t.shape, t.dtype) if isinstance(t, TensorType) else None


_OP_COST: dict[tuple, tuple[Node, tuple[float, float, float]]] = {}


def placement_from_text(texts: Sequence[str]) -> Placements:
    from meshweave.ir.sharding import parse_placement

    return tuple(parse_placement(t) for t in texts)


def placement_text(pl: Placements) -> tuple[str, ...]:
    return tuple(str(p) for p in pl)


def is_replicated(pl: Placements | None) -> bool:
    return pl is None or all(isinstance(p, Replicate) for p in pl)


def canonical_batch(micro_batch: int, mesh_size: int) -> int:
    """A stand-in batch size with the same divisibility by every factor of `mesh_size` (and
    the same "is it 1"): gcd(micro_batch, mesh_size), or a prime not dividing mesh_size."""
    if micro_batch == 1:
        return 1
    g = math.gcd(micro_batch, mesh_size)
    if g > 1:
        return g
    q = 3
    while mesh_size % q == 0 or any(q % p == 0 for p in range(2, int(q**0.5) + 1)):
        q += 2
    return q


def axis_link(mesh: DeviceMesh, axis: int, spec: HardwareSpec):
    """`collectives.link_for_axis`, in closed form for row-major meshes of ranks 0..n-1."""
    if mesh.device_ids is not None:
        return link_for_axis(mesh, axis, spec)
    stride = math.prod(mesh.shape[axis + 1 :])
    span = stride * mesh.shape[axis]
    dpn = spec.devices_per_node
    inside = mesh.shape[axis] == 1 or (span <= dpn and dpn % span == 0)
    return spec.intra_node if inside else spec.inter_node


class CommTable:
    """Resharding costs on one mesh, shared by every MeshModel of that mesh.

    Every collective costs alpha + bytes * beta, so moving a value between two placements
    costs A + B * nbytes. (A, B) are kept per pair of interned placements, and per
    (source, destination, consumer split) for the training transition that adds the
    gradient's way back; matrices for an edge are then one gather and a multiply-add.
    """

    def __init__(self, mesh: DeviceMesh, spec: HardwareSpec, training: bool):
        self.mesh, self.spec, self.training = mesh, spec, training
        self.links = [axis_link(mesh, a, spec) for a in range(mesh.ndim)]
        self.strategies: dict[tuple, list[NodeStrategy]] = {}
        self._ids: dict[Placements | None, int] = {}
        self._pls: list[Placements | None] = []
        self._nsplit = 2**mesh.ndim
        self._pair: dict[tuple[int, int], tuple[float, float]] = {}
        self._grad: dict[tuple[int, int], tuple[int, int]] = {}
        self._tab = np.full((3, 4, 0, 0), np.nan)  # [edge kind, coef, src, dst*nsplit+split]

    def intern(self, pls: Sequence[Placements | None]) -> np.ndarray:
        """Small integer ids for placements (hashing them once, not once per matrix entry)."""
        out = np.empty(len(pls), dtype=np.int64)
        for i, pl in enumerate(pls):
            j = self._ids.get(pl)
            if j is None:
                j = self._ids[pl] = len(self._pls)
                self._pls.append(pl)
            out[i] = j
        return out

    def edge_matrix(
        self,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        dst_split: Sequence[tuple[bool, ...]],
        nbytes: float,
        kind: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        masks = np.array(
            [sum(1 << a for a, x in enumerate(sp) if x) for sp in dst_split], dtype=np.int64
        )
        cols = dst_ids * self._nsplit + masks
        self._grow(max(int(src_ids.max(initial=0)), int(dst_ids.max(initial=0))) + 1)
        tab = self._tab[int(kind)]
        sub = tab[:, src_ids][:, :, cols]
        missing = np.isnan(sub[0])
        if missing.any():
            for i, j in zip(*np.nonzero(missing)):
                a, c = int(src_ids[i]), int(cols[j])
                if np.isnan(tab[0, a, c]):
                    tab[:, a, c] = self._coefficients(a, c, kind)
            sub = tab[:, src_ids][:, :, cols]
        with np.errstate(invalid="ignore"):
            per_mb = np.where(np.isinf(sub[0]), np.inf, sub[0] + sub[1] * nbytes)
            per_step = sub[2] + sub[3] * nbytes
        return per_mb, per_step

    def _grow(self, n: int) -> None:
        have = self._tab.shape[2]
        if n <= have:
            return
        size = max(n, 2 * have, 32)
        tab = np.full((3, 4, size, size * self._nsplit), np.nan)
        tab[:, :, :have, : have * self._nsplit] = self._tab
        self._tab = tab

    def _coefficients(self, a: int, col: int, kind: int) -> list[float]:
        """(A, B) per micro-batch and per step of moving placements a -> col's placement, for
        an edge of `kind` (ACTIVATION, PARAM or NO_GRAD)."""
        is_param = kind == PARAM
        d, mask = divmod(col, self._nsplit)
        fa, fb = self._reshard_coef(a, d)
        if not math.isfinite(fa):
            return [math.inf, 0.0, 0.0, 0.0]
        ba = bb = 0.0
        if self.training and kind != NO_GRAD:
            gd, gs = self._grad_ids(a, d, mask)
            ba, bb = self._reshard_coef(gd, gs)
        if is_param and fa == 0.0 and fb == 0.0:
            return [0.0, 0.0, ba, bb]  # gradients accumulate locally, reduced once per step
        return [fa + ba, fb + bb, 0.0, 0.0]

    def _grad_ids(self, a: int, d: int, mask: int) -> tuple[int, int]:
        """Placements of the gradient at the consumer, and the one the producer needs."""
        key = (a, d * self._nsplit + mask)
        hit = self._grad.get(key)
        if hit is None:
            src, dst = self._pls[a], self._pls[d]
            g_dst = tuple(
                P
                if (isinstance(x, Replicate) and mask >> i & 1)
                else (R if isinstance(x, Partial) else x)
                for i, x in enumerate(dst)
            )
            g_src = tuple(R if isinstance(x, Partial) else x for x in src)
            ids = self.intern([g_dst, g_src])
            hit = self._grad[key] = (int(ids[0]), int(ids[1]))
        return hit

    def _reshard_coef(self, a: int, b: int) -> tuple[float, float]:
        hit = self._pair.get((a, b))
        if hit is None:
            src, dst = self._pls[a], self._pls[b]
            t0 = self.reshard_time(src, dst, 0.0)
            hit = (
                (t0, self.reshard_time(src, dst, 1.0) - t0)
                if math.isfinite(t0)
                else (math.inf, 0.0)
            )
            self._pair[(a, b)] = hit
        return hit

    def transition_terms(
        self,
        src: Placements,
        dst: Placements,
        split: tuple[bool, ...],
        nbytes: float,
        kind: int,
    ) -> tuple[float, float, float]:
        """Moving a value from src to dst: (seconds per micro-batch, fixed seconds per step,
        per-byte seconds per step). The per-step terms are the gradient reduction; its fixed
        part (latency) is paid once per bucket of gradients, not once per parameter."""
        a, d = (int(x) for x in self.intern([src, dst]))
        mask = sum(1 << i for i, x in enumerate(split) if x)
        c = self._coefficients(a, d * self._nsplit + mask, kind)
        per_mb = c[0] + c[1] * nbytes if math.isfinite(c[0]) else math.inf
        return per_mb, c[2], c[3] * nbytes

    def reshard_time(self, src: Placements, dst: Placements, nbytes: float) -> float:
        """`collectives.resharding_cost_multi` with this mesh's links computed once."""
        if src == dst:
            return 0.0
        cur = list(src)
        order = sorted(range(len(cur)), key=lambda a: _transition_rank(cur[a], dst[a]))
        total = 0.0
        ms = self.mesh.shape
        for a in order:
            shard = math.prod(ms[b] for b in range(len(ms)) if isinstance(cur[b], Shard))
            axis_bytes = nbytes / shard * (ms[a] if isinstance(cur[a], Shard) else 1)
            total += resharding_cost(cur[a], dst[a], axis_bytes, ms[a], self.links[a])
            cur[a] = dst[a]
        return total
