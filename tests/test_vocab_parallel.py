"""The vocabulary-parallel head on CPU (gloo, 2 and 3 processes launched here): each rank's slice of the lm_head
(even and uneven slices, a target token on every slice, a fully masked row) gives the same loss, per-token outputs
and metrics, the full hidden gradient and its slice of the weight / bias gradient as the whole head in one process:
float64 to 1e-10 over every gate and TRL objective, loss type, sequence-level ratios, KL, entropy bonus, temperature
and soft-cap, with several chunks (two reductions each) and one; float32 and the Triton kernels (interpreter) on a
subset; a DTensor weight sharded on dimension 0; and errors that name the argument when ranks disagree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_distributed

WORKER = Path(__file__).parent / "vocab_parallel" / "worker.py"


def _launch(slices: list[int], checks: str, worker: Path = WORKER):
    return run_distributed(len(slices), [str(worker), ",".join(map(str, slices)), checks],
                           env={"TRITON_INTERPRET": "1"})


LAUNCHES = {
    "2-ranks-even": ([18, 18], "float64,float32,dtensor,logprobs"),
    "3-ranks-uneven": ([10, 15, 12], "float64,triton,logprobs"),
}


@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_sliced_head_matches_the_whole_head(launch):
    slices, checks = launch
    result = _launch(slices, checks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == len(slices)


ERRORS_WORKER = '''
import sys
import torch
import torch.distributed as dist
from fused_gates import gated_policy_loss
dist.init_process_group("gloo")
rank = dist.get_rank()
hidden = torch.randn(2, 3, 5 if rank == 0 or sys.argv[2] != "hidden" else 6)
weight = torch.randn(4, hidden.shape[-1]) if sys.argv[2] != "empty" or rank == 0 else torch.randn(0, 5)
try:
    gated_policy_loss(hidden, weight, torch.zeros(2, 3, dtype=torch.long), torch.ones(2),
                      process_group=dist.group.WORLD)
except ValueError as error:
    print(f"rank {rank}: ValueError: {error}")
dist.destroy_process_group()
'''


@pytest.mark.parametrize("case,message", [("hidden", "hidden: the ranks of process_group disagree on hidden (H)"),
                                          ("empty", "weight: every rank of process_group must hold a non-empty")])
def test_ranks_that_disagree_get_an_error_naming_the_argument(tmp_path, case, message):
    worker = tmp_path / "errors.py"
    worker.write_text(ERRORS_WORKER)
    result = _launch([0, 0], case, worker)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(message) == 2, result.stdout + result.stderr[-2000:]


def test_tensor_parallel_example_runs_and_agrees_with_the_gathered_head(tmp_path):
    """README's torchrun example, at a tiny size, with its benchmark mode writing a row per rank."""
    out = tmp_path / "tp.jsonl"
    result = run_distributed(2, ["-m", "fused_gates.integrations.tensor_parallel", "--vocab", "101", "--hidden-size",
                                 "16", "--length", "8", "--benchmark", "sharded", "--repeats", "1", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    # the two ranks print concurrently: their lines may interleave, so read the numbers, not the lines
    differences = [float(x) for x in re.findall(r"(?:loss|hidden grad|weight grad \(this slice\)) (\d\.\d+e[+-]\d+)",
                                                result.stdout)]
    assert len(differences) == 6, result.stdout
    assert max(differences) < 1e-5, result.stdout
    assert len(out.read_text().splitlines()) == 2
