"""Settle how Triton runs before anything imports it: on the GPU, or under its interpreter.

Triton reads TRITON_INTERPRET when `triton` is first imported (its own library functions such
as tl.sigmoid are created then), so the interpreter can only be switched on before that
import. Without CUDA (or for a model living on the CPU) meshweave sets it if it still can;
if triton was already imported in GPU mode it raises, saying what to do.
"""

from __future__ import annotations

import os
import sys

import torch

from meshweave.ir.errors import MeshweaveError


class TritonModeError(MeshweaveError):
    """backend='triton' cannot run here as things stand (e.g. triton imported too early)."""


def imported_interpreted() -> bool | None:
    """None if triton is not imported yet, else whether it was imported in interpreter mode."""
    if "triton" not in sys.modules:
        return None
    import triton.language as tl

    return type(tl.sigmoid).__name__ == "InterpretedFunction"


def ensure_triton_mode(on_cuda: bool) -> bool:
    """Return True when generated kernels will run under the interpreter (CPU tensors)."""
    state = imported_interpreted()
    if state is not None:
        if not on_cuda and not state:
            raise TritonModeError(
                "backend='triton' for a model on the CPU runs the generated kernels under "
                "Triton's interpreter, which must be enabled before triton is first imported, "
                "but triton is already imported in this process without it. Set "
                "TRITON_INTERPRET=1 in the environment (or before the first `import triton`), "
                "or compile with CompileOptions(backend='eager')."
            )
        return state
    if on_cuda and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    os.environ["TRITON_INTERPRET"] = "1"  # documented in meshweave/env.py
    return True


def device_name(interpret: bool) -> str:
    if interpret or not torch.cuda.is_available():
        return "triton-interpreter"
    return torch.cuda.get_device_name()
