"""meshweave: a model compiler for PyTorch.

    import meshweave
    cm = meshweave.compile(model, example_args, options=meshweave.CompileOptions())
    cm(*example_args)           # runs the compiled program
    print(cm.explain())         # what was traced, which passes ran, which ops fell back

Components live in meshweave.frontend, .ir, .passes, .codegen, .runtime and .models.
"""

from meshweave.api import compile
from meshweave.compiled import CompiledModel
from meshweave.ir.errors import (
    FrontendError,
    MeshweaveError,
    UnsupportedOpError,
    VerificationError,
)
from meshweave.options import CompileOptions, options_override

__all__ = [
    "CompileOptions",
    "CompiledModel",
    "FrontendError",
    "MeshweaveError",
    "UnsupportedOpError",
    "VerificationError",
    "compile",
    "options_override",
]
__version__ = "0.1.0"
