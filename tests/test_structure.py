"""The package's shape: no import cycle between its modules, and relative imports that resolve."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_condcomp"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _from_module(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module that `from <...> import` in module `name` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = name.split(".")
    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, read from every `import` statement in its
    source, at module level or inside functions and classes. `from . import x` counts as an import
    of the submodule `x` when there is one, else of the package itself."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {name: set() for name in files}

    def known(name):
        while name and name not in files:  # `a.b.Class` -> `a.b`
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(name, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                target = known(target)
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def unresolved_relative_imports(package: Path = PACKAGE) -> list[str]:
    """Relative imports, at any level, naming a module that is not there or a name that a package's
    `__init__` does not define: what a module moved into a subpackage keeps by mistake."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}

    def top_level_names(path):
        names = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        return names

    bad = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = _from_module(name, is_package, node)
            if base not in files:
                bad.append(f"{name}:{node.lineno} imports missing module {base}")
                continue
            if files[base].name != "__init__.py":
                continue
            defined = top_level_names(files[base])
            for alias in node.names:
                if f"{base}.{alias.name}" not in files and alias.name not in defined:
                    bad.append(f"{name}:{node.lineno} imports {alias.name!r}, which {base} does not define")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "hf_condcomp.cli" in graph and "hf_condcomp.export" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_relative_imports_name_modules_that_exist():
    assert unresolved_relative_imports() == []


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])


@pytest.mark.parametrize("order", [("hf_condcomp.export", "hf_condcomp.cli"),
                                   ("hf_condcomp.cli", "hf_condcomp.export")])
def test_export_and_cli_import_in_either_order(order):
    code = "; ".join(f"import {m}" for m in order) + "; import hf_condcomp.export as e; print(e.export_native.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
