"""Weights on disk: written once, and each rank loads only its own shards.

    ckpt_job = rank_job(job, "/tmp/x/weights.pt")   # writes the checkpoint; weight-free job
    tensors = load_rank_tensors(path, wanted, specs, rank)   # in a rank: its shards only

The process that traces and plans (the parent of local ranks; rank 0 under torchrun) writes
the traced graph's tensors (parameters, buffers, lifted constants), keyed by IR value name, to
one `torch.save` file; tied weights share a storage and are stored once. The job the ranks
receive holds a copy of the graph whose tensors are on the meta device (shapes and dtypes
only), so a rank never reads, and under spawn never receives, the full weights.

A rank lowers that meta graph (its program's tensors are meta shards), then opens the file with
`torch.load(mmap=True, weights_only=True)`: tensors are file-backed and only the pages a rank
touches are read. It cuts each tensor its program holds by the program's shard spec
(`graph.meta["shard_specs"]`, passes/parallel/lower/'s format; none for the runtime's own
stage split: the whole tensor of the rank's stage) and clones the piece, so its memory holds
only its own shards. A missing, unreadable or mismatching file raises DistributedError naming
the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...ir.graph import Graph
from .errors import DistributedError
from .shards import apply_spec

CHECKPOINT_NAME = "weights.pt"


def write_checkpoint(graph: Graph, path: str) -> None:
    """Save `graph.tensors` (value name -> tensor) to `path`."""
    meta = [k for k, t in graph.tensors.items() if t.device.type == "meta"]
    if meta:
        raise DistributedError(f"cannot write {path}: tensors {meta[:4]} are on the meta device")
    torch.save({k: t.detach() for k, t in graph.tensors.items()}, path)


def meta_graph(graph: Graph) -> Graph:
    """A structural copy of `graph` whose tensors are meta (shape, dtype and strides only)."""
    g = graph.copy()
    g.tensors = {k: torch.empty_like(t, device="meta") for k, t in graph.tensors.items()}
    return g


def rank_job(job, path: str):
    """Write `job`'s weights to `path`; the job the ranks get: a meta graph, no model state,
    the tied-parameter groups (found from the real tensors' storages) and the checkpoint path."""
    from .program import tied_params

    write_checkpoint(job.graph, path)
    return dataclasses.replace(
        job,
        graph=meta_graph(job.graph),
        model_state={},
        checkpoint=path,
        ties=tied_params(job.graph, job.plan),
    )


def open_checkpoint(path: str, rank: int | None = None) -> Mapping[str, torch.Tensor]:
    """The checkpoint's tensors, memory-mapped (nothing is read until a tensor is touched)."""
    who = f"rank {rank}: " if rank is not None else ""
    if not os.path.isfile(path):
        raise DistributedError(f"{who}weight checkpoint {path} does not exist", rank=rank)
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # any reader error: the file is not a checkpoint
        raise DistributedError(
            f"{who}cannot read weight checkpoint {path}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
            rank=rank,
        ) from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise DistributedError(f"{who}weight checkpoint {path} is not a dict of tensors", rank=rank)
    return state


def load_rank_tensors(
    path: str,
    wanted: Mapping[str, torch.Tensor],
    specs: Mapping[str, Sequence[tuple]],
    rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each of `wanted` (name -> meta tensor of the local shape) cut from the checkpoint by
    `specs[name]` (whole when absent) into a tensor of its own storage."""
    state = open_checkpoint(path, rank)
    who = f"rank {rank}: " if rank is not None else ""
    out: dict[str, Any] = {}
    for name, want in wanted.items():
        if name not in state:
            raise DistributedError(f"{who}weight checkpoint {path} has no tensor {name!r}", rank)
        piece = apply_spec(state[name], specs.get(name) or ())
        if tuple(piece.shape) != tuple(want.shape) or piece.dtype != want.dtype:
            raise DistributedError(
                f"{who}weight checkpoint {path}: {name!r} gives a {piece.dtype} shard of shape "
                f"{tuple(piece.shape)}; the program expects {want.dtype} {tuple(want.shape)}",
                rank,
            )
        out[name] = piece if _owns_storage(piece, state[name]) else piece.clone()
    return out


def _owns_storage(piece: torch.Tensor, src: torch.Tensor) -> bool:
    """`piece` is a fresh contiguous tensor of exactly its own storage (not the mmap'd file)."""
    storage = piece.untyped_storage()
    return (
        piece.is_contiguous()
        and storage.nbytes() == piece.numel() * piece.element_size()
        and storage.data_ptr() != src.untyped_storage().data_ptr()
    )


def load_program_weights(program, path: str) -> None:
    """Replace a rank program's (meta) tensors by its shards loaded from `path`."""
    g = program.graph
    specs = g.meta.get("shard_specs") or {}
    g.tensors = load_rank_tensors(path, g.tensors, specs, program.rank)
