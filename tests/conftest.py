import importlib.util
import os
import sys
from pathlib import Path

import pytest

# float32 products stay float32 in the tests: torch reads TORCH_ALLOW_TF32_CUBLAS_OVERRIDE once, at the first cuBLAS
# product, and with it set to 1 (as some CUDA images do) uses TF32 whatever torch.backends.cuda.matmul.allow_tf32
# says; the float32 bounds of the GPU tests would read its ~1e-3 rounding as a wrong kernel. test_gpu.py also pins
# the allow_tf32 flags off around its float32 tests.
os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"

import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/helpers.py (random inputs, comparisons, the multi-process launcher) is imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))


def _interpreter_bug() -> str | None:
    """The interpreter bug the Triton backend names (Triton < 3.8 beside NumPy >= 2.4), if this environment has it."""
    if importlib.util.find_spec("triton") is None:  # no triton: the Triton tests skip themselves, naming it
        return None
    from fused_gates.kernels.triton_backend import interpreter_bug

    return interpreter_bug()


def pytest_collection_modifyitems(config, items):
    reason = _interpreter_bug()
    if reason is None:
        return
    for item in items:
        if "triton" in item.nodeid.lower():
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def single_threaded():
    """Tiny matrices in a whole module: one OpenMP thread (``trl_fixtures.single_thread``), by
    ``pytestmark = pytest.mark.usefixtures("single_threaded")``."""
    import trl_fixtures

    with trl_fixtures.single_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The dense tiny model of ``trl_fixtures``, saved once per module (loaded by path, as users pass a name)."""
    import trl_fixtures

    return trl_fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny") / "dense", "dense")
