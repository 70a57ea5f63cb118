"""Extreme but valid inputs stay finite; degenerate batches behave."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import Tolerance, assert_matches_reference, make_inputs, max_abs

from fused_gates import PAPER_GATES, gated_policy_loss, token_logprobs
from fused_gates.reference import reference_loss


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("gate", PAPER_GATES)
def test_log_ratios_of_plus_minus_80_give_finite_loss_and_gradients(gate, level):
    inputs = make_inputs(batch=4, length=6, hidden_size=8, vocab=29, seed=7)
    h, w, b = inputs.leaves(torch.float32)
    # old log-probs 80 nats away from the policy's: log-ratios of about +80 on odd rows and -80 on even rows
    shift = torch.full((4, 6), 80.0)
    shift[0::2] = -80.0
    old = inputs.old.float() - shift
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), inputs.mask, old, inputs.ref.float(),
                            bias=b, gate=gate, importance_sampling_level=level, beta=0.1, tau_pos=10.0, tau_neg=12.0)
    valid = inputs.mask.bool()
    assert out.ratio[valid].max() > 1e30 and out.ratio[valid].min() < 1e-30
    out.loss.backward()
    for t in (out.loss, h.grad, w.grad, b.grad, out.ratio, out.gate_grad, *out.metrics.values()):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("gate", PAPER_GATES)
def test_all_masked_batch_gives_zero_loss_and_zero_gradients(gate):
    inputs = make_inputs(seed=3)
    h, w, b = inputs.leaves(torch.float32)
    mask = torch.zeros_like(inputs.mask)
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), mask, inputs.old.float(), bias=b, gate=gate,
                            entropy_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0
    for value in out.metrics.values():
        assert torch.isfinite(value).all()


def test_single_token_batch_matches_reference():
    inputs = make_inputs(batch=1, length=1, hidden_size=5, vocab=7, seed=2, masked_row=False,
                         zero_advantage_row=False)
    assert_matches_reference(replace(inputs, mask=None, ref=None), tolerances=Tolerance.uniform(1e-12), gate="erf")


def test_vocabulary_not_a_multiple_of_the_block():
    from fused_gates.torch_backend import VOCAB_BLOCK

    vocab = 2 * VOCAB_BLOCK + 37
    inputs = make_inputs(batch=2, length=3, hidden_size=6, vocab=vocab, seed=4)
    assert_matches_reference(replace(inputs, ref=None), tolerances=Tolerance.uniform(1e-12), entropy_coef=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs_give_finite_results_in_their_dtype(dtype):
    inputs = make_inputs(seed=5)
    h, w, b = inputs.leaves(dtype)
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages.to(dtype), inputs.mask, inputs.old.to(dtype), bias=b)
    out.loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_frozen_head_gets_no_weight_gradient_and_hidden_gradient_is_unchanged():
    inputs = make_inputs(seed=6)
    h, w, _ = inputs.leaves(bias=False)
    w.requires_grad_(False)
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old)
    out.loss.backward()
    assert w.grad is None
    h2, w2, _ = inputs.leaves(bias=False)
    gated_policy_loss(h2, w2, inputs.ids, inputs.advantages, inputs.mask, inputs.old).loss.backward()
    assert max_abs(h.grad, h2.grad) < 1e-14


def test_upstream_gradient_scales_the_result():
    inputs = make_inputs(seed=6)
    h, w, b = inputs.leaves()
    (gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, bias=b).loss * 0.25).backward()
    h2, w2, b2 = inputs.leaves()
    gated_policy_loss(h2, w2, inputs.ids, inputs.advantages, inputs.mask, inputs.old, bias=b2).loss.backward()
    assert max_abs(h.grad, 0.25 * h2.grad) < 1e-14 and max_abs(w.grad, 0.25 * w2.grad) < 1e-14


def test_no_grad_call_returns_the_same_loss():
    inputs = make_inputs(seed=6)
    h, w, _ = inputs.leaves(bias=False)
    with torch.no_grad():
        loss_no_grad = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old).loss
    loss = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old).loss
    assert not loss_no_grad.requires_grad and loss.requires_grad
    assert max_abs(loss_no_grad, loss) < 1e-14


def test_token_logprobs_match_the_loss_outputs():
    inputs = make_inputs(seed=8)
    h, w, b = inputs.leaves()
    logp, entropy = token_logprobs(h, w, inputs.ids, inputs.mask, bias=b, temperature=0.9)
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, bias=b, temperature=0.9)
    assert max_abs(logp, out.logprobs) < 1e-14 and max_abs(entropy, out.entropy) < 1e-14


def test_autocast_computes_in_the_autocast_dtype():
    inputs = make_inputs(seed=9)
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), inputs.mask, inputs.old.float())
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    rh, rw, _ = inputs.leaves(torch.float64, bias=False)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, inputs.old)
    assert abs(out.loss.item() - ref.loss.item()) < 5e-2
