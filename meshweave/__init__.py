"""meshweave: a model compiler for PyTorch.

    import meshweave
    cm = meshweave.compile(model, example_args, options=meshweave.CompileOptions())
    cm(*example_args)           # runs the compiled program
    print(cm.explain())         # what was traced, which passes ran, which ops fell back

Components live in meshweave.frontend, .ir, .passes, .codegen, .runtime and .models.
"""

import os as _os


def _add_source_checkout() -> None:
    """Make the component folders importable from a source checkout that was never installed.

    pyproject.toml maps meshweave.ir to ir/, meshweave.passes to passes/, and so on: every
    component folder sits beside meshweave/. An install (editable or not) carries out that mapping;
    a bare checkout (a GPU machine without network, `python benchmarks/...` from the repo root)
    gets the same mapping by searching the repository root for subpackages too.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "ir")):  # an installed copy: nothing to map
        return
    if _os.path.isfile(_os.path.join(root, "pyproject.toml")) and _os.path.isdir(
            _os.path.join(root, "ir")) and root not in __path__:
        __path__.append(root)


_add_source_checkout()

from meshweave.api import compile
from meshweave.compiled import CompiledModel
from meshweave.ir.errors import (
    FrontendError,
    MeshweaveError,
    UnsupportedOpError,
    VerificationError,
)
from meshweave.ir.mesh import DeviceMesh
from meshweave.options import CompileOptions, options_override
from meshweave.passes.quant.config import QuantConfig

__all__ = [
    "CompileOptions",
    "CompiledModel",
    "DeviceMesh",
    "FrontendError",
    "MeshweaveError",
    "QuantConfig",
    "UnsupportedOpError",
    "VerificationError",
    "compile",
    "options_override",
]
__version__ = "0.1.0"
