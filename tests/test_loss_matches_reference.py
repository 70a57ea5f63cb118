"""The torch backend against the naive float64 reference: loss, per-token outputs, metrics and gradients."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import make_inputs, max_abs

from fused_gates import gated_policy_loss
from fused_gates.reference import reference_loss

GATES = ["clip", "sigmoid", "erf", "arctan", "softsign"]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]

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


def run_both(inputs, *, dtype=torch.float64, with_bias=True, **options):
    h, w, b = inputs.leaves(dtype, bias=with_bias)
    budget = options.pop("memory_budget_mb", None)
    old = None if inputs.old is None else inputs.old.to(dtype)
    out = gated_policy_loss(
        h, w, inputs.ids, inputs.advantages.to(dtype), inputs.mask, old, inputs.ref.to(dtype),
        bias=b, memory_budget_mb=budget, **options,
    )
    out.loss.backward()
    rh, rw, rb = inputs.leaves(torch.float64, bias=with_bias)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=rb, **options)
    ref.loss.backward()
    return (out, (h, w, b)), (ref, (rh, rw, rb))


def assert_matches(ours, theirs, atol: float):
    (out, (h, w, b)), (ref, (rh, rw, rb)) = ours, theirs
    assert max_abs(out.loss, ref.loss) <= atol
    for name in ("logprobs", "entropy", "ratio", "gate_value", "gate_grad"):
        assert max_abs(getattr(out, name), getattr(ref, name)) <= atol * 10, name
    assert max_abs(out.eur, ref.eur) <= atol
    assert set(out.metrics) == set(ref.metrics)
    for key, value in ref.metrics.items():
        assert max_abs(out.metrics[key], value) <= atol * 10, key
    assert max_abs(h.grad, rh.grad) <= atol
    assert max_abs(w.grad, rw.grad) <= atol
    if b is not None:
        assert max_abs(b.grad, rb.grad) <= atol


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", GATES)
def test_every_gate_loss_type_and_level_matches_reference_with_all_options(gate, loss_type, level):
    inputs = make_inputs(seed=zlib.crc32(f"{gate}-{loss_type}-{level}".encode()) % 1000)
    options = dict(ALL_OPTIONS, gate=gate, loss_type=loss_type, importance_sampling_level=level)
    assert_matches(*run_both(inputs, memory_budget_mb=0.02, **options), atol=1e-10)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("level", LEVELS)
def test_chunking_does_not_change_results(budget, level):
    inputs = make_inputs(batch=5, length=11, hidden_size=9, vocab=53, seed=3)
    options = dict(ALL_OPTIONS, gate="erf", importance_sampling_level=level, memory_budget_mb=budget)
    assert_matches(*run_both(inputs, **options), atol=1e-10)


@pytest.mark.parametrize("gate", GATES)
def test_on_policy_default_options_match_reference(gate):
    inputs = make_inputs(seed=11)
    inputs.old = None  # ratio 1, gradient of TRL's detach trick
    (out, leaves), ref = run_both(inputs, gate=gate, with_bias=False)
    assert torch.all(out.ratio[inputs.mask.bool()] == 1)
    assert_matches((out, leaves), ref, atol=1e-10)


def test_token_level_advantages_match_reference():
    inputs = make_inputs(seed=5, token_advantages=True)
    for level in LEVELS:
        options = dict(ALL_OPTIONS, gate="clip", importance_sampling_level=level)
        assert_matches(*run_both(inputs, **options), atol=1e-10)


@pytest.mark.parametrize("num_items", [None, 50.0], ids=["default_items", "given_items"])
def test_dapo_normaliser(num_items):
    inputs = make_inputs(seed=2)
    options = dict(gate="sigmoid", loss_type="dapo", num_items_in_batch=num_items)
    assert_matches(*run_both(inputs, **options), atol=1e-10)


@pytest.mark.parametrize("gate", ["clip", "sigmoid"])
def test_eur_is_exact_per_prompt_group(gate):
    inputs = make_inputs(batch=6, seed=8, log_ratio_scale=1.0)
    (out, _), (ref, _) = run_both(inputs, gate=gate, group_size=3, tau_pos=10.0, tau_neg=12.0)
    assert max_abs(out.eur, ref.eur) <= 1e-12
    # the group mean differs from the plain token mean for these uneven masks
    (flat, _), _ = run_both(inputs, gate=gate, tau_pos=10.0, tau_neg=12.0)
    assert abs(flat.eur.item() - out.eur.item()) > 1e-6


def test_eur_is_one_minus_region_clip_fraction_for_clip():
    inputs = make_inputs(seed=4, log_ratio_scale=0.5)
    (out, _), _ = run_both(inputs, gate="clip")
    region = out.metrics["clip_ratio/region_mean"]
    assert 0 < region.item() < 1
    assert abs(out.eur.item() - (1 - region.item())) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
@pytest.mark.parametrize("gate", ["clip", "sigmoid", "erf"])
def test_float32_inputs_match_reference(gate, dtype):
    inputs = make_inputs(batch=3, length=9, hidden_size=24, vocab=203, seed=6)
    options = dict(ALL_OPTIONS, gate=gate, memory_budget_mb=0.05)
    assert_matches(*run_both(inputs, dtype=dtype, **options), atol=2e-5)


def _naive_same_dtype_error(inputs, dtype, **options):
    h, w, b = inputs.leaves(dtype)
    ref_low = reference_loss(
        h, w, inputs.ids, inputs.advantages.to(dtype), inputs.mask, inputs.old.to(dtype), inputs.ref.to(dtype),
        bias=b, **options,
    )
    ref_low.loss.backward()
    return ref_low, (h, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_is_no_worse_than_naive_same_dtype(dtype):
    """Judged like CCE: our error from the float64 truth against the naive same-dtype implementation's error."""
    inputs = make_inputs(batch=4, length=9, hidden_size=40, vocab=211, seed=9)
    options = dict(ALL_OPTIONS, gate="sigmoid", memory_budget_mb=0.05)
    (out, (h, w, b)), (truth, (th, tw, tb)) = run_both(inputs, dtype=dtype, **options)
    del options["memory_budget_mb"]
    naive, (nh, nw, nb) = _naive_same_dtype_error(inputs, dtype, **options)
    assert out.loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    for ours, theirs, exact in ((out.loss, naive.loss, truth.loss), (h.grad, nh.grad, th.grad),
                                (w.grad, nw.grad, tw.grad), (b.grad, nb.grad, tb.grad)):
        assert max_abs(ours, exact) <= max_abs(theirs, exact) + 1e-3
