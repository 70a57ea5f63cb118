"""A call reads the device once: the value checks and the plan's sizes come back in one host synchronisation (on a
GPU every read stalls the launch queue). Counted by wrapping every tensor method that copies a value to the host."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

from fused_gates import gated_policy_loss, token_logprobs

READS = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    counted: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            counted.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        counted.append("torch.nonzero")
        return original_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    return counted


CALLS = {
    "token-level-masked": dict(gate="sigmoid"),
    "sequence-level-whole-rows": dict(gate="sigmoid", importance_sampling_level="sequence", memory_budget_mb=0.01),
    "clip-dapo-kl-entropy": dict(gate="clip", loss_type="dapo", beta=0.04, entropy_coef=0.01),
    "zero-policy": dict(gate="erf", on_nonfinite="zero"),
}


@pytest.mark.parametrize("options", CALLS.values(), ids=CALLS.keys())
def test_the_loss_forward_reads_the_device_once(options, host_reads):
    b = make_inputs(batch=4, length=9, hidden_size=8, vocab=41, seed=1)
    hidden, weight, _ = b.leaves(torch.float32, bias=False)
    out = gated_policy_loss(hidden, weight, b.ids, b.advantages.float(), b.mask, b.old.float(), b.ref.float(),
                            backend="torch", **options)
    assert host_reads == ["tolist"], f"host reads in one forward: {host_reads}"
    assert torch.isfinite(out.loss.detach())


def test_token_logprobs_reads_the_device_once(host_reads):
    b = make_inputs(batch=3, length=7, hidden_size=8, vocab=41, seed=2)
    token_logprobs(b.hidden.float(), b.weight.float(), b.ids, b.mask, backend="torch")
    assert host_reads == ["tolist"], f"host reads: {host_reads}"
