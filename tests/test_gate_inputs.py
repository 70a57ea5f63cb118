"""The gates that read more than the ratio (dppo, dppo_kl, m2po, bapo, aspo, gmpo) against the naive float64
reference: loss, per-token outputs, EUR, metrics and gradients for every loss type, with the KL, the entropy bonus
and the sampler's weights; the batch statistic of m2po and bapo whatever the chunks (and no extra product when the
batch fits one); the Triton backend in the interpreter; hyperparameters checked and refused where they mean
nothing."""

from __future__ import annotations

import re
import zlib
from dataclasses import replace

import pytest
import torch
from helpers import TOLERANCES, assert_matches_reference, make_inputs, run_loss

from fused_gates import LOSS_TYPES, gated_policy_loss
from fused_gates.gates import INPUT_GATES
from fused_gates.torch_backend import TorchChunks

# What each gate needs to show every branch: log-ratio spread (ASPO's dual clips need r < 1/3 and r > 3), large
# probabilities (half the tokens the most likely) for DPPO's p - p_old bound, mostly negative advantages so that
# BAPO's loop moves its bounds.
SHAPES = {
    "dppo": dict(log_ratio_scale=1.5, greedy=True),
    "dppo_kl": dict(log_ratio_scale=1.5, greedy=True),
    "m2po": dict(log_ratio_scale=0.3),
    "bapo": dict(log_ratio_scale=0.5, advantage_shift=-0.6),
    "aspo": dict(log_ratio_scale=1.5),
    "gmpo": dict(log_ratio_scale=0.5),
}
OPTIONS = dict(beta=0.04, entropy_coef=0.01, temperature=0.7, max_completion_length=9, epsilon_high=0.28)
BUDGETS = {"one_token_chunks": 1e-4, "few_chunks": 0.004, "single_chunk": 64.0}


def gate_inputs(gate: str, seed: int, batch: int = 5, length: int = 9, vocab: int = 37, **overrides):
    """Random odd-sized inputs shaped for ``gate`` (:data:`SHAPES`); old log-probs near the policy's."""
    shape = dict(SHAPES[gate], **overrides)
    inputs = make_inputs(batch, length, 13, vocab, seed=seed, token_advantages=True,
                         log_ratio_scale=shape["log_ratio_scale"])
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = inputs.hidden
    logits = hidden @ inputs.weight.T + inputs.bias
    ids = inputs.ids.clone()
    if shape.get("greedy"):
        ids[:, ::2] = logits.argmax(-1)[:, ::2]
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + shape["log_ratio_scale"] * torch.randn(logp.shape, generator=generator, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(logp.shape, generator=generator, dtype=torch.float64)
    advantages = inputs.advantages + shape.get("advantage_shift", 0.0)
    advantages[2] = 0.0  # a row with A = 0
    return replace(inputs, hidden=hidden, ids=ids, old=old, ref=ref, advantages=advantages)


def _seed(*parts: object) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 1000


def _gradient_weights(out, inputs) -> torch.Tensor:
    """``gate_grad`` at the tokens whose advantage is non-zero."""
    valid = inputs.mask.bool() & (inputs.advantages != 0)
    return out.gate_grad[valid]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gate", INPUT_GATES)
def test_every_input_gate_and_loss_type_matches_reference(gate, loss_type):
    inputs = gate_inputs(gate, _seed(gate, loss_type))
    comparison = assert_matches_reference(inputs, gate=gate, loss_type=loss_type, memory_budget_mb=0.004, **OPTIONS)
    weights = _gradient_weights(comparison.ours.out, inputs)
    # the inputs reach the gate's clipped / masked branch and its unclipped one
    assert (weights == 0).any() or (weights != 1).any(), "no token is clipped: the test cannot see the gate"
    assert (weights != 0).any(), "every token is masked"


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_sampler_weights_masks_and_bias_corrected_kl_match_reference(gate):
    inputs = gate_inputs(gate, _seed(gate, "extras"))
    generator = torch.Generator().manual_seed(5)
    sampling_ratio = torch.rand(inputs.mask.shape, generator=generator, dtype=torch.float64) + 0.5
    entropy_mask = (torch.rand(inputs.mask.shape, generator=generator) > 0.3).long()
    options = dict(OPTIONS, sampling_ratio=sampling_ratio, entropy_mask=entropy_mask, group_size=1,
                   off_policy_mask_threshold=0.1, use_bias_correction_kl=gate != "gmpo")
    assert_matches_reference(inputs, gate=gate, **options)


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_on_policy_matches_reference(gate):
    inputs = replace(gate_inputs(gate, _seed(gate, "on-policy")), old=None)
    comparison = assert_matches_reference(inputs, gate=gate, bias=False)
    assert torch.all(comparison.ours.out.ratio[inputs.mask.bool()] == 1)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("gate", ["m2po", "bapo"])
def test_batch_statistic_is_the_batch_s_whatever_the_chunks(gate, budget):
    inputs = gate_inputs(gate, _seed(gate, "chunks"), batch=6, length=11)
    options = {k: v for k, v in OPTIONS.items() if k != "temperature"}
    # the halves differ: for m2po the second half is near on-policy, for bapo its advantages are all negative
    logits = inputs.hidden @ inputs.weight.T + inputs.bias
    logp = torch.log_softmax(logits, -1).gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1)
    old, advantages = inputs.old.clone(), inputs.advantages.clone()
    if gate == "m2po":
        old[3:] = logp[3:] + 0.01 * (inputs.old[3:] - logp[3:])
    else:
        advantages[:3], advantages[3:] = advantages[:3].abs(), -advantages[3:].abs() - 0.5
    inputs = replace(inputs, old=old, advantages=advantages)
    comparison = assert_matches_reference(inputs, gate=gate, memory_budget_mb=budget, **options)
    # the statistic of the first half of the batch alone decides differently: a chunk's statistic would show
    half = replace(inputs, hidden=inputs.hidden[:3], ids=inputs.ids[:3], advantages=inputs.advantages[:3],
                   mask=inputs.mask[:3], old=inputs.old[:3], ref=inputs.ref[:3])
    alone = run_loss(half, gate=gate, backward=False, **options).out
    whole = comparison.ours.out
    key = "m2po/masked_fraction" if gate == "m2po" else "bapo/c_high"
    decided = (alone.metrics[key], whole.metrics[key]) if gate == "bapo" else (
        (alone.gate_value == 0).sum(), (whole.gate_value[:3] == 0).sum())
    assert decided[0] != decided[1], f"{key}: the first half alone decides as the batch does"


def _count_products(monkeypatch) -> list[int]:
    calls = [0]
    original = TorchChunks._logits

    def counted(self, hidden):
        calls[0] += 1
        return original(self, hidden)

    monkeypatch.setattr(TorchChunks, "_logits", counted)
    return calls


@pytest.mark.parametrize("gate", ["m2po", "bapo"])
def test_batch_in_one_chunk_takes_no_extra_product(gate, monkeypatch):
    inputs = gate_inputs(gate, _seed(gate, "products"))
    calls = _count_products(monkeypatch)
    run_loss(inputs, gate=gate, memory_budget_mb=64.0)
    assert calls[0] == 1  # the logits once; the gradients from the same pass
    calls[0] = 0
    run_loss(inputs, gate=gate, memory_budget_mb=0.004)
    chunks = calls[0] // 2
    assert chunks > 1 and calls[0] == 2 * chunks  # statistics pass, then the backward's recompute


def test_token_level_input_gates_take_no_extra_product(monkeypatch):
    inputs = gate_inputs("dppo", 3)
    calls = _count_products(monkeypatch)
    run_loss(inputs, gate="dppo", memory_budget_mb=0.004)
    dppo_calls = calls[0]
    calls[0] = 0
    run_loss(inputs, gate="sigmoid", memory_budget_mb=0.004)
    assert dppo_calls == calls[0]


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_eur_is_the_mean_gradient_weight_relative_to_the_policy_gradient(gate):
    inputs = gate_inputs(gate, _seed(gate, "eur"))
    out = run_loss(inputs, gate=gate, backward=False).out
    mask = inputs.mask.double()
    assert abs(out.eur.item() - ((out.gate_grad * mask).sum() / mask.sum()).item()) <= 1e-12
    assert out.eur.item() > 0 and out.eur.item() != 1


TRITON_CASES = {
    "dppo-grpo": dict(gate="dppo"),
    "dppo_kl-bnpo": dict(gate="dppo_kl", loss_type="bnpo"),
    "m2po-bnpo-one-chunk": dict(gate="m2po", loss_type="bnpo", memory_budget_mb=64.0),
    "m2po-dapo-chunks": dict(gate="m2po", loss_type="dapo", memory_budget_mb=0.004),
    "bapo-grpo-chunks": dict(gate="bapo", memory_budget_mb=0.004),
    "aspo-dr_grpo": dict(gate="aspo", loss_type="dr_grpo"),
    "gmpo-luspo-row-chunks": dict(gate="gmpo", loss_type="luspo", memory_budget_mb=0.004),
}


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_backend_matches_reference(name):
    options = dict(OPTIONS, **TRITON_CASES[name])
    inputs = gate_inputs(options["gate"], _seed(name, "triton"), vocab=67)
    assert_matches_reference(inputs, backend="triton", dtype=torch.float32, tolerances=TOLERANCES[torch.float32],
                             **options)


BAD = {
    "dppo_delta-zero": (dict(gate="dppo", dppo_delta=0.0), "dppo_delta: must be in (0, 1]"),
    "dppo_delta-negative-side": (dict(gate="dppo", dppo_delta=(0.1, -0.2)), "dppo_delta[1]: must be in"),
    "dppo_delta-above-one": (dict(gate="dppo", dppo_delta=1.5), "dppo_delta: must be in"),
    "dppo_kl-delta-zero": (dict(gate="dppo_kl", dppo_delta=0.0), "dppo_delta: must be finite and > 0"),
    "m2po_threshold-zero": (dict(gate="m2po", m2po_threshold=0.0), "m2po_threshold: must be finite and > 0"),
    "bapo_rho-zero": (dict(gate="bapo", bapo_rho=0.0), "bapo_rho: must be in (0, 1)"),
    "bapo_rho-one": (dict(gate="bapo", bapo_rho=1.0), "bapo_rho: must be in (0, 1)"),
    "bapo_bounds-crossed": (dict(gate="bapo", bapo_bounds=(0.9, 0.6, 1.2, 3.0)), "bapo_bounds: must satisfy"),
    "bapo_bounds-short": (dict(gate="bapo", bapo_bounds=(0.6, 0.9)), "bapo_bounds: expected"),
    "bapo_steps-zero": (dict(gate="bapo", bapo_steps=(0.1, 0.0)), "bapo_steps[1]: must be finite and > 0"),
    "aspo_dual_clip-one": (dict(gate="aspo", aspo_dual_clip=1.0), "aspo_dual_clip: must be finite and > 1"),
    "gmpo_epsilon-negative": (dict(gate="gmpo", gmpo_epsilon=-0.1), "gmpo_epsilon: must be finite and > 0"),
    "option-of-another-gate": (dict(gate="sigmoid", dppo_delta=0.2), "dppo_delta: only applies to gate='dppo'"),
    "option-of-another-input-gate": (dict(gate="m2po", bapo_rho=0.4), "bapo_rho: only applies to gate='bapo'"),
    "sequence-level": (dict(gate="dppo", importance_sampling_level="sequence"),
                       "importance_sampling_level: gate='dppo' defines its own ratio"),
    "gmpo-bias-corrected-kl": (dict(gate="gmpo", beta=0.1, use_bias_correction_kl=True),
                               "use_bias_correction_kl: gate='gmpo' has no token ratio"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_hyperparameters_are_named(name):
    options, message = BAD[name]
    inputs = make_inputs(seed=1)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, inputs.mask, inputs.old,
                          inputs.ref, **options)


def test_input_gate_names_cannot_be_registered():
    from fused_gates import register_gate

    with pytest.raises(ValueError, match="'m2po' is a built-in gate"):
        register_gate("m2po", lambda r, t: r, lambda r, t: torch.ones_like(r))


# -- gates registered with their inputs ----------------------------------------------------------------------------


def entropy_scaled_sigmoid(inputs):
    """SAPO's sigmoid whose temperature grows with the token's entropy: tau (1 + H)."""
    tau = inputs.tau * (1 + inputs.entropy)
    return torch.sigmoid(tau * (inputs.ratio - 1)) * 4 / tau


def entropy_scaled_sigmoid_derivative(inputs):
    x = inputs.tau * (1 + inputs.entropy) * (inputs.ratio - 1)
    return 4 * torch.sigmoid(x) * torch.sigmoid(-x)


@pytest.fixture
def entropy_gate():
    from fused_gates import register_input_gate, unregister_gate

    # the temperatures and entropies the test uses (the default grids take a minute on two cores)
    gate = register_input_gate("entropy_sigmoid", entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative,
                               check_taus=(2.0, 3.0), check_entropies=(0.1, 5.0), check_logprobs=(-1.0,))
    yield gate
    unregister_gate("entropy_sigmoid")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_registered_gate_reading_the_entropy_matches_reference(entropy_gate, loss_type, backend):
    from helpers import assert_within, output_errors, run_reference

    inputs = gate_inputs("aspo", _seed("entropy", loss_type))
    dtype = torch.float64 if backend == "torch" else torch.float32
    options = dict(OPTIONS, loss_type=loss_type, tau_pos=2.0, tau_neg=3.0, memory_budget_mb=0.004)
    ours = run_loss(inputs, backend=backend, dtype=dtype, gate="entropy_sigmoid", **options)
    reference = run_reference(inputs, dtype=dtype, gate="entropy_sigmoid", custom_input_value=entropy_scaled_sigmoid,
                              **options)
    assert_within(output_errors(ours, reference), TOLERANCES[dtype])
    # the entropy changes the gate: the same sigmoid without it differs
    plain = run_loss(inputs, backend=backend, dtype=dtype, gate="sigmoid", **options).out
    assert (ours.out.gate_grad - plain.gate_grad).abs().max() > 1e-3


def test_registered_input_gate_is_checked_for_admissibility_at_each_entropy():
    from fused_gates import GateAdmissibilityError, register_input_gate

    def broken(inputs):  # f'(1) = 1 / (1 + H): property (ii) fails unless H = 0
        return 1 + (inputs.ratio - 1) / (1 + inputs.entropy)

    def broken_derivative(inputs):
        return torch.ones_like(inputs.ratio) / (1 + inputs.entropy)

    with pytest.raises(GateAdmissibilityError, match=r"broken \(entropy=0.05.*\(ii\)"):
        register_input_gate("broken", broken, broken_derivative)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.02], ids=["no_entropy_term", "entropy_term"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no_softcap", "softcap"])
def test_batch_statistic_backward_from_the_saved_statistics_matches_reference(softcap, entropy_coef):
    # several chunks: the forward forms no gradient, the backward recomputes dz from the saved lse
    inputs = gate_inputs("m2po", _seed("saved", softcap, entropy_coef), batch=6, length=11)
    options = dict(OPTIONS, entropy_coef=entropy_coef, logit_softcap=softcap, memory_budget_mb=0.004)
    assert_matches_reference(inputs, gate="m2po", **options)


def test_whole_row_chunks_are_packed_to_the_budget_not_to_the_evened_chunk():
    from types import SimpleNamespace

    from fused_gates.chunk_driver import plan_chunk_rows, plan_loss_chunks, token_chunks

    # 8 rows of 56 tokens; the budget holds 215 tokens, evened out to 3 chunks of 150: whole rows of 56 fit 3 to a
    # chunk of the budget (3 chunks, as token chunks take) but only 2 to a chunk of 150 (4 chunks: one more pass
    # over dW)
    tokens = SimpleNamespace(count=448, row_counts=lambda: [56] * 8, row_reduce=None)
    rows = plan_chunk_rows(448, 1000, 215 * 1000 / 2**20)
    whole_rows = SimpleNamespace(needs_whole_batch=False, needs_whole_rows=True)
    assert rows == 150 and len(token_chunks(448, rows)) == 3
    assert len(plan_loss_chunks(tokens, rows, whole_rows)) == 4
    assert len(plan_loss_chunks(tokens, rows, whole_rows, capacity=215)) == 3


def test_registered_input_gate_is_selectable_by_name_but_not_listed_with_the_gates_of_r(entropy_gate):
    from fused_gates import available_gates, get_gate, register_gate

    assert get_gate("entropy_sigmoid") is entropy_gate and entropy_gate.has_temperature
    assert "entropy_sigmoid" not in available_gates()
    with pytest.raises(ValueError, match="already registered"):
        register_gate("entropy_sigmoid", lambda r, t: r, lambda r, t: torch.ones_like(r))
