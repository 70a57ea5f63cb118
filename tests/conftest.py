import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/helpers.py (random inputs, comparisons, the multi-process launcher) is imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))


def _interpreter_bug() -> str | None:
    """Triton before 3.8 cannot interpret the kernels beside NumPy 2.4 or newer (its tl.tensor.__index__ calls int()
    on a 1-element array); the kernels themselves are fine (compiled, and in newer interpreters)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    triton_version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if triton_version < (3, 8) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter bug with NumPy {numpy.__version__}: int() of a "
                "1-element array in tl.tensor.__index__ (use numpy<2.4 or triton>=3.8)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _interpreter_bug()
    if reason is None:
        return
    for item in items:
        if "triton" in item.nodeid.lower():
            item.add_marker(pytest.mark.skip(reason=reason))
