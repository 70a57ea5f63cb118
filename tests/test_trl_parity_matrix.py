"""The config swap changes nothing: TRL 1.16's ``GRPOTrainer`` and ``GatedGRPOTrainer`` (no ``gate``), same kwargs, same
seed, same tiny local model and the same replayed completions of varied length, a few plain-SGD steps: loss,
``grad_norm`` and every metric TRL logs agree within 1e-5 relative in float32 at every step, and we log every key TRL
logs. One case per TRL loss type, per option and per model family; each case also checks that its option changes
TRL's own numbers against the case it is built on (an option without effect there would prove nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("trl", reason="TRL (the 'trl' extra) is needed for the parity matrix")

import trl_fixtures as fixtures
from trl import GRPOConfig, GRPOTrainer

from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer


@dataclass(frozen=True)
class Case:
    options: dict[str, Any] = field(default_factory=dict)
    builds_on: str | None = "dapo"  # the case whose TRL numbers this case's option must change
    family: str = "dense"
    tool_mask: bool = False
    vllm: bool = False  # the replayed log-probs act as a vLLM sampler's (importance-sampling correction)
    unscorable: bool = False  # some sampler log-probs missing (NaN), as vLLM can return
    evaluate: bool = False


VLLM_TOKEN = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.5)
EVAL = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)

CASES: dict[str, Case] = {
    # every TRL 1.16 loss type (dapo is TRL's default)
    "dapo": Case(builds_on=None),
    "grpo": Case(dict(loss_type="grpo")),
    "bnpo": Case(dict(loss_type="bnpo"), "grpo"),  # on one micro-batch per generation batch bnpo equals dapo
    "dr_grpo": Case(dict(loss_type="dr_grpo")),
    "luspo": Case(dict(loss_type="luspo", importance_sampling_level="sequence")),
    "sapo": Case(dict(loss_type="sapo")),
    "sapo_temperatures": Case(dict(loss_type="sapo", sapo_temperature_pos=3.0, sapo_temperature_neg=4.0), "sapo"),
    "cispo": Case(dict(loss_type="cispo", epsilon_high=1.05)),
    "vespo": Case(dict(loss_type="vespo")),
    # every option
    "delta": Case(dict(delta=1.15)),
    "top_entropy_quantile": Case(dict(top_entropy_quantile=0.4)),
    "off_policy_mask": Case(dict(off_policy_mask_threshold=0.01)),
    "entropy_coef": Case(dict(entropy_coef=0.3)),
    # the controller's window spans the micro-batches of an optimiser step
    "adaptive_entropy": Case(dict(use_adaptive_entropy=True, entropy_coef=0.3, entropy_target=10.0,
                                  entropy_coef_delta=0.2, gradient_accumulation_steps=2,
                                  per_device_train_batch_size=4), "entropy_coef"),
    "kl_bias_corrected": Case(dict(beta=0.2)),  # TRL's default use_bias_correction_kl=True
    "kl_plain": Case(dict(beta=0.2, use_bias_correction_kl=False), "kl_bias_corrected"),
    "sequence_level": Case(dict(loss_type="grpo", importance_sampling_level="sequence"), "grpo"),
    "vllm_sequence_mask": Case(vllm=True),  # TRL's default mode
    "vllm_token_truncate": Case(VLLM_TOKEN, vllm=True),
    "vllm_off_policy_mask": Case(dict(off_policy_mask_threshold=0.01), "vllm_sequence_mask", vllm=True),
    "vllm_unscorable_tokens": Case(dict(off_policy_mask_threshold=0.01), "vllm_off_policy_mask", vllm=True,
                                   unscorable=True),
    "vespo_vllm": Case(dict(loss_type="vespo", **VLLM_TOKEN), "vespo", vllm=True),
    "tool_mask": Case(tool_mask=True),
    "gradient_accumulation": Case(dict(loss_type="bnpo", gradient_accumulation_steps=2,
                                       per_device_train_batch_size=4), "bnpo"),
    "generation_spans_steps": Case(dict(per_device_train_batch_size=4, steps_per_generation=2, num_iterations=1)),
    "single_iteration": Case(dict(num_iterations=1)),
    "temperature": Case(dict(temperature=0.6)),
    # a float32 model: the cast cannot change the numbers; the case checks the head's float32 path
    "cast_lm_head_to_fp32": Case(dict(cast_lm_head_to_fp32=True), builds_on=None),
    "eval": Case(EVAL, builds_on=None, evaluate=True),
    "eval_num_generations": Case(dict(**EVAL, num_generations_eval=2), "eval", evaluate=True),
    # every model family TRL's fused head handles
    "tied": Case(family="tied"),
    "softcapped": Case(family="softcapped"),
    "scaled_logit_scale": Case(family="scaled_logit_scale"),
    "scaled_logits_scaling": Case(family="scaled_logits_scaling"),
    "scaled_hyperclovax": Case(family="scaled_hyperclovax"),
    "scaled_lm_head_multiplier": Case(family="scaled_lm_head_multiplier"),
    "moe_no_router_loss": Case(dict(router_aux_loss_coef=0.0), builds_on=None, family="moe"),
    "moe": Case(builds_on="moe_no_router_loss", family="moe"),  # the config's coefficient, 0.5
    "moe_accumulation": Case(dict(gradient_accumulation_steps=2, per_device_train_batch_size=4), "moe",
                             family="moe"),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with fixtures.single_thread():
        yield


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return fixtures.save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def run(trainer_class, config_class, case: Case, model_dir: str, output_dir) -> list[dict[str, float]]:
    trainer = fixtures.train(trainer_class, config_class, model_dir, output_dir, case.options,
                             tool_mask=case.tool_mask, vllm=case.vllm, unscorable=case.unscorable,
                             evaluate=case.evaluate)
    return fixtures.step_logs(trainer)


@pytest.fixture(scope="module")
def trl_runs(model_dirs, tmp_path_factory):
    cache: dict[str, list[dict[str, float]]] = {}

    def get(name: str) -> list[dict[str, float]]:
        if name not in cache:
            case = CASES[name]
            cache[name] = run(GRPOTrainer, GRPOConfig, case, model_dirs[case.family],
                              tmp_path_factory.mktemp(f"trl-{name}"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_gated_trainer_without_gate_reproduces_trl(name, model_dirs, trl_runs, tmp_path):
    case = CASES[name]
    theirs = trl_runs(name)
    ours = run(GatedGRPOTrainer, GatedGRPOConfig, case, model_dirs[case.family], tmp_path / "ours")
    assert len(theirs) >= fixtures.TRAINING["max_steps"]
    mismatches = fixtures.log_mismatches(theirs, ours)
    assert not mismatches, "\n".join(mismatches)
    if case.builds_on is not None:
        # the option changes TRL's own loss or gradient somewhere in the run
        reference = trl_runs(case.builds_on)
        keys = ("eval_loss",) if case.evaluate else ("loss", "grad_norm")
        changed = [(step, key) for step, (a, b) in enumerate(zip(theirs, reference, strict=True)) for key in keys
                   if key in a and not fixtures.close(a[key], b[key])]
        assert changed, f"{name}: TRL's numbers equal those of {case.builds_on!r}: the case tests nothing"
