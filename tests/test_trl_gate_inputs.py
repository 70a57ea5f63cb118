"""GatedGRPOTrainer with the gates that read more than the ratio: their options reach the loss, meaningless settings
are refused with the configuration, and training logs finite metrics with each of them."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the trainer tests")

import trl_fixtures as fixtures

import fused_gates.integrations.trl.trainer as gated_trl
from fused_gates.gates import INPUT_GATES
from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer
from fused_gates.integrations.trl.config import resolve_objective

pytestmark = pytest.mark.usefixtures("single_threaded")


def config(**options) -> GatedGRPOConfig:
    return GatedGRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **options)


GIVEN = {
    "dppo": dict(gate_dppo_delta=0.1),
    "dppo_kl": dict(gate_dppo_delta=0.02),
    "m2po": dict(gate_m2po_threshold=0.02),
    "bapo": dict(gate_bapo_rho=0.4, gate_bapo_bounds=[0.7, 0.9, 1.2, 2.0], gate_bapo_steps=[0.2, 0.1]),
    "aspo": dict(gate_aspo_dual_clip=4.0),
    "gmpo": dict(gate_gmpo_epsilon=0.3),
}


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_options_of_each_input_gate_are_resolved_for_the_loss(gate):
    objective = resolve_objective(config(gate=gate, loss_type="grpo", **GIVEN[gate]))
    expected = {name.removeprefix("gate_"): tuple(v) if isinstance(v, list) else v for name, v in GIVEN[gate].items()}
    assert (objective.gate, dict(objective.input_options)) == (gate, expected)
    assert not objective.tempered


MEANINGLESS = {
    "option_of_another_gate": (dict(gate="sigmoid", gate_dppo_delta=0.1), "gate_dppo_delta: only applies"),
    "option_without_gate": (dict(gate_m2po_threshold=0.1), "gate_m2po_threshold: only applies"),
    "bad_delta": (dict(gate="dppo", gate_dppo_delta=0.0), "gate_dppo_delta: must be in"),
    "bad_rho": (dict(gate="bapo", gate_bapo_rho=1.0), "gate_bapo_rho: must be in"),
    "sequence_level": (dict(gate="aspo", importance_sampling_level="sequence"), "defines its own ratio"),
    "gmpo_bias_correction": (dict(gate="gmpo", beta=0.1, use_bias_correction_kl=True), "no token ratio"),
    "temperature": (dict(gate="m2po", gate_tau_pos=2.0), "gate 'm2po' has no temperature"),
    "replacing_cispo": (dict(gate="dppo", loss_type="cispo"), "detached weight"),
}


@pytest.mark.parametrize("case", MEANINGLESS.values(), ids=MEANINGLESS.keys())
def test_meaningless_settings_are_refused_with_the_configuration(case):
    options, message = case
    with pytest.raises(ValueError, match=message):
        config(**options)


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_training_with_each_input_gate_passes_its_options_and_logs_finite_metrics(gate, model_dir, tmp_path,
                                                                                  monkeypatch):
    seen = []
    original = gated_trl.gated_policy_loss

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(gated_trl, "gated_policy_loss", recording)
    trainer = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path,
                             dict(gate=gate, loss_type="grpo", max_steps=2, **GIVEN[gate]))
    logs = fixtures.step_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "eur", "gate/mean", "ratio/mean"):
            assert math.isfinite(entry[key]), key
    decisions = {"dppo": ["dppo/masked_fraction"], "dppo_kl": ["dppo_kl/masked_fraction"],
                 "m2po": ["m2po/masked_fraction"], "bapo": ["bapo/c_low", "bapo/c_high"]}.get(gate, [])
    for entry in logs:
        for key in decisions:
            assert math.isfinite(entry[key]), key
    if gate == "bapo":
        assert all(0.7 - 1e-6 <= entry["bapo/c_low"] <= 0.9 + 1e-6 and 1.2 - 1e-6 <= entry["bapo/c_high"] <= 2 + 1e-6
                   for entry in logs)  # within the ranges given (float32 logs)
    expected = {name.removeprefix("gate_"): tuple(v) if isinstance(v, list) else v for name, v in GIVEN[gate].items()}
    assert seen and all(call["gate"] == gate for call in seen)
    assert all(call.get(name) == value for call in seen for name, value in expected.items())


def test_adaptive_temperature_refuses_a_gate_that_reads_more_than_r():
    from test_gate_inputs import entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative

    from fused_gates import register_input_gate, unregister_gate
    from fused_gates.integrations.trl.adaptive_gate import check_can_adapt

    register_input_gate("entropy_sigmoid_trl", entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative,
                        check_taus=(1.0,), check_entropies=(1.0,), check_logprobs=(-1.0,))
    try:
        with pytest.raises(ValueError, match="reads the token's other inputs"):
            check_can_adapt("entropy_sigmoid_trl", has_off_policy_updates=True)
        for gate in INPUT_GATES:
            with pytest.raises(ValueError, match="has none"):
                check_can_adapt(gate, has_off_policy_updates=True)
    finally:
        unregister_gate("entropy_sigmoid_trl")


# -- the entropy-scaled trust region -------------------------------------------------------------------------------

ESTR_MEANINGLESS = {
    "epsilon_without_threshold": (dict(gate_estr_epsilon=0.1), "gate_estr_epsilon: only applies with estr_threshold"),
    "input_gate": (dict(gate="dppo", gate_estr_threshold=0.5), "gate_estr_threshold: gate='dppo' has its own"),
    "sequence_level": (dict(loss_type="grpo", gate="sigmoid", gate_estr_threshold=0.5,
                            importance_sampling_level="sequence"), "gate_estr_threshold: the entropy-scaled region"),
    "bad_threshold": (dict(gate_estr_threshold=-1.0), "gate_estr_threshold: must be finite and > 0"),
}


@pytest.mark.parametrize("case", ESTR_MEANINGLESS.values(), ids=ESTR_MEANINGLESS.keys())
def test_meaningless_entropy_scaled_settings_are_refused_with_the_configuration(case):
    options, message = case
    with pytest.raises(ValueError, match=message):
        config(**options)


def test_entropy_scaled_region_reads_the_old_policy_pass_entropy(model_dir, tmp_path, monkeypatch):
    """With generation every other optimizer step TRL runs an old-policy pass: its entropies reach the loss as
    ``old_entropy`` (no extra pass), the threshold and floor as given, and the dropped share is logged."""
    seen = []
    original = gated_trl.gated_policy_loss

    def recording(*args, **kwargs):
        seen.append(dict(kwargs, completion_ids=args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(gated_trl, "gated_policy_loss", recording)
    passes = []
    original_pass = GatedGRPOTrainer._old_pass

    def counting(self, model, args, kwargs):
        passes.append(kwargs.get("compute_entropy"))
        return original_pass(self, model, args, kwargs)

    monkeypatch.setattr(GatedGRPOTrainer, "_old_pass", counting)
    trainer = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path,
                             dict(gate="sigmoid", loss_type="grpo", max_steps=2, steps_per_generation=4,
                                  gate_estr_threshold=0.01, gate_estr_epsilon=0.02))
    assert passes and all(passes), "the old-policy pass did not compute the entropy"
    assert seen and all(call["estr_threshold"] == 0.01 and call["estr_epsilon"] == 0.02 for call in seen)
    given = [call["old_entropy"] for call in seen]
    assert all(entropy is not None and entropy.shape == call["completion_ids"].shape
               for entropy, call in zip(given, seen, strict=True))
    logs = fixtures.step_logs(trainer)
    assert all(0.0 <= entry["estr/masked_fraction"] <= 1.0 for entry in logs)
