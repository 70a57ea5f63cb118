"""A token with a non-finite hidden state (e.g. a bf16 overflow in the backbone) is never silent: ``raise`` names
``hidden`` before any product, ``zero`` drops the token exactly as if it were masked, ``propagate`` lets NaN through;
``metrics["nonfinite_tokens"]`` counts such tokens in every mode. Both backends (Triton in its interpreter)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, Run, Tolerance, assert_within, make_inputs, max_abs, output_errors, run_reference

from fused_gates import BACKENDS, gated_policy_loss, token_logprobs
from fused_gates.reference import reference_loss

COMPUTING_BACKENDS = [b for b in BACKENDS if b != "auto"]
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
AS_IF_MASKED = Tolerance(loss=1e-5, per_token=1e-4, metrics=2e-5, grad=1e-5)
OPTIONS = dict(gate="arctan", tau_pos=2.0, tau_neg=3.0, loss_type="grpo", entropy_coef=0.01, group_size=2)


def _inputs():
    inputs = make_inputs(batch=4, length=6, hidden_size=10, vocab=53, seed=31)
    inputs.mask[0, 2] = 1  # the poisoned token is a valid one
    inputs.mask[3, 5] = 0  # and this masked one is poisoned too, which must not matter
    return inputs


def _run(inputs, backend, poison: float | None, dtype=torch.float32, **overrides):
    h, w, b = inputs.leaves(dtype)
    h = h.detach().clone()
    if poison is not None:
        h[0, 2, 3] = poison
        h[3, 5, 0] = poison
    h, w, b = (t.to(DEVICE).requires_grad_() for t in (h, w, b))
    options = {**OPTIONS, **overrides}
    out = gated_policy_loss(h, w, inputs.ids.to(DEVICE), inputs.advantages.to(DEVICE, dtype), inputs.mask.to(DEVICE),
                            inputs.old.to(DEVICE, dtype), bias=b, backend=backend, **options)
    return out, (h, w, b)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_raise_names_hidden_and_the_count(backend, value):
    with pytest.raises(ValueError, match=r"hidden: 1 token\(s\) where the mask is set have non-finite"):
        _run(_inputs(), backend, value)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_zero_drops_the_token_as_if_it_were_masked(backend, value):
    inputs = _inputs()
    out, (h, w, b) = _run(inputs, backend, value, on_nonfinite="zero")
    out.loss.backward()
    assert out.metrics["nonfinite_tokens"].item() == 1
    assert out.logprobs[0, 2].item() == 0 and out.gate_grad[0, 2].item() == 0

    masked = _inputs()
    masked.mask[0, 2] = 0
    errors = output_errors(Run(out, (h.grad, w.grad, b.grad)), run_reference(masked, dtype=torch.float32, **OPTIONS))
    # every field as the reference with the token masked, but the count of the dropped token
    assert_within(errors, AS_IF_MASKED, against="the reference with the token masked",
                  ignore=("metrics[nonfinite_tokens]",))
    grad_h = h.grad.cpu()
    assert torch.isfinite(grad_h).all() and grad_h[0, 2].abs().max() == 0


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_propagate_lets_nan_through_and_counts_it(backend):
    out, _ = _run(_inputs(), backend, float("nan"), on_nonfinite="propagate")
    assert torch.isnan(out.loss)
    assert out.metrics["nonfinite_tokens"].item() == 1


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_finite_inputs_count_zero(backend):
    out, _ = _run(_inputs(), backend, None)
    assert out.metrics["nonfinite_tokens"].item() == 0


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_nonfinite_weight_is_counted_at_every_token(backend):
    inputs = _inputs()
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    w = w.detach().clone()
    w[5, 0] = float("nan")
    out = gated_policy_loss(h.to(DEVICE), w.to(DEVICE), inputs.ids.to(DEVICE), inputs.advantages.float().to(DEVICE),
                            inputs.mask.to(DEVICE), inputs.old.float().to(DEVICE), backend=backend, **OPTIONS)
    assert out.metrics["nonfinite_tokens"].item() == int((inputs.mask != 0).sum())


def test_zero_also_drops_tokens_with_nonfinite_old_logprobs():
    inputs = _inputs()
    inputs.old[1, 1] = float("nan")
    inputs.mask[1, 1] = 1
    h, w, b = inputs.leaves()
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, bias=b,
                            on_nonfinite="zero", **OPTIONS)
    masked = _inputs()
    masked.mask[1, 1] = 0
    rh, rw, rb = masked.leaves()
    ref = reference_loss(rh, rw, masked.ids, masked.advantages, masked.mask, masked.old, bias=rb, **OPTIONS)
    assert out.metrics["nonfinite_tokens"].item() == 1
    assert max_abs(out.loss, ref.loss) < 1e-12
    with pytest.raises(ValueError, match="old_logprobs: must be finite where the mask is set"):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, bias=b, **OPTIONS)


def test_token_logprobs_raises_or_propagates():
    inputs = _inputs()
    h = inputs.hidden.clone()
    h[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="hidden: 1 token"):
        token_logprobs(h, inputs.weight, inputs.ids, inputs.mask)
    logp, _ = token_logprobs(h, inputs.weight, inputs.ids, inputs.mask, on_nonfinite="propagate")
    assert torch.isnan(logp[0, 2]) and torch.isfinite(logp[1:]).all()
    with pytest.raises(ValueError, match="on_nonfinite: unknown policy 'zero'"):
        token_logprobs(h, inputs.weight, inputs.ids, inputs.mask, on_nonfinite="zero")


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="on_nonfinite: unknown policy 'skip'"):
        _run(_inputs(), "torch", None, on_nonfinite="skip")
