"""The package's import graph, built from the source with `ast` (nothing is imported).

    python tests/import_graph.py        # prints every circle and the fullest folders

Module names follow pyproject's mapping: `meshweave.X...` lives in the root folder `X/`
(`meshweave.codegen.triton.lowering` is `codegen/triton/lowering.py`), except the public API
`meshweave.<name>`, which lives in `meshweave/`. Every import counts, deferred ones inside
functions included. `from pkg import name` is an edge to `pkg.name` when that is a module, else
to `pkg` itself (its `__init__.py`). Parents' `__init__` files, which Python runs first, are not
edges: a circle here is one between the files a reader opens. Imports under
`if TYPE_CHECKING:` never run and name types for annotations only, so they are not edges.
"""

from __future__ import annotations

import ast
import os
import sys

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("ir", "frontend", "passes", "codegen", "runtime", "models")
# The one allowed circle: the op registry loads ir/ops on first lookup, and each ops module
# registers itself with the registry.
ALLOWED_EDGES = {("meshweave.ir.registry", "meshweave.ir.ops")}


def module_files() -> dict[str, str]:
    """Module name -> file path, for every .py file of the package."""
    out: dict[str, str] = {}
    for top in ("meshweave",) + COMPONENTS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, ROOT).split(os.sep)
            pkg = ["meshweave"] + (rel[1:] if rel[0] == "meshweave" else rel)
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                parts = pkg if f == "__init__.py" else pkg + [f[:-3]]
                out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _resolve_base(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = mod.split(".")
    if not is_pkg:
        parts = parts[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                out.update(id(x) for x in ast.walk(inner))
    return out


def build_graph() -> nx.DiGraph:
    files = module_files()
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_base(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                # `import meshweave.a.b` names the deepest module that exists.
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and (mod, t) not in ALLOWED_EDGES:
                    g.add_edge(mod, t, line=getattr(node, "lineno", 0))
    return g


def circles(g: nx.DiGraph) -> list[list[str]]:
    """Each strongly connected component of more than one module, sorted."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def flat_module_counts() -> dict[str, int]:
    """Folder -> number of .py modules directly in it (`__init__.py` not counted)."""
    out = {}
    for top in ("meshweave",) + COMPONENTS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            n = sum(f.endswith(".py") and f != "__init__.py" for f in filenames)
            out[os.path.relpath(dirpath, ROOT)] = n
    return out


if __name__ == "__main__":
    graph = build_graph()
    found = circles(graph)
    for c in found:
        print("circle:", " ".join(c))
        for a in c:
            for b in c:
                if graph.has_edge(a, b):
                    print(f"    {a} -> {b} (line {graph.edges[a, b]['line']})")
    for folder, n in sorted(flat_module_counts().items(), key=lambda kv: -kv[1])[:8]:
        print(f"{n:3d} modules  {folder}")
    sys.exit(1 if found else 0)
