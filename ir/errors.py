"""Typed errors. Each carries what is needed to reproduce or locate the problem."""

from __future__ import annotations


class MeshweaveError(Exception):
    """Base class for meshweave errors."""


class UnsupportedOpError(MeshweaveError):
    """An op has no registry entry (or no rule in a table) and fallback is off."""

    def __init__(self, op: str, source: str = "", what: str = "op registry", hint: str = ""):
        self.op = op
        self.source = source
        where = f" at {source}" if source else ""
        fix = hint or "pass CompileOptions(eager_fallback=True) to run it through torch eager"
        super().__init__(f"unsupported op {op}{where}: no entry in the {what}; {fix}")


class VerificationError(MeshweaveError):
    """The IR broke an invariant. Names the node and, when known, the pass that broke it."""

    def __init__(self, message: str, node: str = "", after_pass: str = ""):
        self.node = node
        self.after_pass = after_pass
        parts = [message]
        if node:
            parts.append(f"at {node}")
        if after_pass:
            parts.append(f"after pass {after_pass!r}")
        super().__init__("; ".join(parts))


class FrontendError(MeshweaveError):
    """torch.export could not trace the model, or its output could not be converted."""
