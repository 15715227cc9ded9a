"""Import cycles among the modules of a package: every import counts, lazy ones inside functions too.

    python tools/import_cycles.py [package_dir]      # default: ffkernels; exit 1 and list them if any

An edge A -> B is an ``import``/``from ... import`` in A's source that names module B of the package.
``from pkg import name`` imports ``pkg`` when its ``__init__`` binds ``name``, else the submodule ``pkg.name``
(as Python resolves it; a compiled extension such as ``_C`` is a leaf).
Parent packages that Python initializes implicitly are not edges: only what the source says.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(pkg_dir: Path) -> dict:
    """{dotted module name: path} for every .py file under the package folder."""
    root = pkg_dir.parent
    mods = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def top_level_names(path: Path) -> set:
    """Names a module binds at its top level (imports, assignments, defs, classes)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def imports_of(name: str, path: Path, mods: dict) -> set:
    """The package modules that module ``name`` (at ``path``) imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif target in mods and a.name in top_level_names(mods[target]):
                    out.add(target)
    out.discard(name)
    return out


def cycles(pkg_dir: Path) -> list:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    mods = module_names(pkg_dir)
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pkg = Path(argv[0] if argv else Path(__file__).resolve().parent.parent / "ffkernels")
    found = cycles(pkg)
    for comp in found:
        print("cycle among: " + ", ".join(comp))
    print(f"{len(found)} import cycle(s) in {pkg.name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
