"""The torch backend against the naive float64 reference: loss, per-token outputs, metrics and gradients."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch
from helpers import assert_matches_reference, make_inputs, max_abs, run_loss, run_reference

from fused_gates import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PAPER_GATES

# Every option at once: KL with bias correction, entropy bonus, temperature, lm_head bias, masks, A = 0 rows.
ALL_OPTIONS = dict(
    tau_pos=2.0,
    tau_neg=3.0,
    epsilon_low=0.2,
    epsilon_high=0.28,
    max_completion_length=9,
    beta=0.04,
    use_bias_correction_kl=True,
    temperature=0.7,
    entropy_coef=0.01,
)
# memory budgets that force one-token chunks, a few chunks, and a single chunk
BUDGETS = {"one_token_chunks": 1e-4, "few_chunks": 0.02, "single_chunk": 64.0}


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", PAPER_GATES)
def test_every_gate_loss_type_and_level_matches_reference_with_all_options(gate, loss_type, level):
    inputs = make_inputs(seed=zlib.crc32(f"{gate}-{loss_type}-{level}".encode()) % 1000)
    options = dict(ALL_OPTIONS, gate=gate, loss_type=loss_type, importance_sampling_level=level)
    assert_matches_reference(inputs, memory_budget_mb=0.02, **options)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_chunking_does_not_change_results(budget, level):
    inputs = make_inputs(batch=5, length=11, hidden_size=9, vocab=53, seed=3)
    options = dict(ALL_OPTIONS, gate="erf", importance_sampling_level=level)
    assert_matches_reference(inputs, memory_budget_mb=budget, **options)


@pytest.mark.parametrize("gate", PAPER_GATES)
def test_on_policy_default_options_match_reference(gate):
    inputs = replace(make_inputs(seed=11), old=None)  # ratio 1, gradient of TRL's detach trick
    comparison = assert_matches_reference(inputs, gate=gate, bias=False)
    assert torch.all(comparison.ours.out.ratio[inputs.mask.bool()] == 1)


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
def test_token_level_advantages_match_reference(level):
    inputs = make_inputs(seed=5, token_advantages=True)
    assert_matches_reference(inputs, **ALL_OPTIONS, gate="clip", importance_sampling_level=level)


@pytest.mark.parametrize("num_items", [None, 50.0], ids=["default_items", "given_items"])
def test_dapo_normaliser(num_items):
    inputs = make_inputs(seed=2)
    assert_matches_reference(inputs, gate="sigmoid", loss_type="dapo", num_items_in_batch=num_items)


@pytest.mark.parametrize("gate", ["clip", "sigmoid"])
def test_eur_is_exact_per_prompt_group(gate):
    inputs = make_inputs(batch=6, seed=8, log_ratio_scale=1.0)
    comparison = assert_matches_reference(inputs, gate=gate, group_size=3, tau_pos=10.0, tau_neg=12.0)
    assert comparison.errors["eur"] <= 1e-12
    # the group mean differs from the plain token mean for these uneven masks
    flat = run_loss(inputs, gate=gate, tau_pos=10.0, tau_neg=12.0, backward=False).out
    assert abs(flat.eur.item() - comparison.ours.out.eur.item()) > 1e-6


def test_eur_is_one_minus_region_clip_fraction_for_clip():
    out = run_loss(make_inputs(seed=4, log_ratio_scale=0.5), gate="clip", backward=False).out
    region = out.metrics["clip_ratio/region_mean"]
    assert 0 < region.item() < 1
    assert abs(out.eur.item() - (1 - region.item())) <= 1e-12


@pytest.mark.parametrize("gate", ["clip", "sigmoid", "erf"])
def test_float32_inputs_match_reference(gate):
    inputs = make_inputs(batch=3, length=9, hidden_size=24, vocab=203, seed=6)
    assert_matches_reference(inputs, dtype=torch.float32, memory_budget_mb=0.05, **ALL_OPTIONS, gate=gate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_is_no_worse_than_naive_same_dtype(dtype):
    """Judged like CCE: our error from the float64 truth of the same rounded inputs against the error of the naive
    implementation computing in the same dtype."""
    inputs = make_inputs(batch=4, length=9, hidden_size=40, vocab=211, seed=9)
    options = dict(ALL_OPTIONS, gate="sigmoid")
    ours = run_loss(inputs, dtype=dtype, memory_budget_mb=0.05, **options)
    truth = run_reference(inputs, dtype=dtype, **options)
    naive = run_reference(inputs, dtype=dtype, compute_dtype=dtype, **options)
    (h_grad, w_grad, _) = ours.grads
    assert ours.out.loss.dtype == torch.float32 and h_grad.dtype == dtype and w_grad.dtype == dtype
    pairs = [(ours.out.loss, naive.out.loss, truth.out.loss)]
    pairs += list(zip(ours.grads, naive.grads, truth.grads, strict=True))
    for mine, theirs, exact in pairs:
        assert max_abs(mine.cpu(), exact) <= max_abs(theirs, exact) + 1e-3
