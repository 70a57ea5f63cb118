"""The adaptive gate temperature: the controller's rule, bounds and restart; where it refuses to act; the callback
against a fake trainer and inside a real GatedGRPOTrainer run resumed from a checkpoint."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState

from fused_gates import SOFT_GATES, get_gate, register_gate, unregister_gate
from fused_gates.integrations.trl.adaptive_gate import (
    DEFAULT_MAX_STEP,
    AdaptiveGateCallback,
    EURTemperatureController,
    check_can_adapt,
)

# ----------------------------------------------------------------------------------------------------------------------
# Controller


@pytest.mark.parametrize(("kwargs", "named"), [
    pytest.param({"target": 0.0}, "target", id="target-0"),
    pytest.param({"target": 1.0}, "target", id="target-1"),
    pytest.param({"target": math.nan}, "target", id="target-nan"),
    pytest.param({"rate": 0.0}, "rate", id="rate-0"),
    pytest.param({"rate": 1.5}, "rate", id="rate-above-1"),
    pytest.param({"tau_min": 5.0, "tau_max": 5.0}, "tau_min", id="empty-bounds"),
    pytest.param({"tau_min": -1.0}, "tau_min", id="negative-tau-min"),
    pytest.param({"tau_max": math.inf}, "tau_max", id="infinite-tau-max"),
    pytest.param({"tau_pos": 0.05}, "tau_pos", id="tau-pos-below-bounds"),
    pytest.param({"tau_neg": 2000.0}, "tau_neg", id="tau-neg-above-bounds"),
    pytest.param({"max_step": 0.0}, "max_step", id="max-step-0"),
])
def test_bad_controller_arguments_are_refused_by_name(kwargs, named) -> None:
    arguments = {"target": 0.8, "tau_pos": 10.0, "tau_neg": 12.0, **kwargs}
    target, tau_pos, tau_neg = arguments.pop("target"), arguments.pop("tau_pos"), arguments.pop("tau_neg")
    with pytest.raises(ValueError, match=named):
        EURTemperatureController(target, tau_pos, tau_neg, **arguments)


def test_one_update_follows_the_documented_rule() -> None:
    controller = EURTemperatureController(0.8, 10.0, 12.0, rate=0.25)
    # d log tau = rate (e - e*) / (2 (1 - e*)) = 0.25 * 0.1 / 0.4
    tau_pos, tau_neg = controller.update(0.9)
    assert tau_pos == pytest.approx(10.0 * math.exp(0.0625), rel=1e-12)
    assert tau_neg == pytest.approx(12.0 * math.exp(0.0625), rel=1e-12)
    tau_pos, _ = controller.update(0.5)  # below the target: back down by 0.25 * 0.3 / 0.4
    assert tau_pos == pytest.approx(10.0 * math.exp(0.0625 - 0.1875), rel=1e-12)
    assert controller.updates == 2


def test_eur_above_target_tightens_below_loosens_and_the_ratio_is_kept() -> None:
    controller = EURTemperatureController(0.7, 4.0, 5.0)
    rng = random.Random(0)
    for _ in range(50):
        before = controller.tau_pos
        eur = rng.uniform(0.0, 1.0)
        tau_pos, tau_neg = controller.update(eur)
        assert (tau_pos > before) == (eur > 0.7) or tau_pos == before
        assert tau_neg / tau_pos == pytest.approx(5.0 / 4.0, rel=1e-12)


def test_no_off_policy_tokens_means_no_change() -> None:
    controller = EURTemperatureController(0.8, 10.0, 12.0)
    assert controller.update(None) == (10.0, 12.0)
    assert controller.updates == 0


def test_one_step_is_capped_and_the_bounds_hold() -> None:
    controller = EURTemperatureController(0.9, 10.0, 12.0, rate=1.0, tau_min=1.0, tau_max=40.0)
    tau_pos, _ = controller.update(0.0)  # the rule asks for -4.5 in log tau; one step moves at most log 2
    assert tau_pos == pytest.approx(10.0 * math.exp(-DEFAULT_MAX_STEP))
    for _ in range(20):
        controller.update(0.0)
    assert controller.tau_pos == pytest.approx(1.0) and controller.tau_neg == pytest.approx(1.2)
    for _ in range(40):
        controller.update(1.0)
    assert controller.tau_neg == pytest.approx(40.0) and controller.tau_pos == pytest.approx(40.0 / 1.2)


@pytest.mark.parametrize("eur", [math.nan, math.inf, 1.5, -0.2], ids=["nan", "inf", "above-1", "negative"])
def test_an_impossible_eur_is_refused(eur: float) -> None:
    with pytest.raises(ValueError, match="off_policy_eur"):
        EURTemperatureController(0.8, 10.0, 12.0).update(eur)


def test_restart_from_the_state_continues_exactly() -> None:
    sequence = [0.93, None, 0.71, 0.88, 0.999, 0.42, None, 0.8, 0.9, 0.75]
    straight = EURTemperatureController(0.8, 10.0, 12.0)
    for eur in sequence:
        straight.update(eur)
    first = EURTemperatureController(0.8, 10.0, 12.0)
    for eur in sequence[:4]:
        first.update(eur)
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json stores it
    resumed = EURTemperatureController(0.8, 10.0, 12.0)
    resumed.load_state_dict(state)
    for eur in sequence[4:]:
        resumed.update(eur)
    assert (resumed.tau_pos, resumed.tau_neg, resumed.updates) == pytest.approx(
        (straight.tau_pos, straight.tau_neg, straight.updates), rel=1e-12)


@pytest.mark.parametrize(("state", "named"), [
    pytest.param({"tau_pos": 10.0, "tau_neg": 10.0, "updates": 3}, "tau_neg / tau_pos", id="other-ratio"),
    pytest.param({"tau_pos": 10.0, "updates": 3}, "tau_neg", id="missing-key"),
    pytest.param({"tau_pos": 5000.0, "tau_neg": 6000.0, "updates": 3}, "outside", id="out-of-bounds"),
])
def test_a_foreign_state_is_refused(state, named) -> None:
    with pytest.raises(ValueError, match=named):
        EURTemperatureController(0.8, 10.0, 12.0).load_state_dict(state)


def test_closed_loop_settles_at_the_target_for_every_soft_gate() -> None:
    """A stand-in for training: fixed off-policy ratios (log-normal spread 0.02, some tokens frozen at r = 1),
    EUR = mean f'(r) at the current temperatures plus noise. The mean EUR over the last third must sit at the target."""
    generator = torch.Generator().manual_seed(0)
    moving = torch.exp(0.02 * torch.randn(4000, generator=generator, dtype=torch.float64))
    ratios = torch.cat([moving, torch.ones(2000, dtype=torch.float64)])  # a third of the tokens never move
    positive = torch.rand(ratios.shape, generator=generator) < 0.5
    rng = random.Random(1)
    for gate_name in SOFT_GATES:
        gate = get_gate(gate_name)
        controller = EURTemperatureController(0.8, 10.0, 12.0)
        history = []
        for _ in range(300):
            tau = torch.where(positive, controller.tau_pos, controller.tau_neg).to(torch.float64)
            eur = float(gate.derivative(ratios, tau).mean()) + rng.gauss(0.0, 0.03)
            history.append(eur)
            controller.update(min(max(eur, 0.0), 1.0))
        assert sum(history[200:]) / 100 == pytest.approx(0.8, abs=0.01), gate_name


# ----------------------------------------------------------------------------------------------------------------------
# Where it can act


@pytest.mark.parametrize("gate", SOFT_GATES)
def test_soft_gates_with_off_policy_updates_can_adapt(gate: str) -> None:
    check_can_adapt(gate, True)


def test_clip_has_no_temperature_to_adapt() -> None:
    with pytest.raises(ValueError, match="gate='clip' has none"):
        check_can_adapt("clip", True)


def test_on_policy_training_gives_nothing_to_adapt() -> None:
    with pytest.raises(ValueError, match="num_iterations=1"):
        check_can_adapt("erf", False)


def test_unknown_gate_is_named() -> None:
    with pytest.raises(ValueError, match="no_such_gate"):
        check_can_adapt("no_such_gate", True)


def test_a_custom_gate_qualifies_only_if_tau_narrows_it() -> None:
    # f'(r) = (1 + (tau u)^2)^-2 narrows with tau: accepted. f'(r) = 1 / (1 + (u / tau)^2) widens: refused.
    register_gate("narrowing_test", value=lambda r, tau: 1 + ((tau * (r - 1)) / (1 + (tau * (r - 1)) ** 2)
                                                              + torch.atan(tau * (r - 1))) / (2 * tau),
                  derivative=lambda r, tau: (1 + (tau * (r - 1)) ** 2) ** -2)
    register_gate("widening_test", value=lambda r, tau: 1 + tau * torch.atan((r - 1) / tau),
                  derivative=lambda r, tau: 1 / (1 + ((r - 1) / tau) ** 2))
    try:
        check_can_adapt("narrowing_test", True)
        with pytest.raises(ValueError, match=r"widening_test.*does not fall as tau rises"):
            check_can_adapt("widening_test", True)
    finally:
        unregister_gate("narrowing_test")
        unregister_gate("widening_test")


# ----------------------------------------------------------------------------------------------------------------------
# Callback against a fake trainer


class FakeTrainer:
    """The two methods of the trainer contract, a ``_metrics`` store and the config fields the callback reads."""

    def __init__(self, eurs, **config) -> None:
        self.args = SimpleNamespace(gate_eur_target=0.8, gate_tau_pos=10.0, gate_tau_neg=12.0, gate_eur_rate=None,
                                    gate_tau_min=None, gate_tau_max=None, **config)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.eurs = list(eurs)
        self.temperatures: list[tuple[float, float]] = []

    def pop_off_policy_eur(self):
        return self.eurs.pop(0)

    def set_gate_temperatures(self, tau_pos: float, tau_neg: float) -> None:
        self.temperatures.append((tau_pos, tau_neg))


def test_callback_is_a_stateful_trainer_callback() -> None:
    callback = AdaptiveGateCallback(FakeTrainer([]))
    assert isinstance(callback, TrainerCallback) and isinstance(callback, ExportableState)


def test_callback_reads_the_config_fields_into_the_controller() -> None:
    trainer = FakeTrainer([])
    trainer.args.gate_eur_rate, trainer.args.gate_tau_min, trainer.args.gate_tau_max = 0.5, 2.0, 50.0
    callback = AdaptiveGateCallback(trainer)
    assert (callback.controller.rate, callback.controller.tau_min, callback.controller.tau_max) == (0.5, 2.0, 50.0)
    assert callback.controller.target == 0.8


def test_each_step_logs_the_temperatures_it_used_and_sets_the_next() -> None:
    trainer = FakeTrainer([None, 0.9, 0.6])
    callback = AdaptiveGateCallback(trainer)
    state = TrainerState(stateful_callbacks=[callback])
    callback.on_train_begin(None, state, TrainerControl())
    assert trainer.temperatures == [(10.0, 12.0)]
    expected = EURTemperatureController(0.8, 10.0, 12.0)
    used = []
    for eur in (None, 0.9, 0.6):
        used.append(expected.tau_pos)
        callback.on_step_end(None, state, TrainerControl())
        assert trainer.temperatures[-1] == pytest.approx(expected.update(eur))
    assert trainer._metrics["train"]["gate/tau_pos"] == pytest.approx(used)
    assert trainer._metrics["train"]["gate/tau_neg"] == pytest.approx([1.2 * tau for tau in used])


def test_callback_state_survives_trainer_state_json(tmp_path: Path) -> None:
    trainer = FakeTrainer([0.95, 0.97])
    callback = AdaptiveGateCallback(trainer)
    state = TrainerState(stateful_callbacks=[callback])
    callback.on_train_begin(None, state, TrainerControl())
    callback.on_step_end(None, state, TrainerControl())
    callback.on_step_end(None, state, TrainerControl())
    state.stateful_callbacks[type(callback).__name__] = callback.state()  # what Trainer._save_checkpoint does
    state.save_to_json(tmp_path / "trainer_state.json")

    resumed_trainer = FakeTrainer([])
    resumed = AdaptiveGateCallback(resumed_trainer)
    resumed.on_train_begin(None, TrainerState.load_from_json(tmp_path / "trainer_state.json"), TrainerControl())
    assert resumed_trainer.temperatures[-1] == pytest.approx((callback.controller.tau_pos, callback.controller.tau_neg))
    assert resumed.controller.updates == 2


def test_a_callback_without_its_trainer_says_so() -> None:
    with pytest.raises(RuntimeError, match="restore_callback_states_from_checkpoint"):
        AdaptiveGateCallback().on_train_begin(None, TrainerState(), TrainerControl())


# ----------------------------------------------------------------------------------------------------------------------
# Inside GatedGRPOTrainer: logged every step, restored on resume


def _trainer(output_dir: Path, max_steps: int):
    from fused_gates.integrations.app.data import synthetic_arithmetic
    from fused_gates.integrations.app.rewards import answer_reward, format_reward
    from fused_gates.integrations.app.tiny_model import build_tiny_model, build_tiny_tokenizer
    from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer

    tokenizer = build_tiny_tokenizer()
    config = GatedGRPOConfig(
        output_dir=str(output_dir), gate="erf", gate_tau_pos=10.0, gate_tau_neg=12.0, gate_eur_target=0.5,
        gate_eur_rate=1.0, loss_type="grpo", num_generations=4, per_device_train_batch_size=8, num_iterations=2,
        max_completion_length=6, learning_rate=5e-3, max_steps=max_steps, save_strategy="steps", save_steps=2,
        logging_steps=1, report_to="none", seed=3, use_cpu=True, disable_tqdm=True,
    )
    return GatedGRPOTrainer(model=build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=3),
                            reward_funcs=[format_reward, answer_reward], args=config,
                            train_dataset=synthetic_arithmetic(32, seed=3), processing_class=tokenizer)


def test_trainer_logs_the_temperatures_and_resumes_the_controller(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for entry in logs:
        assert entry["gate/tau_neg"] == pytest.approx(1.2 * entry["gate/tau_pos"])
    assert logs[2]["gate/tau_pos"] != 10.0  # moved after the first off-policy step
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    controller = saved["stateful_callbacks"]["AdaptiveGateCallback"]["attributes"]["controller"]
    # the state saved after step 2 is what step 3 trained with
    assert controller["tau_pos"] == pytest.approx(logs[2]["gate/tau_pos"], rel=1e-9)

    resumed = _trainer(tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed_logs = [entry for entry in resumed.state.log_history if "loss" in entry and entry["step"] > 2]
    assert resumed_logs[0]["gate/tau_pos"] == pytest.approx(controller["tau_pos"], rel=1e-9)
