"""The layering the code promises: the reference is independent of the package, the kernels never import the torch
backend or the public layer, and every module says its one job in an opening docstring."""

from __future__ import annotations

import ast
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
