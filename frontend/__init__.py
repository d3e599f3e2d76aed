"""Frontend: torch.export trace -> decomposition -> meshweave graph IR."""

from .convert import convert, source_line
from .trace import PRESERVED_OPS, decompose, export_model

__all__ = ["PRESERVED_OPS", "convert", "decompose", "export_model", "source_line"]
