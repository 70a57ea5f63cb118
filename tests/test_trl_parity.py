"""Parity with TRL 1.16's own loss: ``GRPOTrainer._compute_loss`` run on the same log-probs.

TRL's method is called on a minimal stand-in trainer whose ``_get_per_token_logps_and_entropies`` returns
log-probs and entropies of materialised float64 logits, so TRL's own formulas (SAPO, clipped GRPO/DAPO, KL,
sequence-level ratios, entropy bonus, clip metrics) produce the loss and, through autograd, the gradients.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers import make_inputs, max_abs

from fused_gates import gated_policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL (the 'trl' extra) is needed for parity tests")


class TRLLossOnly:
    """The attributes ``GRPOTrainer._compute_loss`` reads, for one process without gradient accumulation."""

    def __init__(self, logps, entropies, *, loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                 importance_sampling_level="token", tau_pos=1.0, tau_neg=1.05, entropy_coef=0.0,
                 use_bias_correction_kl=False, max_completion_length=None):
        self._logps, self._entropies = logps, entropies
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.importance_sampling_level = importance_sampling_level
        self.beta = beta
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.args = SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=None,
                                    sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
                                    steps_per_generation=1)
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = max_completion_length
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                           gather_for_metrics=lambda x: x, sync_gradients=True)
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = entropy_coef != 0
        self.entropy_coef = entropy_coef
        self.use_adaptive_entropy = False
        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, self._entropies, None


def trl_loss(inputs, leaves, num_items=None, **options):
    h, w, b = leaves
    logits = (h @ w.T + b) / options.pop("temperature", 1.0)
    log_probs = torch.log_softmax(logits, -1)
    logps = log_probs.gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1)
    entropies = -(log_probs.exp() * log_probs).sum(-1)
    trainer = TRLLossOnly(logps, entropies, **options)
    batch = {
        "prompt_ids": torch.zeros(inputs.ids.shape[0], 0, dtype=torch.long),
        "prompt_mask": torch.zeros(inputs.ids.shape[0], 0, dtype=torch.long),
        "completion_ids": inputs.ids,
        "completion_mask": inputs.mask,
        "advantages": inputs.advantages,
        "old_per_token_logps": inputs.old,
        "ref_per_token_logps": inputs.ref,
        "num_items_in_batch": torch.tensor(float(inputs.mask.sum() if num_items is None else num_items)),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


CASES = {
    # TRL loss_type -> our (gate, loss_type)
    # temperatures exact in float32: TRL builds its temperature tensor in the default dtype
    "sapo_is_sigmoid_grpo": ("sapo", dict(gate="sigmoid", loss_type="grpo", tau_pos=1.0, tau_neg=1.25)),
    "sapo_asymmetric_temperatures": ("sapo", dict(gate="sigmoid", loss_type="grpo", tau_pos=10.0, tau_neg=12.0)),
    "grpo_is_clip_grpo": ("grpo", dict(gate="clip", loss_type="grpo")),
    "dapo_is_clip_dapo": ("dapo", dict(gate="clip", loss_type="dapo", epsilon_high=0.25)),
    "bnpo_clip_kl_entropy": ("bnpo", dict(gate="clip", loss_type="bnpo", beta=0.05, entropy_coef=0.02)),
    "dr_grpo_clip_sequence": ("dr_grpo", dict(gate="clip", loss_type="dr_grpo", max_completion_length=8,
                                              importance_sampling_level="sequence")),
    "sapo_sequence_kl_bias_correction": ("sapo", dict(gate="sigmoid", loss_type="grpo", beta=0.1, tau_neg=1.5,
                                                      use_bias_correction_kl=True,
                                                      importance_sampling_level="sequence")),
    "grpo_temperature": ("grpo", dict(gate="clip", loss_type="grpo", temperature=0.6)),
}

SHARED = ("beta", "epsilon_low", "epsilon_high", "importance_sampling_level", "tau_pos", "tau_neg", "entropy_coef",
          "use_bias_correction_kl", "max_completion_length", "temperature")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_gradients_and_metrics_equal_trl(case):
    trl_type, ours = case
    inputs = make_inputs(batch=4, length=6, hidden_size=10, vocab=41, seed=21, log_ratio_scale=1.0)
    leaves = inputs.leaves()
    trl_options = {k: v for k, v in ours.items() if k in SHARED}
    if ours["gate"] == "clip" and "epsilon_high" not in trl_options:
        trl_options["epsilon_high"] = 0.2
    expected, trl_metrics = trl_loss(inputs, leaves, loss_type=trl_type, **trl_options)
    expected.backward()

    h, w, b = inputs.leaves()
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=b,
                            memory_budget_mb=0.02, **ours)
    out.loss.backward()
    scale = max(expected.abs().item(), 1e-3)
    assert max_abs(out.loss, expected) <= 1e-10 * scale
    for ours_grad, trl_grad in ((h.grad, leaves[0].grad), (w.grad, leaves[1].grad), (b.grad, leaves[2].grad)):
        assert max_abs(ours_grad, trl_grad) <= 1e-9 * trl_grad.abs().max().item()
    assert out.metrics["entropy"].item() == pytest.approx(trl_metrics["entropy"], rel=1e-10)
    if "kl" in trl_metrics:
        assert out.metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-10)
    if ours["gate"] == "clip":
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            # TRL averages its clip indicators in float32
            assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-7), key
        if ours.get("importance_sampling_level", "token") == "token":
            assert trl_metrics["clip_ratio/region_mean"] > 0  # the case exercises clipping
            assert out.eur.item() == pytest.approx(1 - trl_metrics["clip_ratio/region_mean"], abs=1e-7)
