"""CPU benchmark of forward + backward at Qwen2.5-0.5B's lm_head (H=896, V=151,936), float32, SAPO gate.

Run: ``pytest benchmarks/ --benchmark-only --benchmark-json=out.json``. Each implementation's loss is first checked
against the naive materialised-logits loss on the same inputs. ``extra_info`` carries the peak memory beyond inputs
and gradient buffers (measured in a fresh process), the ratio of achieved to floor time and TFLOP/s of the floor's
flops (3 x 2 N H V) divided by the measured time. Tokens: B x T with ``FUSED_GATES_BENCH_B`` / ``_T`` to override.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from head_impls import IMPLEMENTATIONS, make_case, missing_dependency, naive

B = int(os.environ.get("FUSED_GATES_BENCH_B", "8"))
T = int(os.environ.get("FUSED_GATES_BENCH_T", "256"))
H, V = 896, 151_936
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def case():
    return make_case(B, T, H, V)


@pytest.fixture(scope="module")
def expected_loss(case):
    loss = naive(case)
    case.hidden.grad = case.weight.grad = None
    return loss


def _peak_memory(name: str) -> int:
    result = subprocess.run(
        [sys.executable, str(HERE / "memory_probe.py"), name, "--shape", str(B), str(T), str(H), str(V)],
        capture_output=True, text=True, check=True, cwd=HERE,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_forward_backward_cpu(benchmark, case, expected_loss, name):
    reason = missing_dependency(name)
    if reason:
        pytest.skip(reason)
    step = IMPLEMENTATIONS[name][0]

    def reset():
        case.hidden.grad = case.weight.grad = None

    if name != "floor_3_gemms":
        reset()
        loss = step(case)
        if abs(loss.item() - expected_loss.item()) > 1e-4 * max(1.0, abs(expected_loss.item())):
            pytest.fail(f"{name} computes loss {loss.item():.8f}, the naive reference {expected_loss.item():.8f}")
    benchmark.pedantic(step, args=(case,), setup=reset, rounds=2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "tokens": B * T, "hidden": H, "vocab": V, "dtype": "float32", "gate": "sigmoid",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "floor_tflops_per_s": case.flops_floor / seconds / 1e12,
        "peak_extra_bytes": _peak_memory(name),
    })
