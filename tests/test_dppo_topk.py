"""DPPO's Top-K divergences (``old_topk_ids`` / ``old_topk_logprobs`` with ``gate="dppo"`` / ``"dppo_kl"``) against the
naive float64 reference: every loss type, with the KL and entropy bonus, over several chunks, temperature and
soft-cap, the Triton backend in the interpreter; the pass that gathers the current log-probs is exact (against a
log-softmax); bad inputs are named."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from helpers import TOLERANCES, assert_matches_reference, make_inputs

from fused_gates import LOSS_TYPES, gated_policy_loss
from fused_gates.head import Head
from fused_gates.topk_logprobs import current_topk_logprobs

K = 4
OPTIONS = dict(max_completion_length=9, memory_budget_mb=0.004)


def topk_inputs(seed: int, noise: float = 1.0, k: int = K):
    """Inputs whose behaviour policy is the current one with noisy logits: its top-K, and the sampled token's
    log-prob under it as ``old`` (half the tokens the behaviour's most likely, so that probabilities move a lot)."""
    inputs = make_inputs(5, 9, 13, 37, seed=seed, token_advantages=True)
    generator = torch.Generator().manual_seed(seed + 3)
    logits = inputs.hidden @ inputs.weight.T + inputs.bias
    behaviour = torch.log_softmax(logits + noise * torch.randn(logits.shape, generator=generator,
                                                               dtype=torch.float64), -1)
    ids = inputs.ids.clone()
    ids[:, ::2] = behaviour.argmax(-1)[:, ::2]
    top = behaviour.topk(k, dim=-1)
    old = behaviour.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return replace(inputs, ids=ids, old=old), top.indices, top.values


def _both_sides(comparison, gate: str) -> None:
    fraction = comparison.ours.out.metrics[f"{gate}/masked_fraction"].item()
    assert 0 < fraction < 1, f"masked fraction {fraction}: the test needs tokens on both sides of the trust region"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", ["dppo", "dppo_kl"])
def test_topk_divergence_matches_reference(gate, loss_type):
    inputs, ids, logprobs = topk_inputs(sum(map(ord, gate + loss_type)))
    comparison = assert_matches_reference(inputs, gate=gate, loss_type=loss_type, old_topk_ids=ids,
                                          old_topk_logprobs=logprobs, **OPTIONS)
    _both_sides(comparison, gate)


@pytest.mark.parametrize("gate", ["dppo", "dppo_kl"])
def test_with_kl_entropy_bonus_temperature_softcap_and_bounds_matches_reference(gate):
    inputs, ids, logprobs = topk_inputs(21)
    comparison = assert_matches_reference(inputs, gate=gate, old_topk_ids=ids, old_topk_logprobs=logprobs,
                                          beta=0.04, entropy_coef=0.01, temperature=0.7, logit_softcap=3.0,
                                          dppo_delta=(0.05, 0.2) if gate == "dppo" else (0.02, 0.08), **OPTIONS)
    _both_sides(comparison, gate)


@pytest.mark.parametrize("gate", ["dppo", "dppo_kl"])
def test_triton_backend_matches_reference(gate):
    inputs, ids, logprobs = topk_inputs(22)
    comparison = assert_matches_reference(inputs, backend="triton", dtype=torch.float32,
                                          tolerances=TOLERANCES[torch.float32], gate=gate, old_topk_ids=ids,
                                          old_topk_logprobs=logprobs, **OPTIONS)
    _both_sides(comparison, gate)


def test_topk_and_binary_divergences_differ():
    """The Top-K inputs are used: on the same tokens the Top-K mask is not the Binary one."""
    inputs, ids, logprobs = topk_inputs(23)
    args = (inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask, inputs.old)
    binary = gated_policy_loss(*args, gate="dppo")
    topk = gated_policy_loss(*args, gate="dppo", old_topk_ids=ids, old_topk_logprobs=logprobs)
    assert not torch.equal(binary.gate_value, topk.gate_value)


@pytest.mark.parametrize("budget", [1e-4, 64.0], ids=["token-chunks", "one-chunk"])
def test_gathered_logprobs_are_the_log_softmax_at_the_ids(budget):
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, 11, generator=generator, dtype=torch.float64)
    weight = torch.randn(41, 11, generator=generator, dtype=torch.float64)
    bias = torch.randn(41, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 41, (23, 6), generator=generator)
    head = Head(weight, bias, inv_temperature=1 / 0.7, memory_budget_mb=budget, softcap=2.5)
    expected = torch.log_softmax(2.5 * torch.tanh((hidden @ weight.T + bias) / 2.5) / 0.7, -1).gather(-1, ids)
    assert torch.allclose(current_topk_logprobs(hidden, head, ids), expected, rtol=0, atol=1e-12)


BAD = {
    "ids-without-logprobs": (dict(gate="dppo", old_topk_ids="ids"), "old_topk_logprobs: is required with old_topk_ids"),
    "logprobs-without-ids": (dict(gate="dppo", old_topk_logprobs="logprobs"),
                             "old_topk_ids: is required with old_topk_logprobs"),
    "other-gate": (dict(gate="sigmoid", old_topk_ids="ids", old_topk_logprobs="logprobs"),
                   "old_topk_ids: DPPO's Top-K divergence applies to gate='dppo' / gate='dppo_kl'"),
    "ids-shape": (dict(gate="dppo", old_topk_ids="ids[:, :3]", old_topk_logprobs="logprobs"),
                  "old_topk_ids: expected shape [5, 9, K]"),
    "logprobs-shape": (dict(gate="dppo", old_topk_ids="ids", old_topk_logprobs="logprobs[..., :2]"),
                       "old_topk_logprobs: expected shape [5, 9, 4]"),
    "float-ids": (dict(gate="dppo", old_topk_ids="ids.double()", old_topk_logprobs="logprobs"),
                  "old_topk_ids: expected an integer tensor"),
    "id-out-of-range": (dict(gate="dppo", old_topk_ids="ids + 37", old_topk_logprobs="logprobs"),
                        "old_topk_ids: ids must lie in [0, 37)"),
    "positive-logprob": (dict(gate="dppo_kl", old_topk_ids="ids", old_topk_logprobs="logprobs + 5"),
                         "old_topk_logprobs: must be finite and <= 0"),
    "with-sampler-support": (dict(gate="dppo", old_topk_ids="ids", old_topk_logprobs="logprobs", top_k=5),
                             "old_topk_ids: DPPO's Top-K divergence compares full-vocabulary distributions"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_are_named(name):
    options, message = BAD[name]
    inputs, ids, logprobs = topk_inputs(24)
    scope = {"ids": ids, "logprobs": logprobs}
    options = {k: eval(v, scope) if isinstance(v, str) and k.startswith("old_topk") else v
               for k, v in options.items()}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask, inputs.old,
                          **options)
