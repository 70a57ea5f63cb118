"""Every Triton kernel variant the package launches at the default shapes compiles for sm_80 (A100) and sm_90
(H100 / H200) ahead of time on a machine without a GPU, with the specialisations Triton's launcher derives from
the real arguments, and none of them spills registers.

``tests/aot/compile_kernels.py`` runs the public API at the GPU benchmark's and the GPU tests' shapes on an
emulated device, compiles what the launchers launch (every autotuning configuration included) and reads ptxas'
resource report; see its docstring. This test uses the installed Triton (CI's); ``make check-gpu-image`` runs the
same script under Triton 3.6, the GPU image's version, and ``make aot-report`` adds every gate and option.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is needed to compile the kernels")
SCRIPT = Path(__file__).parent / "aot" / "compile_kernels.py"
ARCHS = ("80", "90")


def test_launched_kernel_variants_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", *ARCHS, "--scope", "default"], env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stderr + result.stdout  # the failures close stdout
    assert result.returncode == 0, output[-6000:]
    for arch in ARCHS:
        compiled = re.search(rf"^sm_{arch}: (\d+) variants of (\d+) kernels compiled", result.stdout, re.MULTILINE)
        assert compiled and int(compiled.group(1)) > 0, output[-3000:]
