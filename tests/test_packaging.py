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
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    # the two rooms of the integrations: the TRL library and the paper's application
    assert {"fused_gates/integrations/trl/trainer.py", "fused_gates/integrations/app/train.py"} <= set(names)


def test_installed_wheel_imports_subpackages_and_no_top_level_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = (
        "import importlib.util, fused_gates, fused_gates.kernels, fused_gates.integrations;"
        f"assert fused_gates.__file__.startswith({str(target)!r}), fused_gates.__file__;"
        # a top-level ``kernels`` may exist (Hugging Face's kernel hub, which transformers depends on), never ours
        "spec = importlib.util.find_spec('kernels');"
        f"assert spec is None or not spec.origin.startswith({str(target)!r});"
        "assert importlib.util.find_spec('integrations') is None;"
        "print('ok')"
    )
    # run from an empty folder with only the installed copy (and torch's site-packages) importable
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", f"import site; site.main(); {probe}"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------------------
# From a checkout's root the kernels/ folder is importable as top-level ``kernels``, the name of Hugging Face's
# kernel hub, which transformers imports: the folder hands the name over (kernels/__init__.py)


def _import_kernels_from_the_checkout_root(code: str, *python_flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-c", f"import sys; sys.path.insert(0, ''); {code}"],
                          cwd=ROOT, capture_output=True, text=True)


def test_top_level_kernels_from_the_checkout_root_is_the_installed_kernel_hub():
    pytest.importorskip("kernels", reason="the kernel hub package kernels (a transformers dependency) is not installed")
    result = _import_kernels_from_the_checkout_root(
        "import kernels, fused_gates.kernels.row_kernels; from kernels import CUDAProperties;"
        "from transformers import TrainerCallback; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(ROOT / "kernels")), result.stdout


def test_top_level_kernels_without_the_kernel_hub_is_a_missing_module_naming_fused_gates_kernels():
    # -S: no site-packages, so no installed ``kernels``; the checkout's folder must not pose as one
    result = _import_kernels_from_the_checkout_root("import kernels", "-S")
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr
    assert "fused_gates.kernels" in result.stderr
