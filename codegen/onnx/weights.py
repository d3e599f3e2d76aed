"""Weight sources for the shard-wise export (shards.py): a rank's slice of each tensor, read or
generated on its own, so the full model is never in memory.

A source answers `read(p, box)`: the piece `box` (one slice per dim, steps of 1) of the full
tensor `p` (a `Param`: IR name, state_dict name, full shape, dtype). `read_shard` turns a rank
program's shard spec (passes/parallel/lower/ `meta["shard_specs"]`) into such boxes.

  SafetensorsCheckpoint  one or more .safetensors files (or a directory of them), keyed by
                         state_dict name; only the slice is read (safe_open().get_slice)
  TorchCheckpoint        the runtime's own weights.pt (runtime/distributed/checkpoint.py),
                         keyed by IR value name, memory-mapped
  SeededInit             deterministic random init, generated block by block (below)

SeededInit's full tensor is defined block by block, so a shard generated alone equals the same
piece of the tensor generated whole. View the tensor as [rows, rest] (rows = shape[0]); rows
come in blocks of max(1, BLOCK_ELEMENTS // rest); block b holds
`torch.randn(block_rows, rest, generator=manual_seed(h(seed, name, b))) * 0.02` in float32
(then cast to the tensor's dtype), h = the first 63 bits of sha256(f"{seed}/{name}/{b}").
The distribution follows the zoo models' own init: normal(0, 0.02) for tensors of 2 or more
dims (weights, embeddings); ones for 1-D weights (norm scales), zeros for biases, other 1-D
tensors and integer tensors; ones for a running_var, zeros for a running_mean.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from meshweave.ir.errors import MeshweaveError

BLOCK_ELEMENTS = 2**20  # SeededInit: elements per generated block (part of the definition)
INIT_STD = 0.02


class WeightSourceError(MeshweaveError):
    """A checkpoint lacks a tensor, or holds it in another shape; names tensor and file."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One full tensor of the traced model, as the sources look it up."""

    name: str  # IR value name ("p_layers_0_attn_q_proj_weight")
    target: str | None  # state_dict name ("layers.0.attn.q_proj.weight")
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = "param"

    @property
    def key(self) -> str:
        return self.target or self.name


Box = tuple[slice, ...]


class WeightSource:
    """Base: `read(p, box)` gives the piece `box` of the full tensor `p`."""

    def describe(self) -> str:
        return type(self).__name__

    def read(self, p: Param, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def full(self, p: Param) -> torch.Tensor:
        """The whole tensor (tests, small models)."""
        return self.read(p, tuple(slice(0, n) for n in p.shape))


# --------------------------------------------------------------------------------- specs
def spec_indices(shape: Sequence[int], spec: Sequence[Sequence]) -> list[list[int]]:
    """Per dim, the indices of the full tensor a shard spec keeps (in order)."""
    from meshweave.ir.ops.collectives import cut_by_spec

    ndim = len(shape)
    out = []
    for d, n in enumerate(shape):
        mine = []
        for e in spec:
            if e[0] == "rebatch":
                if e[1] % max(ndim, 1) == d:
                    mine.append(("rebatch", 0, e[2]))
            elif e[0] % max(ndim, 1) == d:
                mine.append((0, *e[1:]))
        idx = torch.arange(n)
        out.append(cut_by_spec(idx, mine).tolist() if mine else list(range(n)))
    return out


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive increasing runs of `indices` as (lo, hi) pairs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(lo, hi) for lo, hi in runs]


def read_shard(source: WeightSource, p: Param, spec: Sequence[Sequence]) -> torch.Tensor:
    """The rank's piece of `p` by its shard spec, read box by box (a fused weight cut in
    blocks is several boxes, concatenated); a tensor of its own storage."""
    runs = [_runs(ix) for ix in spec_indices(p.shape, spec)]

    def rec(d: int, box: tuple[slice, ...]) -> torch.Tensor:
        if d == len(runs):
            return source.read(p, box)
        parts = [rec(d + 1, box + (slice(lo, hi),)) for lo, hi in runs[d]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, d)

    return rec(0, ()).to(p.dtype).contiguous()


# --------------------------------------------------------------------------------- seeded
def _seed(seed: int, name: str, block: int) -> int:
    h = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def init_kind(p: Param) -> str:
    """'normal', 'ones' or 'zeros': how SeededInit fills `p` (module docstring)."""
    leaf = p.key.rsplit(".", 1)[-1].lower()
    if not p.dtype.is_floating_point or leaf in ("bias", "running_mean", "num_batches_tracked"):
        return "zeros"
    if leaf == "running_var":
        return "ones"
    if len(p.shape) <= 1:  # a norm's scale ("ln_f.weight", "attn_norm.weight"): ones
        return "ones" if leaf == "weight" else "zeros"
    return "normal"


class SeededInit(WeightSource):
    """Deterministic random weights, any piece generated on its own (module docstring)."""

    def __init__(self, seed: int = 0, std: float = INIT_STD):
        self.seed, self.std = int(seed), std

    def describe(self) -> str:
        return f"seeded init (seed {self.seed})"

    def read(self, p: Param, box: Box) -> torch.Tensor:
        shape = tuple(s.stop - s.start for s in box)
        kind = init_kind(p)
        if kind != "normal":
            fill = torch.ones if kind == "ones" else torch.zeros
            return fill(shape, dtype=p.dtype)
        if not p.shape:  # a 0-d tensor: one row of one element
            one = dataclasses.replace(p, shape=(1,))
            return self.read(one, (slice(0, 1),)).reshape(())
        rest = math.prod(p.shape[1:])
        per = max(1, BLOCK_ELEMENTS // max(rest, 1))
        lo, hi = box[0].start, box[0].stop
        parts = []
        for b in range(lo // per, (hi - 1) // per + 1 if hi > lo else lo // per):
            start, stop = b * per, min((b + 1) * per, p.shape[0])
            gen = torch.Generator().manual_seed(_seed(self.seed, p.key, b))
            block = torch.randn(stop - start, rest, generator=gen, dtype=torch.float32)
            block = block.mul_(self.std).view(stop - start, *p.shape[1:])
            parts.append(block[max(lo, start) - start : min(hi, stop) - start][(slice(None),
                                                                                 *box[1:])])
        if not parts:
            return torch.empty(shape, dtype=p.dtype)
        return torch.cat(parts, 0).to(p.dtype).contiguous()


# --------------------------------------------------------------------------------- files
def _check_shape(p: Param, found: Sequence[int], path: str, key: str) -> None:
    if tuple(found) != tuple(p.shape):
        raise WeightSourceError(
            f"checkpoint {path}: tensor {key!r} has shape {tuple(found)}; the model expects "
            f"{tuple(p.shape)} for {key!r}"
        )


class SafetensorsCheckpoint(WeightSource):
    """Tensors from .safetensors files by state_dict name (then IR name); only slices read.

    `paths`: a file, a directory (every *.safetensors in it), a model.safetensors.index.json,
    or a list of files. A tensor of another dtype is cast to the model's (a bf16 checkpoint
    for a float32 trace)."""

    def __init__(self, paths: str | Sequence[str]):
        self.files = self._files(paths)
        self._handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        for f in self.files:
            for k in self._open(f).keys():
                self.where.setdefault(k, f)

    @staticmethod
    def _files(paths: str | Sequence[str]) -> list[str]:
        if isinstance(paths, str):
            if os.path.isdir(paths):
                files = sorted(glob.glob(os.path.join(paths, "*.safetensors")))
            elif paths.endswith(".json"):
                with open(paths) as fh:
                    wm = json.load(fh).get("weight_map", {})
                base = os.path.dirname(paths)
                files = sorted({os.path.join(base, f) for f in wm.values()})
            else:
                files = [paths]
        else:
            files = list(paths)
        for f in files:
            if not os.path.isfile(f):
                raise WeightSourceError(f"checkpoint {f} does not exist")
        if not files:
            raise WeightSourceError(f"no .safetensors files in {paths}")
        return files

    def _open(self, path: str):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise WeightSourceError(
                    f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
        return self._handles[path]

    def describe(self) -> str:
        return f"checkpoint {', '.join(self.files)}"

    def _key(self, p: Param) -> str:
        for k in (p.target, p.name):
            if k and k in self.where:
                return k
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        raise WeightSourceError(
            f"checkpoint {files} has no tensor {p.key!r} (IR value %{p.name}); the model "
            f"expects {p.dtype} of shape {p.shape}"
        )

    def read(self, p: Param, box: Box) -> torch.Tensor:
        key = self._key(p)
        path = self.where[key]
        sl = self._open(path).get_slice(key)
        _check_shape(p, sl.get_shape(), path, key)
        return sl[box] if box else self._open(path).get_tensor(key)


class TorchCheckpoint(WeightSource):
    """The runtime's own weight file (runtime/distributed/checkpoint.py): a torch.save dict
    keyed by IR value name, memory-mapped, so only a shard's pages are read."""

    def __init__(self, path: str):
        from meshweave.runtime.distributed.checkpoint import open_checkpoint
        from meshweave.runtime.distributed.errors import DistributedError

        try:
            self.state = open_checkpoint(path)
        except DistributedError as e:
            raise WeightSourceError(str(e)) from None
        self.path = path

    def describe(self) -> str:
        return f"checkpoint {self.path}"

    def read(self, p: Param, box: Box) -> torch.Tensor:
        key = next((k for k in (p.name, p.target) if k and k in self.state), None)
        if key is None:
            raise WeightSourceError(
                f"checkpoint {self.path} has no tensor {p.name!r} ({p.target}); the model "
                f"expects {p.dtype} of shape {p.shape}"
            )
        t = self.state[key]
        _check_shape(p, t.shape, self.path, key)
        return t[box].clone() if box else t.clone()


def weight_source(checkpoint: str | None = None, seed: int | None = None) -> WeightSource:
    """The source a command line asks for: a checkpoint file (.safetensors, a directory or an
    index .json; a .pt is the runtime's weights.pt), else a seeded init."""
    if checkpoint:
        if checkpoint.endswith((".pt", ".pth", ".bin")):
            return TorchCheckpoint(checkpoint)
        return SafetensorsCheckpoint(checkpoint)
    return SeededInit(0 if seed is None else seed)
