"""Every Triton kernel compiles to a cubin for sm_90 (H100 / H200), ahead of time, on a machine without a GPU.

The interpreter tests run the kernels' Python; only the compiler checks types of loop-carried values, constexpr
branches, tl.dot layouts and the autotuning configurations' register limits. Compiled with the installed Triton
(3.9 here; the GPU machines run 3.6, so this is a check of our code, not of that version).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is needed to compile the kernels")
SCRIPT = Path(__file__).parent / "aot" / "compile_kernels.py"


def test_all_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "kernel variants for sm_90" in result.stdout
