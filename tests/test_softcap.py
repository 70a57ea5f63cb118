"""Soft-capped logits (Gemma 2 / 3: ``z = c tanh(x / c)`` before the temperature) fused into both backends, against
the float64 reference with materialised logits: loss, per-token outputs and gradients, the no-grad pass included.
The cap is small enough against the logits (c = 2 for logits of spread ~3) that a backend ignoring it, or getting
its slope wrong, fails by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, max_abs

from fused_gates import gated_policy_loss, token_logprobs
from fused_gates.reference import reference_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {
    "erf-token-entropy": dict(gate="erf", tau_pos=2.0, tau_neg=3.0, entropy_coef=0.05, temperature=0.8),
    "clip-token-kl": dict(gate="clip", beta=0.05, use_bias_correction_kl=True),
    "sigmoid-sequence": dict(gate="sigmoid", importance_sampling_level="sequence", temperature=1.3),
    "cispo-dapo": dict(gate="cispo", loss_type="dapo", epsilon_high=1.2, entropy_coef=0.02),
}
TOLERANCE = {"torch": (torch.float64, 1e-10), "triton": (torch.float32, 2e-5)}


def _inputs(seed: int):
    inputs = make_inputs(batch=3, length=6, hidden_size=10, vocab=83, seed=seed)
    inputs.weight.mul_(2.5)  # logits of spread ~3: the cap c = 2 bends them a lot
    return inputs


def _run(inputs, backend, dtype, softcap, budget, **options):
    h, w, b = (t.detach().to(DEVICE).requires_grad_() for t in inputs.leaves(dtype))
    out = gated_policy_loss(h, w, inputs.ids.to(DEVICE), inputs.advantages.to(DEVICE, dtype), inputs.mask.to(DEVICE),
                            inputs.old.to(DEVICE, dtype), inputs.ref.to(DEVICE, dtype), bias=b,
                            logit_softcap=softcap, backend=backend, memory_budget_mb=budget, **options)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("budget", [0.01, 64.0], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("backend", TOLERANCE)
@pytest.mark.parametrize("name", CASES)
def test_softcapped_loss_matches_reference(name, backend, budget):
    dtype, atol = TOLERANCE[backend]
    inputs = _inputs(seed=len(name))
    options = CASES[name]
    out, grads = _run(inputs, backend, dtype, 2.0, budget, **options)
    rh, rw, rb = inputs.leaves(torch.float64)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=rb,
                         logit_softcap=2.0, **options)
    ref.loss.backward()
    assert max_abs(out.loss.cpu(), ref.loss) <= atol
    for key in ("logprobs", "entropy", "ratio", "gate_grad"):
        assert max_abs(getattr(out, key).cpu(), getattr(ref, key)) <= 10 * atol, key
    for key, ours, theirs in zip(("hidden", "weight", "bias"), grads, (rh.grad, rw.grad, rb.grad), strict=True):
        assert max_abs(ours.cpu(), theirs) <= atol, key
    uh, uw, ub = inputs.leaves(torch.float64)
    uncapped = reference_loss(uh, uw, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=ub,
                              **options)
    assert max_abs(uncapped.logprobs, ref.logprobs) > 0.1  # the cap matters in this case


@pytest.mark.parametrize("backend", TOLERANCE)
def test_softcapped_logprobs_without_gradient(backend):
    dtype, atol = TOLERANCE[backend]
    inputs = _inputs(seed=5)
    h, w, b = (t.to(DEVICE) for t in inputs.leaves(dtype))
    logp, entropy = token_logprobs(h, w, inputs.ids.to(DEVICE), inputs.mask.to(DEVICE), bias=b, temperature=0.7,
                                   logit_softcap=1.5, backend=backend)
    rh, rw, rb = inputs.leaves(torch.float64)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, bias=rb, temperature=0.7,
                         logit_softcap=1.5)
    assert max_abs(logp.cpu(), ref.logprobs) <= 10 * atol
    assert max_abs(entropy.cpu(), ref.entropy) <= 10 * atol


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")], ids=["zero", "negative", "inf"])
def test_bad_softcap_is_named(value):
    inputs = _inputs(seed=1)
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    with pytest.raises(ValueError, match="logit_softcap: must be finite and > 0"):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), logit_softcap=value)
