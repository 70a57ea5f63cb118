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
                 use_bias_correction_kl=False, max_completion_length=None, delta=None, vespo_k=(2.0, 3.0),
                 vespo_lambda=(3.0, 2.0), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                 sampling_correction=False):
        self._logps, self._entropies = logps, entropies
        self.top_entropy_quantile = top_entropy_quantile
        self.off_policy_mask_threshold = off_policy_mask_threshold
        self.importance_sampling_level = importance_sampling_level
        self.beta = beta
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.args = SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                    sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
                                    vespo_k_pos=vespo_k[0], vespo_k_neg=vespo_k[1], vespo_lambda_pos=vespo_lambda[0],
                                    vespo_lambda_neg=vespo_lambda[1], steps_per_generation=1)
        self.use_vllm = sampling_correction
        self.vllm_importance_sampling_correction = sampling_correction
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = max_completion_length
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                           gather_for_metrics=lambda x: x, sync_gradients=True,
                                           pad_across_processes=lambda x, dim, pad_index: x)
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = entropy_coef != 0
        self.entropy_coef = entropy_coef
        self.use_adaptive_entropy = False
        self._metrics = {"train": defaultdict(list)}
        self.get_gamma_weights = trl_grpo.GRPOTrainer.get_gamma_weights
        self.get_off_policy_mask = trl_grpo.GRPOTrainer.get_off_policy_mask

    def get_high_entropy_mask(self, entropies, mask, threshold):
        mask_ = trl_grpo.GRPOTrainer.get_high_entropy_mask(self, entropies, mask, threshold)
        self.entropy_mask = mask_
        return mask_

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, self._entropies, None


def trl_loss(inputs, leaves, num_items=None, sampling=None, **options):
    """TRL's loss and metrics on materialised float64 logits; returns the entropy mask TRL used (if any)."""
    h, w, b = leaves
    logits = h @ w.T + b
    softcap = options.pop("logit_softcap", None)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / options.pop("temperature", 1.0)
    log_probs = torch.log_softmax(logits, -1)
    logps = log_probs.gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1)
    entropies = -(log_probs.exp() * log_probs).sum(-1)
    trainer = TRLLossOnly(logps, entropies, sampling_correction=sampling is not None, **options)
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
    if sampling is not None:
        batch.update(sampling)
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, getattr(trainer, "entropy_mask", None)


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
    "luspo_is_clip_luspo": ("luspo", dict(gate="clip", loss_type="luspo", importance_sampling_level="sequence")),
    "dapo_two_sided_clip": ("dapo", dict(gate="clip", loss_type="dapo", delta=1.25)),
    "cispo_is_cispo_dapo": ("cispo", dict(gate="cispo", loss_type="dapo", epsilon_high=1.1)),
    "vespo_is_vespo_dapo": ("vespo", dict(gate="vespo", loss_type="dapo", vespo_k=(1.5, 2.5),
                                          vespo_lambda=(2.5, 1.5))),
    "dapo_entropy_quantile": ("dapo", dict(gate="clip", loss_type="dapo", top_entropy_quantile=0.5,
                                           entropy_coef=0.05)),
    "grpo_off_policy_mask": ("grpo", dict(gate="clip", loss_type="grpo", off_policy_mask_threshold=0.05)),
    "dapo_sampling_ratio": ("dapo", dict(gate="clip", loss_type="dapo", sampling=True)),
    "vespo_sampling_ratio": ("vespo", dict(gate="vespo", loss_type="dapo", sampling=True)),
    "sapo_off_policy_mask_sampling": ("sapo", dict(gate="sigmoid", loss_type="grpo", tau_pos=1.0, tau_neg=1.25,
                                                   sampling=True, off_policy_mask_threshold=0.05)),
    "grpo_logit_softcap": ("grpo", dict(gate="clip", loss_type="grpo", logit_softcap=2.0, temperature=0.8)),
}

SHARED = ("beta", "epsilon_low", "epsilon_high", "importance_sampling_level", "tau_pos", "tau_neg", "entropy_coef",
          "use_bias_correction_kl", "max_completion_length", "temperature", "delta", "vespo_k", "vespo_lambda",
          "top_entropy_quantile", "off_policy_mask_threshold", "logit_softcap")
TRL_ONLY = ("top_entropy_quantile",)  # TRL computes the mask from its entropies; we pass it in
ROW_METRICS = {"vespo/phi_seq_mean"}


def sampler_inputs(inputs, generator) -> dict[str, torch.Tensor]:
    """A sampler's log-probs near the old ones and TRL's truncated per-token importance ratio from them."""
    sampling = inputs.old + 0.4 * torch.randn(inputs.old.shape, generator=generator, dtype=inputs.old.dtype)
    ratio = torch.exp((inputs.old - sampling) * inputs.mask).clamp(max=2.0)
    return {"sampling_per_token_logps": sampling, "importance_sampling_ratio": ratio}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_gradients_and_metrics_equal_trl(case):
    trl_type, ours = case
    ours = dict(ours)
    inputs = make_inputs(batch=4, length=6, hidden_size=10, vocab=41, seed=21, log_ratio_scale=1.0)
    sampling = sampler_inputs(inputs, torch.Generator().manual_seed(4)) if ours.pop("sampling", False) else None
    leaves = inputs.leaves()
    trl_options = {k: v for k, v in ours.items() if k in SHARED}
    if ours["gate"] in ("clip", "cispo") and "epsilon_high" not in trl_options:
        trl_options["epsilon_high"] = 0.2
    expected, trl_metrics, entropy_mask = trl_loss(inputs, leaves, sampling=sampling, loss_type=trl_type,
                                                   **trl_options)
    expected.backward()

    h, w, b = inputs.leaves()
    options = {k: v for k, v in ours.items() if k not in TRL_ONLY}
    if entropy_mask is not None:
        options["entropy_mask"] = entropy_mask
    if sampling is not None:
        options["sampling_ratio"] = sampling["importance_sampling_ratio"]
        if "off_policy_mask_threshold" in options:
            options["sampling_logprobs"] = sampling["sampling_per_token_logps"]
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=b,
                            memory_budget_mb=0.02, **options)
    out.loss.backward()
    scale = max(expected.abs().item(), 1e-3)
    assert max_abs(out.loss, expected) <= 1e-10 * scale
    for ours_grad, trl_grad in ((h.grad, leaves[0].grad), (w.grad, leaves[1].grad), (b.grad, leaves[2].grad)):
        assert max_abs(ours_grad, trl_grad) <= 1e-9 * trl_grad.abs().max().item()
    assert out.metrics["entropy"].item() == pytest.approx(trl_metrics["entropy"], rel=1e-10)
    if "kl" in trl_metrics:
        assert out.metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-10)
    if "policy_loss" in trl_metrics:
        assert out.metrics["policy_loss"].item() == pytest.approx(trl_metrics["policy_loss"], rel=1e-10)
    if ours["gate"] == "clip":
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            # TRL averages its clip indicators in float32
            assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-7), key
        if ours.get("importance_sampling_level", "token") == "token" and not {"delta", "logit_softcap"} & set(ours):
            assert trl_metrics["clip_ratio/region_mean"] > 0  # the case exercises clipping
            assert out.eur.item() == pytest.approx(1 - trl_metrics["clip_ratio/region_mean"], abs=1e-7)
