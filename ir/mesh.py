"""Logical device meshes: an n-dimensional grid of device ranks with named axes.

A `DeviceMesh` is the coordinate system that sharding placements (ir/sharding.py) refer to:
placement `k` of a value describes its layout over mesh axis `k`. Ranks are laid out in
row-major order (the last axis varies fastest), so with `devices_per_node` devices per host the
last axis of a mesh like (nodes, gpus_per_node) stays inside a node.

A sub-mesh (`DeviceMesh.submesh`) keeps the global rank ids of the devices it selects in
`device_ids`; every method that returns ranks returns those global ids.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

AxisRef = int | str
_NAMED_AXIS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(-?\d+)")


def _default_names(ndim: int) -> tuple[str, ...]:
    return tuple(f"d{i}" for i in range(ndim))


@dataclasses.dataclass(frozen=True)
class DeviceMesh:
    """A grid of `prod(shape)` devices; `device_ids` defaults to `range(size)` (row-major)."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...] | None = None
    device_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, Sequence) else (self.shape,)
        if not shape:
            raise ValueError("DeviceMesh: shape must have at least one axis, got ()")
        for s in shape:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0:
                raise ValueError(
                    f"DeviceMesh: axis sizes must be positive integers, got shape {shape}"
                )
        shape = tuple(int(s) for s in shape)
        object.__setattr__(self, "shape", shape)
        if self.axis_names is not None:
            names = tuple(self.axis_names)
            if len(names) != len(shape):
                raise ValueError(
                    f"DeviceMesh: {len(names)} axis names {names} for a {len(shape)}-d mesh "
                    f"of shape {shape}; give exactly one name per axis"
                )
            if any(not isinstance(n, str) or not n for n in names):
                raise ValueError(f"DeviceMesh: axis names must be non-empty strings: {names}")
            if len(set(names)) != len(names):
                raise ValueError(f"DeviceMesh: duplicate axis names {names}")
            object.__setattr__(self, "axis_names", names)
        if self.device_ids is not None:
            ids = tuple(int(d) for d in self.device_ids)
            if len(ids) != math.prod(shape):
                raise ValueError(
                    f"DeviceMesh: {len(ids)} device ids for a mesh of shape {shape} "
                    f"({math.prod(shape)} devices)"
                )
            if len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError(f"DeviceMesh: device ids must be distinct and >= 0: {ids}")
            object.__setattr__(self, "device_ids", None if ids == tuple(range(len(ids))) else ids)

    # ------------------------------------------------------------------ basic properties
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def names(self) -> tuple[str, ...]:
        """Axis names; `d0, d1, ...` when the mesh was built without names."""
        return self.axis_names if self.axis_names is not None else _default_names(self.ndim)

    @property
    def devices(self) -> tuple[int, ...]:
        """Global ranks in row-major order of mesh coordinates."""
        return self.device_ids if self.device_ids is not None else tuple(range(self.size))

    def axis_index(self, axis: AxisRef) -> int:
        """Resolve an axis name or (possibly negative) index to a non-negative index."""
        if isinstance(axis, str):
            if axis not in self.names:
                raise KeyError(f"DeviceMesh: no axis named {axis!r}; axes are {self.names}")
            return self.names.index(axis)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"DeviceMesh: axis must be a name or an int, got {axis!r}")
        if not -self.ndim <= axis < self.ndim:
            raise IndexError(f"DeviceMesh: axis {axis} out of range for a {self.ndim}-d mesh")
        return axis % self.ndim

    def axis_size(self, axis: AxisRef) -> int:
        return self.shape[self.axis_index(axis)]

    # ------------------------------------------------------------------ coordinates
    def rank_coords(self, rank: int) -> tuple[int, ...]:
        """Mesh coordinates of a global rank."""
        devices = self.devices
        if rank not in devices:
            raise ValueError(f"DeviceMesh: rank {rank} is not in this mesh ({devices})")
        flat = devices.index(rank)
        coords = []
        for s in reversed(self.shape):
            coords.append(flat % s)
            flat //= s
        return tuple(reversed(coords))

    def coords_rank(self, coords: Sequence[int]) -> int:
        """Global rank at the given mesh coordinates."""
        if len(coords) != self.ndim or any(not 0 <= c < s for c, s in zip(coords, self.shape)):
            raise ValueError(f"DeviceMesh: coordinates {tuple(coords)} outside shape {self.shape}")
        flat = 0
        for c, s in zip(coords, self.shape):
            flat = flat * s + c
        return self.devices[flat]

    def groups(self, axis: AxisRef) -> list[list[int]]:
        """The rank groups that communicate along `axis` (one per point of the other axes)."""
        a = self.axis_index(axis)
        others = [range(s) if i != a else range(1) for i, s in enumerate(self.shape)]
        out = []
        for base in itertools.product(*others):
            coords = list(base)
            group = []
            for k in range(self.shape[a]):
                coords[a] = k
                group.append(self.coords_rank(coords))
            out.append(group)
        return out

    def submesh(
        self, index: Mapping[AxisRef, int | slice] | None = None, **by_name: int | slice
    ) -> DeviceMesh:
        """Select part of the mesh: an int fixes (and drops) an axis, a slice narrows it.

        `mesh.submesh({0: slice(0, 2)})` keeps the first two rows; `mesh.submesh(dp=1)` keeps
        the devices whose `dp` coordinate is 1 and drops the axis. Keeps global rank ids.
        """
        sel: dict[int, int | slice] = {}
        for key, val in [*(index or {}).items(), *by_name.items()]:
            a = self.axis_index(key)
            if a in sel:
                raise ValueError(f"DeviceMesh.submesh: axis {key!r} selected twice")
            sel[a] = val
        ranges: list[Sequence[int]] = []
        new_shape, new_names = [], []
        for a, s in enumerate(self.shape):
            v = sel.get(a, slice(None))
            if isinstance(v, slice):
                r = range(s)[v]
                if len(r) == 0:
                    raise ValueError(f"DeviceMesh.submesh: empty selection {v} on axis {a}")
                new_shape.append(len(r))
                new_names.append(self.names[a])
                ranges.append(r)
            else:
                if not -s <= v < s:
                    raise IndexError(f"DeviceMesh.submesh: index {v} out of range on axis {a}")
                ranges.append([v % s])
        if not new_shape:  # every axis fixed: a single device
            new_shape, new_names = [1], ["d0"]
        ids = [self.coords_rank(c) for c in itertools.product(*ranges)]
        names = tuple(new_names) if self.axis_names is not None else None
        return DeviceMesh(tuple(new_shape), names, tuple(ids))

    # ------------------------------------------------------------------ text / json
    @classmethod
    def parse(cls, text: str, axis_names: Sequence[str] | None = None) -> DeviceMesh:
        """Parse `"2x4"`, `"8"` or named `"dp=2,tp=4"` (also `"dp:2 x tp:4"`)."""
        body = text.strip().replace("×", "x")
        if not body:
            raise ValueError("DeviceMesh.parse: empty mesh spec; expected e.g. '2x4' or 'dp=2,tp=4'")
        if "=" in body or ":" in body:
            body = re.sub(r"(\d)\s*x\s*(?=[A-Za-z_])", r"\1,", body)
            pairs = _NAMED_AXIS.findall(body)
            rest = _NAMED_AXIS.sub("", body).replace(",", "").replace("x", "").strip()
            if not pairs or rest:
                raise ValueError(
                    f"DeviceMesh.parse: cannot parse {text!r}; expected e.g. 'dp=2,tp=4'"
                )
            if axis_names is not None:
                raise ValueError("DeviceMesh.parse: axis names given both in text and argument")
            axis_names = [n for n, _ in pairs]
            sizes = [v for _, v in pairs]
        else:
            sizes = [s.strip() for s in body.lower().split("x")]
        try:
            shape = tuple(int(s) for s in sizes)
        except ValueError:
            raise ValueError(
                f"DeviceMesh.parse: cannot parse {text!r}; expected sizes like '2x4' or 'dp=2,tp=4'"
            ) from None
        return cls(shape, tuple(axis_names) if axis_names is not None else None)

    def __str__(self) -> str:
        if self.axis_names is None:
            return "x".join(str(s) for s in self.shape)
        return ",".join(f"{n}={s}" for n, s in zip(self.axis_names, self.shape))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape)}
        if self.axis_names is not None:
            d["axis_names"] = list(self.axis_names)
        if self.device_ids is not None:
            d["device_ids"] = list(self.device_ids)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceMesh:
        if "shape" not in d:
            raise ValueError(f"DeviceMesh.from_dict: missing 'shape' in {dict(d)}")
        names = d.get("axis_names")
        ids = d.get("device_ids")
        return cls(
            tuple(d["shape"]),
            tuple(names) if names is not None else None,
            tuple(ids) if ids is not None else None,
        )

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> DeviceMesh:
        return cls.from_dict(json.loads(text) if isinstance(text, str) else text)
