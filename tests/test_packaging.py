"""The wheel installs one import name, fused_gates, with kernels/ and integrations/ inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
    )
    (path,) = out.glob("fused_gates-*.whl")
    return path


def test_wheel_holds_only_the_fused_gates_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fused_gates"}
    assert "fused_gates/kernels/__init__.py" in names
    assert "fused_gates/integrations/__init__.py" in names
    assert "fused_gates/integrations/accelerate/zero3.yaml" in names  # accelerate configs ship with the wheel
    # the two rooms of the integrations: the TRL library and the paper's application
    assert {"fused_gates/integrations/trl/trainer.py", "fused_gates/integrations/app/train.py"} <= set(names)


def test_installed_wheel_imports_subpackages_and_no_top_level_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = (
        "import importlib.util, fused_gates, fused_gates.kernels, fused_gates.integrations;"
        f"assert fused_gates.__file__.startswith({str(target)!r}), fused_gates.__file__;"
        "assert importlib.util.find_spec('kernels') is None;"
        "assert importlib.util.find_spec('integrations') is None;"
        "print('ok')"
    )
    # run from an empty folder with only the installed copy (and torch's site-packages) importable
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", f"import site; site.main(); {probe}"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
