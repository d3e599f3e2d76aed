"""The on-disk kernel cache: one generated module per (graph, options, versions, device).

Layout: <root>/<key[:2]>/<key>/{module.py, meta.json}. The key hashes the printed IR without
source lines, the compile options that shape code, CodegenConfig, the torch and triton
versions, the device name (or "triton-interpreter") and the codegen sources themselves, so
editing codegen invalidates old entries. Writes are atomic (temp file + os.replace) and
meta.json, which carries module.py's checksum, is written last: an entry without it is a
miss, and one whose module does not match its checksum or does not import is corrupt and is
rebuilt. Entries are shared by processes; nothing here holds a lock.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import types
from typing import Any

import torch

from meshweave.ir.graph import Graph
from meshweave.ir.printer import print_graph

# Process-wide counters (hits, misses, rebuilt corrupt entries); read by tests and dumps.
STATS: collections.Counter = collections.Counter()
_CODEGEN_DIR = os.path.dirname(os.path.abspath(__file__))


def _backend_sources() -> list[str]:
    """Every module of the Triton backend (this folder and kernels/), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(_CODEGEN_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, _CODEGEN_DIR)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return sorted(out)


def codegen_version() -> str:
    """A hash of the Triton backend's sources: editing codegen invalidates old entries."""
    h = hashlib.sha256()
    for name in _backend_sources():
        with open(os.path.join(_CODEGEN_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def cache_key(graph: Graph, options: dict[str, Any], device: str) -> str:
    import triton

    h = hashlib.sha256()
    parts = [
        canonical_ir(graph),
        json.dumps(options, sort_keys=True, default=str),
        torch.__version__,
        triton.__version__,
        device,
        codegen_version(),
    ]
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:32]


_VALUE_NAME = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")


def canonical_ir(graph: Graph) -> str:
    """The printed IR without source lines or pass provenance (timings), with values renamed
    v0, v1, ... in order of appearance: torch.export's value names carry process-global
    counters, so the same program can print `%add_7` in one process and `%add_101` in
    another. The generated code only depends on positions, never on these names."""
    text = "\n".join(
        line
        for line in print_graph(graph, with_source=False).splitlines()
        if not line.startswith("# pass ")
    )
    names: dict[str, str] = {}
    return _VALUE_NAME.sub(lambda m: "%" + names.setdefault(m.group(1), f"v{len(names)}"), text)


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class CacheEntry:
    module: types.ModuleType
    meta: dict
    path: str  # module.py
    status: str  # "hit", "miss" or "rebuilt (<why>)"


class CorruptEntry(Exception):
    pass


class KernelCache:
    def __init__(self, root: str):
        self.root = root

    def entry_dir(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    def load(self, key: str) -> CacheEntry | None:
        """The entry for `key`, None on a miss; raises CorruptEntry naming what is wrong."""
        d = self.entry_dir(key)
        meta_path, mod_path = os.path.join(d, "meta.json"), os.path.join(d, "module.py")
        if not os.path.exists(meta_path):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            with open(mod_path) as f:
                source = f.read()
        except (OSError, ValueError) as e:
            raise CorruptEntry(f"unreadable entry: {e}") from e
        if meta.get("checksum") != checksum(source):
            raise CorruptEntry("module.py does not match its checksum")
        try:
            module = import_module(mod_path, key, meta["checksum"])
        except Exception as e:
            raise CorruptEntry(f"module.py does not import: {type(e).__name__}: {e}") from e
        if not callable(getattr(module, "call", None)):
            raise CorruptEntry("module.py has no call()")
        return CacheEntry(module, meta, mod_path, "hit")

    def store(self, key: str, source: str, meta: dict) -> str:
        d = self.entry_dir(key)
        os.makedirs(d, exist_ok=True)
        meta = dict(meta, checksum=checksum(source))
        mod_path = os.path.join(d, "module.py")
        atomic_write(mod_path, source)
        atomic_write(os.path.join(d, "meta.json"), json.dumps(meta, indent=1))
        return mod_path


def atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def import_module(path: str, key: str, digest: str) -> types.ModuleType:
    """Import a generated module from its file (Triton reads kernel source from the file)."""
    name = f"meshweave_kernels_{key}_{digest[:8]}"
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None) == path:
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod
