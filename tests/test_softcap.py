"""Soft-capped logits (Gemma 2 / 3: ``z = c tanh(x / c)`` before the temperature) fused into both backends, against
the float64 reference with materialised logits: loss, per-token outputs and gradients, the no-grad pass included.
The cap is small enough against the logits (c = 2 for logits of spread ~3) that a backend ignoring it, or getting
its slope wrong, fails by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, TOLERANCES, assert_matches_reference, make_inputs, max_abs, run_reference

from fused_gates import BACKENDS, gated_policy_loss, token_logprobs
from fused_gates.reference import reference_loss

CASES = {
    "erf-token-entropy": dict(gate="erf", tau_pos=2.0, tau_neg=3.0, entropy_coef=0.05, temperature=0.8),
    "clip-token-kl": dict(gate="clip", beta=0.05, use_bias_correction_kl=True),
    "sigmoid-sequence": dict(gate="sigmoid", importance_sampling_level="sequence", temperature=1.3),
    "cispo-dapo": dict(gate="cispo", loss_type="dapo", epsilon_high=1.2, entropy_coef=0.02),
}
COMPUTING_BACKENDS = [b for b in BACKENDS if b != "auto"]
DTYPE = {"torch": torch.float64, "triton": torch.float32}


def _inputs(seed: int):
    inputs = make_inputs(batch=3, length=6, hidden_size=10, vocab=83, seed=seed)
    inputs.weight.mul_(2.5)  # logits of spread ~3: the cap c = 2 bends them a lot
    return inputs


@pytest.mark.parametrize("budget", [0.01, 64.0], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_softcapped_loss_matches_reference(name, backend, budget):
    inputs = _inputs(seed=len(name))
    options = CASES[name]
    comparison = assert_matches_reference(inputs, backend=backend, dtype=DTYPE[backend], memory_budget_mb=budget,
                                          logit_softcap=2.0, **options)
    uncapped = run_reference(inputs, **options).out
    assert max_abs(uncapped.logprobs, comparison.reference.out.logprobs) > 0.1  # the cap matters in this case


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_softcapped_logprobs_without_gradient(backend):
    dtype, atol = DTYPE[backend], TOLERANCES[DTYPE[backend]].per_token
    inputs = _inputs(seed=5)
    h, w, b = (t.to(DEVICE) for t in inputs.leaves(dtype))
    logp, entropy = token_logprobs(h, w, inputs.ids.to(DEVICE), inputs.mask.to(DEVICE), bias=b, temperature=0.7,
                                   logit_softcap=1.5, backend=backend)
    rh, rw, rb = inputs.leaves(torch.float64)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, bias=rb, temperature=0.7,
                         logit_softcap=1.5)
    assert max_abs(logp.cpu(), ref.logprobs) <= atol
    assert max_abs(entropy.cpu(), ref.entropy) <= atol


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")], ids=["zero", "negative", "inf"])
def test_bad_softcap_is_named(value):
    inputs = _inputs(seed=1)
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    with pytest.raises(ValueError, match="logit_softcap: must be finite and > 0"):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), logit_softcap=value)
