"""Typed errors of the distributed runtime."""

from __future__ import annotations

from ...ir.errors import MeshweaveError


class DistributedError(MeshweaveError):
    """A rank failed, died or timed out, or the mesh does not fit the world.

    `rank` is the failing rank (None when the failure is not one rank's), `detail` the text of
    its exception (with traceback when it was passed back).
    """

    def __init__(self, message: str, rank: int | None = None, detail: str = ""):
        self.rank = rank
        self.detail = detail
        super().__init__(message + (f"\n{detail}" if detail else ""))
