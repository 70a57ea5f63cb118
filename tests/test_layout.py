"""The layering the code promises: the reference is independent of the package, the kernels never import the torch
backend or the public layer, and every module says its one job in an opening docstring."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted((ROOT / "fused_gates").glob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in ``path``: level 0 for absolute imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found.extend((0, alias.name) for alias in node.names)
    return found


def test_reference_imports_nothing_from_the_package():
    imports = _imports(ROOT / "fused_gates" / "reference.py")
    assert imports, "the reference must at least import torch"
    package = [module for level, module in imports if level > 0 or module.split(".")[0] == "fused_gates"]
    assert package == [], f"fused_gates/reference.py imports {package}"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_never_import_the_torch_backend_or_the_public_layer(path):
    forbidden = {"torch_backend", "api", "function", "tokens", "arguments", "metrics", "reference"}
    for level, module in _imports(path):
        parts = module.split(".")
        if level >= 2 or parts[0] == "fused_gates":  # the package above the kernels
            assert parts[-1] not in forbidden, f"kernels/{path.name} imports {module}"


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_module_opens_with_a_docstring(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring.split()) >= 5, f"{path} has no opening docstring saying what it is for"


# ----------------------------------------------------------------------------------------------------------------
# The import graph among the package's modules, as installed: kernels/ is fused_gates.kernels, integrations/ is
# fused_gates.integrations (pyproject's package-dir)

SOURCES = {"fused_gates": ROOT / "fused_gates", "fused_gates.kernels": ROOT / "kernels",
           "fused_gates.integrations": ROOT / "integrations"}
CORE_PREFIXES = ("fused_gates.kernels",)  # with the modules directly in fused_gates/
KERNELS_MAY_NOT_IMPORT = ("fused_gates.api", "fused_gates.function", "fused_gates.torch_backend")


def _module_files() -> dict[str, Path]:
    """Installed module name -> file, for every .py of fused_gates/, kernels/ and integrations/ (recursively)."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "fused_gates" and parts and parts[0] in ("kernels", "integrations"):
                continue  # not the installed layout (a stray folder of that name inside fused_gates/)
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolved_imports(name: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in module ``name``, module-level and inside functions, relative
    imports resolved; ``from X import y`` names ``X.y`` when that is a module of the package, otherwise ``X``."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.append((child if child in MODULES else module, node.lineno))
    return found


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name in MODULES:
        edges = graph.setdefault(name, {})
        for target, line in _resolved_imports(name):
            # the deepest module of the package that the import names (``import fused_gates.kernels.x`` -> x)
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, line)
    return graph


def _where(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_sees_every_layer():
    graph = _graph()
    assert {"fused_gates.api", "fused_gates.kernels", "fused_gates.integrations"} <= set(graph)
    kernels = [m for m in graph if m.startswith("fused_gates.kernels")]
    core = [m for m in graph if _is_core(m) and m not in kernels]
    assert any(t in kernels for m in core for t in graph[m]), "the graph should see the core's imports of the kernels"
    assert any(t in core for m in kernels for t in graph[m]), "the graph should see the kernels' imports of the core"


def test_no_import_cycle_among_the_package_modules():
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"{_where(a)}:{graph[a][b]} imports {b}" for a, b in itertools.pairwise(cycle)]
        raise AssertionError(f"import cycle {' -> '.join(cycle)} ({'; '.join(steps)})")


def _is_core(module: str) -> bool:
    return module.startswith(CORE_PREFIXES) or (module.count(".") <= 1 and not module.startswith(
        "fused_gates.integrations"))


def test_the_core_never_imports_the_integrations():
    offending = [f"{_where(m)}:{line} imports {target}" for m in MODULES if _is_core(m)
                 for target, line in _resolved_imports(m)
                 if target == "fused_gates.integrations" or target.startswith("fused_gates.integrations.")]
    assert not offending, "the core (fused_gates/*.py, kernels/) imports the integrations: " + "; ".join(offending)


def test_kernels_never_import_the_public_layer_or_the_torch_backend_resolved():
    offending = [f"{_where(m)}:{line} imports {target}" for m in MODULES if m.startswith("fused_gates.kernels")
                 for target, line in _resolved_imports(m)
                 if any(target == f or target.startswith(f + ".") for f in KERNELS_MAY_NOT_IMPORT)]
    assert not offending, "; ".join(offending)
