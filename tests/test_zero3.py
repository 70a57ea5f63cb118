"""DeepSpeed ZeRO-3 on CPU (gloo, 2 processes): the fused loss run inside the engine's forward gets its lm_head
gathered and gives the same gradients as a single process on the whole batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed (the 'deepspeed' extra) is needed for the ZeRO-3 test")

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))

from helpers import run_distributed  # noqa: E402
from zero3_model import BATCH, batch_for_rank, loss_options, tiny_causal_lm  # noqa: E402

from fused_gates import gated_policy_loss  # noqa: E402


def single_process_gradients():
    """Data-parallel semantics: the mean over ranks of each rank's loss, all in one process."""
    model = tiny_causal_lm()
    world = 2
    total = 0.0
    for rank in range(world):
        ids, attention, advantages, old, keep = batch_for_rank(rank, world)
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -keep - 1 : -1]
        out = gated_policy_loss(hidden, model.lm_head.weight, ids[:, -keep:], advantages, attention[:, -keep:], old,
                                **loss_options())
        (out.loss / world).backward()
        total += out.loss.item() / world
    return {n: p.grad for n, p in model.named_parameters()}, total


def test_zero3_two_processes_match_single_process(tmp_path):
    out = tmp_path / "zero3.pt"
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = run_distributed(2, [str(HERE / "zero3_worker.py"), str(out)], env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    distributed = torch.load(out)
    expected, expected_loss = single_process_gradients()
    assert BATCH % 2 == 0
    assert distributed["loss"].item() == pytest.approx(expected_loss, rel=1e-5)
    assert set(distributed["grads"]) == set(expected)
    for name, grad in expected.items():
        got = distributed["grads"][name]
        assert got.shape == grad.shape, name
        assert (got - grad).abs().max().item() <= 1e-5 * grad.abs().max().item() + 1e-8, name
