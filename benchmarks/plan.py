"""The rows the GPU check measures, in its order (``benchmarks/gpu_check.sh``): each benchmark set of
``test_head.py`` with the CUDA profile, and the end-to-end step of ``test_grpo_step.py``.

    python benchmarks/plan.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("FUSED_GATES_BENCH_PROFILE", "cuda")
os.environ.setdefault("FUSED_GATES_BENCH_DEVICE", "cuda")
os.environ.setdefault("FUSED_GATES_BENCH_SCALE", "full")
sys.path.insert(0, str(Path(__file__).parent))

import test_grpo_step
import test_head

CHECK_ORDER = ("goal", "e2e", "goal-extra", "small-head", "sweep")  # gpu_check.sh's order


def planned() -> list[tuple[str, str]]:
    rows = []
    for row_set in CHECK_ORDER:
        if row_set == "e2e":
            rows += [(row_set, f"test_grpo_step[{name}] ({test_grpo_step.MODEL}, {test_grpo_step.BATCH} x "
                               f"{test_grpo_step.COMPLETION})") for name in test_grpo_step.TRAINERS]
            continue
        rows += [(row_set, f"test_{row.mode}[{row.id}]") for row in test_head.ROWS if row_set in row.sets]
        if row_set in test_head.SWEEP_SETS:
            rows += [(row_set, f"test_gate_sweep[{gate}] ({test_head.SWEEP_SHAPE.id})") for gate in test_head.GATES]
    return rows


if __name__ == "__main__":
    rows = planned()
    print(f"{len(rows)} rows planned on CUDA, in order:")
    for row_set, name in rows:
        print(f"  [{row_set}] {name}")
