"""GatedGRPOTrainer beyond TRL's options: the gate, its refusals, prompt groups through TRL's shuffle, off-policy EUR,
the adaptive temperature's interface, the options that reach the loss, and LoRA.

(TRL's own objectives and options, without a gate, are in ``test_trl_parity_matrix.py``.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the trainer tests")

import trl_fixtures as fixtures
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import fused_gates.integrations.trl.trainer as gated_trl
from fused_gates import PAPER_GATES, GatedPolicyLossOutput
from fused_gates.integrations.trl import GROUP_KEY, GatedGRPOConfig, GatedGRPOTrainer
from fused_gates.integrations.trl.config import TRL_OBJECTIVES, resolve_objective
from fused_gates.integrations.trl.metrics import LossMetrics, MetricSettings

pytestmark = pytest.mark.usefixtures("single_threaded")


def config(**options) -> GatedGRPOConfig:
    return GatedGRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **options)


# -- the configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", list(TRL_OBJECTIVES))
def test_no_gate_is_the_trl_objective_of_the_loss_type(loss_type):
    objective = resolve_objective(config(loss_type=loss_type, sapo_temperature_pos=2.0, sapo_temperature_neg=3.0))
    assert (objective.gate, objective.aggregation) == TRL_OBJECTIVES[loss_type]
    assert (objective.tau_pos, objective.tau_neg) == ((2.0, 3.0) if loss_type == "sapo" else (None, None))


def test_trl_defaults_are_dapo_with_the_clip():
    objective = resolve_objective(config())
    assert (objective.gate, objective.aggregation) == ("clip", "dapo")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo"])
def test_a_gate_keeps_the_aggregation(loss_type):
    objective = resolve_objective(config(loss_type=loss_type, gate="erf"))
    assert objective.gate == "erf"
    assert objective.aggregation == TRL_OBJECTIVES[loss_type][1]
    assert (objective.tau_pos, objective.tau_neg) == (1.0, 1.05)  # TRL's sapo temperatures by default


MEANINGLESS = {
    "gate_replacing_cispo": (dict(loss_type="cispo", gate="erf"), "detached weight"),
    "gate_replacing_vespo": (dict(loss_type="vespo", gate="sigmoid"), "detached weight"),
    "delta_without_clip": (dict(loss_type="sapo", delta=1.5), "delta caps"),
    "temperature_of_the_clip": (dict(gate_tau_pos=2.0), "gate_tau_pos: gate 'clip' has no temperature"),
    "temperature_of_cispo": (dict(loss_type="cispo", gate_tau_neg=2.0), "gate 'cispo' has no temperature"),
    "unknown_gate": (dict(gate="tanh"), "gate:"),
    "non_positive_temperature": (dict(gate="erf", gate_tau_pos=0.0), "gate_tau_pos: must be .*> 0"),
    "non_positive_sapo_temperature": (dict(loss_type="sapo", sapo_temperature_neg=-1.0),
                                      "sapo_temperature_neg: must be .*> 0"),
    "unknown_backend": (dict(gate_backend="cuda"), "gate_backend='cuda'"),
    "unknown_nonfinite_policy": (dict(gate_on_nonfinite="skip"), "gate_on_nonfinite='skip'"),
    "rate_without_target": (dict(gate="erf", gate_eur_rate=0.5), "gate_eur_rate is set without gate_eur_target"),
    "target_out_of_range": (dict(gate="erf", gate_eur_target=1.5), "gate_eur_target: must be in"),
    "crossed_bounds": (dict(gate="erf", gate_eur_target=0.8, gate_tau_min=5.0, gate_tau_max=2.0), "gate_tau_min"),
}


@pytest.mark.parametrize("case", MEANINGLESS.values(), ids=MEANINGLESS.keys())
def test_meaningless_settings_are_refused_with_the_configuration(case):
    options, message = case
    with pytest.raises(ValueError, match=message):
        config(**options)


@pytest.mark.parametrize("case", [
    (dict(gate="erf"), "erf"),  # TRL's default num_iterations=1: every ratio is 1
    (dict(), "clip"),  # the default objective has no temperature
], ids=["on_policy_only", "clip"])
def test_adaptive_temperature_refused_before_any_model_is_loaded(tmp_path, case):
    options, _ = case
    args = config(gate_eur_target=0.8, **options)
    missing_model = str(tmp_path / "no-such-model")  # loading it would raise OSError, not ValueError
    with pytest.raises(ValueError, match="adaptive gate temperature"):
        GatedGRPOTrainer(model=missing_model, reward_funcs=fixtures.reward, args=args,
                         train_dataset=fixtures.prompts_dataset())


def test_adaptive_temperature_refuses_rebuilding_its_callback_from_a_checkpoint(tmp_path):
    args = config(gate="erf", num_iterations=2, gate_eur_target=0.8, restore_callback_states_from_checkpoint=True)
    with pytest.raises(ValueError, match="gate_eur_target: restore_callback_states_from_checkpoint"):
        GatedGRPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=fixtures.reward, args=args,
                         train_dataset=fixtures.prompts_dataset())


def test_settings_changed_after_the_configuration_are_checked_before_loading(tmp_path):
    args = config()
    args.loss_type = "cispo"
    args.gate = "softsign"
    with pytest.raises(ValueError, match="detached weight"):
        GatedGRPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=fixtures.reward, args=args,
                         train_dataset=fixtures.prompts_dataset())


# -- a gate replaces the ratio function and keeps the aggregation: parity with TRL where TRL has the combination ----

SAME_OBJECTIVE = {
    "sigmoid_with_grpo_is_sapo": (dict(gate="sigmoid", loss_type="grpo", gate_tau_pos=3.0, gate_tau_neg=4.0),
                                  dict(loss_type="sapo", sapo_temperature_pos=3.0, sapo_temperature_neg=4.0)),
    "clip_with_sapo_is_grpo": (dict(gate="clip", loss_type="sapo"), dict(loss_type="grpo")),
    "cispo_with_dapo_is_cispo": (dict(gate="cispo", loss_type="dapo", epsilon_high=1.05),
                                 dict(loss_type="cispo", epsilon_high=1.05)),
}


@pytest.mark.parametrize("case", SAME_OBJECTIVE.values(), ids=SAME_OBJECTIVE.keys())
def test_gate_and_aggregation_equal_trls_objective(case, model_dir, tmp_path):
    ours_options, trl_options = case
    theirs = fixtures.train(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "trl", trl_options)
    ours = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path / "ours", ours_options)
    mismatches = fixtures.log_mismatches(fixtures.step_logs(theirs), fixtures.step_logs(ours))
    assert not mismatches, "\n".join(mismatches)


# -- training with the paper's gates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", PAPER_GATES)
def test_training_with_each_gate_logs_on_and_off_policy_eur(gate, model_dir, tmp_path):
    options = dict(gate=gate, loss_type="grpo", max_steps=4)
    if gate != "clip":
        options.update(gate_tau_pos=10.0, gate_tau_neg=12.0)
    trainer = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path, options)
    logs = fixtures.step_logs(trainer)
    assert len(logs) == 4
    # num_iterations=2: steps 1 and 3 train on a fresh batch, steps 2 and 4 reuse it after an update
    assert ["eur/on_policy" in e for e in logs] == [True, False, True, False]
    assert ["eur/off_policy" in e for e in logs] == [False, True, False, True]
    for entry in logs:
        for key in ("eur", "entropy", "gate/mean", "ratio/mean", "ratio/min", "ratio/max", "nonfinite_tokens"):
            assert math.isfinite(entry[key]), key
    for entry in logs[0::2]:
        assert entry["eur"] == entry["eur/on_policy"] == 1.0  # ratios exactly 1
    assert all(entry["eur/off_policy"] < 1.0 for entry in logs[1::2])  # some updates damped


# -- prompt groups through TRL's shuffle -----------------------------------------------------------------------------


def generation_batches(trainer):
    """The micro-batches TRL cuts from one generation batch (shuffled, split), as training sees them."""
    trainer.model.train()
    rows = next(iter(trainer.get_train_dataloader()))
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._prepare_inputs(rows)
    return trainer._buffered_inputs


def test_prompt_groups_survive_the_shuffle_and_split(model_dir, tmp_path):
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "per_device_train_batch_size": 4,
                                                        "steps_per_generation": 4})
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION))
    prompt_of_group: dict[int, tuple] = {}
    rows_of_group: dict[int, int] = defaultdict(int)
    mixed = False
    for batch in generation_batches(trainer):
        groups = batch[GROUP_KEY].tolist()
        mixed |= len(set(groups)) > 1 and any(groups.count(g) < 4 for g in groups)
        for row, group in enumerate(groups):
            prompt = tuple(batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist())
            assert prompt_of_group.setdefault(group, prompt) == prompt  # a group is one prompt
            rows_of_group[group] += 1
    assert sorted(rows_of_group.values()) == [4] * 4  # 16 rows: 4 prompts x num_generations
    assert len(set(prompt_of_group.values())) == 4
    assert mixed, "the shuffle left every micro-batch with whole groups: the case tests nothing"


def test_evaluation_groups_by_num_generations_eval(model_dir, tmp_path):
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "per_device_eval_batch_size": 8,
                                                        "num_generations_eval": 2, "eval_strategy": "steps"})
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), eval_dataset=fixtures.prompts_dataset(4),
                               processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION))
    trainer.model.eval()
    rows = next(iter(trainer.get_eval_dataloader()))
    batch = trainer._generate_and_score_completions(rows)
    assert batch[GROUP_KEY].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def fake_output(gate_grad: torch.Tensor, mask: torch.Tensor) -> GatedPolicyLossOutput:
    zeros = torch.zeros_like(gate_grad)
    return GatedPolicyLossOutput(loss=torch.zeros(()), logprobs=zeros, entropy=zeros, ratio=torch.ones_like(zeros),
                                 gate_value=zeros, gate_grad=gate_grad * mask, kl=zeros, policy_weight=zeros + 1,
                                 eur=torch.zeros(()), metrics={})


def test_eur_is_the_mean_over_prompt_groups_of_their_token_means():
    # rows 0 and 2 are one group (3 + 1 tokens), row 1 another (2 tokens), row 3 a group without tokens
    gate_grad = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 0.0], [0.8, 0.0, 0.0], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    accelerator = SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x)
    settings = MetricSettings(resolve_objective(config(gate="erf")), 0.2, 0.2, None, False, 0.0)
    store = defaultdict(list)
    parts = LossMetrics(accelerator, settings).record(store, fake_output(gate_grad, mask), mask,
                                                      torch.tensor([1.0, -1.0, 1.0, 0.5]),
                                                      group_ids=torch.tensor([0, 1, 0, 2]), off_policy=True)
    expected = ((0.2 + 0.4 + 0.6 + 0.8) / 4 + (1.0 + 0.5) / 2) / 2
    assert store["eur"][-1] == pytest.approx(expected)
    token_mean = (0.2 + 0.4 + 0.6 + 1.0 + 0.5 + 0.8) / 6
    assert store["eur/off_policy"][-1] == pytest.approx(token_mean)
    assert parts.tolist() == pytest.approx([token_mean * 6, 6.0])


# -- off-policy EUR and the adaptive temperature's interface ----------------------------------------------------------


class PopEachStep(TrainerCallback):
    def __init__(self, trainer_box):
        self.trainer_box, self.popped = trainer_box, []

    def on_step_end(self, args, state, control, **kwargs):
        self.popped.append(self.trainer_box[0].pop_off_policy_eur())


@pytest.mark.parametrize("options", [
    dict(num_iterations=2),
    dict(num_iterations=1, per_device_train_batch_size=4, steps_per_generation=2),  # a batch spans two steps
], ids=["second_iteration", "generation_spans_steps"])
def test_off_policy_eur_is_popped_once_per_step(options, model_dir, tmp_path):
    box: list = []
    callback = PopEachStep(box)

    class Trainer(GatedGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            box.append(self)

    trainer = fixtures.train(Trainer, GatedGRPOConfig, model_dir, tmp_path,
                             dict(gate="erf", gate_tau_pos=10.0, gate_tau_neg=12.0, max_steps=4, **options),
                             callbacks=[callback])
    logs = fixtures.step_logs(trainer)
    assert [p is None for p in callback.popped] == [True, False, True, False]
    for popped, entry in zip(callback.popped, logs, strict=True):
        if popped is not None:  # one micro-batch per step: the step's token-weighted EUR
            assert popped == pytest.approx(entry["eur/off_policy"], rel=1e-6)
    assert trainer.pop_off_policy_eur() is None  # emptied


def batch_loss(trainer, inputs) -> float:
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, inputs).item()


def test_set_gate_temperatures_applies_to_later_losses(model_dir, tmp_path):
    def build(tau_pos, tau_neg, path):
        args = GatedGRPOConfig(output_dir=str(path), **{**fixtures.TRAINING, "gate": "erf", "gate_tau_pos": tau_pos,
                                                        "gate_tau_neg": tau_neg})
        return GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                                train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                                rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION))

    trainer, reference = build(1.0, 1.05, tmp_path / "a"), build(6.0, 9.0, tmp_path / "b")
    inputs = generation_batches(trainer)[0]
    g = torch.Generator().manual_seed(0)
    inputs["old_per_token_logps"] = batch_loss_logps(trainer, inputs) + 0.3 * torch.randn(
        inputs["completion_ids"].shape, generator=g)
    before = batch_loss(trainer, inputs)
    trainer.set_gate_temperatures(6.0, 9.0)
    assert trainer.gate_temperatures == (6.0, 9.0)
    after = batch_loss(trainer, inputs)
    assert after == pytest.approx(batch_loss(reference, inputs), rel=1e-6)
    assert after != pytest.approx(before, rel=1e-3)
    with pytest.raises(ValueError, match=r"tau_neg: must be .*> 0"):
        trainer.set_gate_temperatures(1.0, 0.0)


def batch_loss_logps(trainer, inputs) -> torch.Tensor:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                 inputs["completion_ids"].size(1))
    return logps


def test_a_gate_without_temperature_refuses_temperatures(model_dir, tmp_path):
    args = GatedGRPOConfig(output_dir=str(tmp_path), **fixtures.TRAINING)
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer())
    with pytest.raises(ValueError, match="gate 'clip' has no temperature"):
        trainer.set_gate_temperatures(2.0, 2.0)


def test_adaptive_temperature_callback_drives_the_trainer(model_dir, tmp_path):
    from fused_gates.integrations.trl import adaptive_gate as adaptive

    trainer = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path,
                             dict(gate="erf", gate_tau_pos=2.0, gate_tau_neg=3.0, gate_eur_target=0.5,
                                  gate_eur_rate=1.0, max_steps=4))
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, adaptive.AdaptiveGateCallback)]
    assert len(callbacks) == 1 and callbacks[0].trainer is trainer
    tau_pos, tau_neg = trainer.gate_temperatures
    assert (tau_pos, tau_neg) != (2.0, 3.0)  # the off-policy steps moved them
    assert tau_neg / tau_pos == pytest.approx(1.5)
    assert all("gate/tau_pos" in entry for entry in fixtures.step_logs(trainer))


# -- options that reach the loss -------------------------------------------------------------------------------------


def spy_on_loss(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = gated_trl.gated_policy_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gated_trl, "gated_policy_loss", spy)
    return calls


def test_nonfinite_policy_backend_and_groups_reach_the_loss(model_dir, tmp_path, monkeypatch):
    calls = spy_on_loss(monkeypatch)
    trainer = fixtures.train(GatedGRPOTrainer, GatedGRPOConfig, model_dir, tmp_path,
                             dict(gate="erf", gate_on_nonfinite="zero", gate_backend="torch", max_steps=1))
    assert calls and all(c["on_nonfinite"] == "zero" and c["backend"] == "torch" for c in calls)
    assert all(c["group_ids"].tolist() and len(c["group_ids"]) == 8 for c in calls)
    assert fixtures.step_logs(trainer)[0]["nonfinite_tokens"] == 0.0


def test_entropy_quantile_takes_its_entropies_from_the_same_forward(model_dir, tmp_path, monkeypatch):
    calls = spy_on_loss(monkeypatch)
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "top_entropy_quantile": 0.5})
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION))
    inputs = generation_batches(trainer)[0]
    backbone = trainer.model.model
    forwards = []
    handle = backbone.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        batch_loss(trainer, inputs)
    finally:
        handle.remove()
    assert len(forwards) == 1  # one backbone forward for the entropies and the loss
    entropy_mask = calls[-1]["entropy_mask"]
    valid = inputs["completion_mask"].bool()
    assert entropy_mask is not None and 0 < entropy_mask[valid].float().mean() < 1


# -- LoRA --------------------------------------------------------------------------------------------------------------


def test_lora_with_gradient_checkpointing_trains_adapters_only(model_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT (the 'trl' extra) is needed for the LoRA test")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = GatedGRPOConfig(output_dir=str(tmp_path), **{**fixtures.TRAINING, "gate": "erf", "gate_tau_pos": 10.0,
                                                        "gate_tau_neg": 12.0, "beta": 0.05,
                                                        "gradient_checkpointing": True, "max_steps": 2})
    trainer = GatedGRPOTrainer(model=model_dir, reward_funcs=fixtures.reward, args=args,
                               train_dataset=fixtures.prompts_dataset(), processing_class=fixtures.tiny_tokenizer(),
                               rollout_func=fixtures.ReplayRollout(fixtures.MAX_COMPLETION), peft_config=lora)
    lm_head = trainer.model.get_output_embeddings().weight
    assert not lm_head.requires_grad  # frozen head: the fused loss skips dW
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in adapters.items())
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())
    logs = fixtures.step_logs(trainer)
    assert logs and all(math.isfinite(entry["kl"]) for entry in logs)
