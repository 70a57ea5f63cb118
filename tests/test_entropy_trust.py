"""The entropy-scaled trust region (ESTR, ``estr_threshold``) against the naive float64 reference: on every gate of
one token's ratio and every loss type, with the behaviour policy's entropy given or the current one standing in,
with the other masks and weights, over several chunks, on the Triton backend in the interpreter; a threshold that
drops nothing changes nothing; extreme log-ratios stay finite; options that would be ignored or mean nothing are
refused by name."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from helpers import TOLERANCES, assert_matches_reference, make_inputs, run_loss

from fused_gates import LOSS_TYPES, PAPER_GATES, gated_policy_loss

THRESHOLD = 0.3  # with log-ratios of spread 1 and entropies up to log 37, some tokens are dropped and some kept
OPTIONS = dict(estr_threshold=THRESHOLD, max_completion_length=9, epsilon_high=0.28, tau_pos=2.0, tau_neg=3.0)


def estr_inputs(seed: int):
    """Token advantages, log-ratios of spread 1 and a behaviour entropy near the current one's range."""
    inputs = make_inputs(5, 9, 13, 37, seed=seed, token_advantages=True, log_ratio_scale=1.0)
    generator = torch.Generator().manual_seed(seed + 7)
    old_entropy = 3.0 * torch.rand(inputs.mask.shape, generator=generator, dtype=torch.float64)
    return inputs, old_entropy


def _dropped_and_kept(comparison, inputs) -> None:
    """The inputs reach both sides of the region (else the comparison cannot see the mask)."""
    fraction = comparison.ours.out.metrics["estr/masked_fraction"].item()
    assert 0 < fraction < 1, f"masked fraction {fraction}: the test needs tokens on both sides of the region"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", [*PAPER_GATES, "cispo"])
def test_every_gate_and_loss_type_matches_reference(gate, loss_type):
    inputs, old_entropy = estr_inputs(sum(map(ord, gate + loss_type)))
    comparison = assert_matches_reference(inputs, gate=gate, loss_type=loss_type, old_entropy=old_entropy,
                                          memory_budget_mb=0.004, **OPTIONS)
    _dropped_and_kept(comparison, inputs)


@pytest.mark.parametrize("gate", ["clip", "sigmoid", "erf"])
def test_current_entropy_stands_in_without_the_behaviour_entropy(gate):
    inputs, _ = estr_inputs(11)
    comparison = assert_matches_reference(inputs, gate=gate, **OPTIONS)
    _dropped_and_kept(comparison, inputs)


def test_with_kl_entropy_bonus_sampler_weights_masks_and_groups_matches_reference():
    inputs, old_entropy = estr_inputs(12)
    generator = torch.Generator().manual_seed(3)
    sampling_ratio = torch.rand(inputs.mask.shape, generator=generator, dtype=torch.float64) + 0.5
    entropy_mask = (torch.rand(inputs.mask.shape, generator=generator) > 0.3).long()
    comparison = assert_matches_reference(
        inputs, gate="sigmoid", old_entropy=old_entropy, beta=0.04, use_bias_correction_kl=True, entropy_coef=0.01,
        sampling_ratio=sampling_ratio, entropy_mask=entropy_mask, off_policy_mask_threshold=0.1, group_size=1,
        temperature=0.7, estr_epsilon=0.05, **{k: v for k, v in OPTIONS.items() if k != "max_completion_length"})
    _dropped_and_kept(comparison, inputs)


@pytest.mark.parametrize("gate", ["clip", "softsign"])
def test_triton_backend_matches_reference(gate):
    inputs, old_entropy = estr_inputs(13)
    comparison = assert_matches_reference(inputs, backend="triton", dtype=torch.float32,
                                          tolerances=TOLERANCES[torch.float32], gate=gate, old_entropy=old_entropy,
                                          memory_budget_mb=0.004, **OPTIONS)
    _dropped_and_kept(comparison, inputs)


def test_threshold_that_drops_nothing_changes_nothing():
    inputs, old_entropy = estr_inputs(14)
    plain = run_loss(inputs, gate="erf")
    wide = run_loss(inputs, gate="erf", estr_threshold=1e9, old_entropy=old_entropy)
    assert wide.out.metrics["estr/masked_fraction"].item() == 0
    assert torch.equal(plain.out.loss, wide.out.loss)
    assert torch.equal(plain.out.gate_grad, wide.out.gate_grad)
    for ours, theirs in zip(plain.grads, wide.grads, strict=True):
        assert torch.equal(ours, theirs)


def test_on_policy_keeps_every_token():
    inputs, old_entropy = estr_inputs(15)
    out = run_loss(replace(inputs, old=None), gate="sigmoid", estr_threshold=1e-6, old_entropy=old_entropy).out
    assert out.metrics["estr/masked_fraction"].item() == 0


def test_masked_token_has_no_gradient_and_counts_in_eur():
    inputs, old_entropy = estr_inputs(16)
    out = run_loss(inputs, gate="sigmoid", old_entropy=old_entropy, backward=False, **OPTIONS).out
    delta = (out.logprobs - inputs.old).square()
    dropped = (delta > THRESHOLD * (old_entropy + 0.01)) & inputs.mask.bool() & (inputs.advantages != 0)
    assert dropped.any()
    assert torch.all(out.gate_grad[dropped] == 0) and torch.all(out.gate_value[dropped] == 0)
    mask = inputs.mask.double()
    assert abs(out.eur.item() - ((out.gate_grad * mask).sum() / mask.sum()).item()) <= 1e-12


def test_extreme_log_ratios_stay_finite_and_are_dropped():
    inputs, old_entropy = estr_inputs(17)
    old = inputs.old.clone()
    old[0, 1::2] += 50.0
    old[3, ::3] -= 50.0
    run = run_loss(replace(inputs, old=old), gate="softsign", old_entropy=old_entropy, **OPTIONS)
    assert torch.isfinite(run.out.loss)
    assert all(torch.isfinite(g).all() for g in run.grads if g is not None)
    assert torch.all(run.out.gate_value[0, 1::2][inputs.mask[0, 1::2].bool()] == 0)


BAD = {
    "threshold-zero": (dict(estr_threshold=0.0), "estr_threshold: must be finite and > 0"),
    "threshold-nan": (dict(estr_threshold=float("nan")), "estr_threshold: must be finite"),
    "epsilon-negative": (dict(estr_threshold=0.3, estr_epsilon=-0.1), "estr_epsilon: must be finite and >= 0"),
    "epsilon-without-threshold": (dict(estr_epsilon=0.1), "estr_epsilon: only applies with estr_threshold"),
    "entropy-without-threshold": (dict(old_entropy="like"), "old_entropy: only applies with estr_threshold"),
    "entropy-shape": (dict(estr_threshold=0.3, old_entropy=torch.ones(4, 7, dtype=torch.float64)),
                      "old_entropy: expected shape"),
    "entropy-negative": (dict(estr_threshold=0.3, old_entropy="negative"), "old_entropy: must be finite and >= 0"),
    "entropy-nan": (dict(estr_threshold=0.3, old_entropy="nan"), "old_entropy: must be finite and >= 0"),
    "input-gate": (dict(estr_threshold=0.3, gate="dppo"), "estr_threshold: gate='dppo' has its own trust region"),
    "vespo": (dict(estr_threshold=0.3, gate="vespo"), "estr_threshold: gate='vespo' has its own trust region"),
    "sequence-level": (dict(estr_threshold=0.3, importance_sampling_level="sequence"),
                       "estr_threshold: the entropy-scaled region bounds each token's own log-ratio"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_options_are_named(name):
    options, message = BAD[name]
    inputs, old_entropy = estr_inputs(18)
    special = {"like": old_entropy, "negative": old_entropy - 5.0, "nan": old_entropy.masked_fill(
        torch.zeros_like(old_entropy, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True), float("nan"))}
    options = {k: special[v] if isinstance(v, str) and v in special else v for k, v in options.items()}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask, inputs.old,
                          inputs.ref, **options)


@pytest.mark.parametrize("gate", ["clip", "sigmoid", "cispo"])
def test_triton_fused_kernel_applies_the_region_in_its_epilogue(gate, monkeypatch):
    """The token-level row kernel computes the mask itself (the split path never runs) and agrees with the split
    kernels and the torch objective, with the behaviour entropy given and without it."""
    from fused_gates.kernels.triton_backend import TritonChunks

    calls = {"fused": 0, "split": 0}
    fused, split = TritonChunks.fused_token_chunk, TritonChunks.statistics

    def count(name, method):
        def wrapped(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(TritonChunks, "fused_token_chunk", count("fused", fused))
    monkeypatch.setattr(TritonChunks, "statistics", count("split", split))
    inputs, old_entropy = estr_inputs(19)
    for given in (old_entropy, None):
        comparison = assert_matches_reference(inputs, backend="triton", dtype=torch.float32,
                                              tolerances=TOLERANCES[torch.float32], gate=gate, old_entropy=given,
                                              memory_budget_mb=0.004, beta=0.04, **OPTIONS)
        _dropped_and_kept(comparison, inputs)
    assert calls["fused"] > 0 and calls["split"] == 0, calls
