"""No import cycle anywhere in `leank_hf`: dependencies between its modules go one way.

The graph is read from the source with `ast`, importing nothing. An edge A -> B is any import in A that makes Python
run module B: `import leank_hf.b`, `from leank_hf.b import x`, `from .b import x`, `from . import b` (B a module), and
`from . import name` (name not a module: it reads the package's `__init__`, so that is B). Importing `leank_hf.p.b`
also runs the package `leank_hf.p` unless it is a package of A itself, which Python has run before A.

Which imports count:
- imports inside functions, methods and `try` blocks count. A lazy import that dodges a cycle at import time is still
  a cycle: each module needs the other to work, and which one loads first decides whether a call fails.
- imports under `if TYPE_CHECKING:` do not: they never run, and only give type checkers names for annotations.
- `importlib.import_module("...")` with a string is not seen; the package does not use it for its own modules.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import leank_hf

Graph = dict[str, set[str]]


def package_modules(package_dir: Path, prefix: str) -> dict[str, Path]:
    """Every module of the package in `package_dir`, by dotted name (packages by their own name), walked on disk."""
    modules = {prefix: package_dir / "__init__.py"}
    for info in pkgutil.iter_modules([str(package_dir)]):
        name = f"{prefix}.{info.name}"
        if info.ispkg:
            modules.update(package_modules(package_dir / info.name, name))
        else:
            modules[name] = package_dir / f"{info.name}.py"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST):
    """The import statements under `node` that can run: everything but the body of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for orelse in child.orelse:
                yield from _runtime_imports(ast.Module(body=[orelse], type_ignores=[]))
        else:
            yield from _runtime_imports(child)


def _targets(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of `known` that `statement`, in `module`, runs."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names if alias.name in known}
    if statement.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(statement.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{statement.module}" if statement.module else base
    else:
        source = statement.module or ""
    if source not in known:
        return set()
    submodules = {f"{source}.{alias.name}" for alias in statement.names} & known
    names_read = len(submodules) < len(statement.names)  # `from P import name` reads P's __init__ for a non-module
    return submodules | ({source} if names_read or not _is_ancestor(source, module) else set())


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(f"{package}.")


def import_graph(modules: dict[str, Path]) -> Graph:
    """Module -> the modules of the package it imports at run time (see the module docstring for the rules)."""
    known = set(modules)
    graph: Graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for statement in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(statement, module, is_package, known):
                # Running leank_hf.p.b runs the package leank_hf.p first, unless it is one of the importer's.
                parts = target.split(".")
                parents = {".".join(parts[:i]) for i in range(1, len(parts))} & known
                edges |= {target} | {p for p in parents if p != module and not _is_ancestor(p, module)}
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as [a, b, ..., a] (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, inside the component (breadth-first: a short one)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_leank_hf_has_no_import_cycle():
    modules = package_modules(Path(leank_hf.__file__).parent, "leank_hf")
    assert {"leank_hf.masks", "leank_hf.kernels.decode", "leank_hf.training.recipe"} <= set(modules)
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles in leank_hf:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_finds_cycles_through_lazy_and_relative_imports(tmp_path):
    """A package written here: a cycle closed by an import inside a function, one through `from . import name`, and
    a back-reference under TYPE_CHECKING that is no cycle."""
    files = {
        "__init__.py": "from .a import A\nfrom .sub import E\n",
        "a.py": "from . import b\nA = 1\n",
        "b.py": "def f():\n    from .a import A\n    return A\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\nelse:\n    import os\n",
        "d.py": "from .c import os\nD = 1\n",
        "sub/__init__.py": "from .e import E\n",
        "sub/e.py": "from .. import A\nE = 1\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(package_modules(tmp_path / "pkg", "pkg"))
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert graph["pkg.sub.e"] == {"pkg"}, "`from .. import A` reads the package's __init__"
    assert sorted(find_cycles(graph)) == [["pkg", "pkg.sub", "pkg.sub.e", "pkg"], ["pkg.a", "pkg.b", "pkg.a"]]
