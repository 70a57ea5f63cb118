"""The specification: a naive reference of the loss that every backend is compared with (materialised logits,
float64, autograd).

Written from the paper's equations and TRL 1.16's ``_compute_loss`` directly, importing nothing else from this
package (a test enforces it): gate values are the paper's formulas and their derivatives come from autograd, so a
wrong closed-form f' in the package shows up as a gradient mismatch. The tests, the benchmarks' correctness checks
and the GPU checks all compare with :func:`reference_loss`.

Conventions it fixes: EUR (paper eq. 12) is the mean over prompt groups of the group's token mean of f'(r) with
the mask's weights; groups without a valid token are left out, no valid token at all gives 0, and without
``group_size`` the batch is one group. ``nonfinite_tokens`` counts tokens with the mask set whose log-prob or
entropy is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def reference_gate_value(name: str, ratio: Tensor, advantages: Tensor, opts: dict) -> Tensor:
    tau = torch.where(advantages > 0, torch.tensor(opts["tau_pos"], dtype=ratio.dtype),
                      torch.tensor(opts["tau_neg"], dtype=ratio.dtype))
    u = ratio - 1
    if name == "sigmoid":  # eq. 3
        return torch.sigmoid(tau * u) * 4 / tau
    if name == "erf":  # eq. 6
        c = torch.sqrt(math.pi / (2 * tau**2))
        return c * (1 + torch.erf(tau * u / math.sqrt(2))) + 1 - c
    if name == "arctan":  # eq. 7
        return 1 + torch.atan(tau * u) / tau
    if name == "softsign":  # eq. 8
        return 1 + u / torch.sqrt(1 + tau**2 * u**2)
    raise ValueError(name)


@dataclass
class ReferenceResult:
    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    eur: Tensor
    metrics: dict[str, Tensor]


def reference_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    gate: str = "sigmoid",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    bias: Tensor | None = None,
    group_size: int | None = None,
    custom_value=None,
) -> ReferenceResult:
    """Differentiable w.r.t. whichever of hidden / weight / bias require grad (use float64 leaves)."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    batch, length, _ = hidden.shape
    mask = torch.ones(batch, length, dtype=hidden.dtype)
    if completion_mask is not None:
        mask = completion_mask.to(hidden.dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    log_probs_all = torch.log_softmax(logits, dim=-1)
    logp = log_probs_all.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    probs = log_probs_all.exp()
    entropy = -(probs * log_probs_all).sum(-1)

    adv = advantages.to(hidden.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(hidden.dtype)
    log_ratio = logp - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)

    if gate == "clip":
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        r_b = ratio.expand(batch, length) if ratio.shape[1] == 1 else ratio
        a_b = adv.expand(batch, length)
        gate_value = torch.where(a_b > 0, torch.clamp(r_b, max=1 + eps_high), torch.clamp(r_b, min=1 - epsilon_low))
        gate_grad = torch.where(a_b > 0, (r_b <= 1 + eps_high).to(hidden.dtype),
                                ((r_b >= 1 - epsilon_low) | (a_b == 0)).to(hidden.dtype))
    else:
        opts = {"tau_pos": tau_pos, "tau_neg": tau_neg}
        a_b = adv.expand(batch, length)
        r_b = ratio.expand(batch, length)

        def value(r: Tensor) -> Tensor:
            if custom_value is not None:
                tau = torch.where(a_b > 0, torch.tensor(tau_pos, dtype=r.dtype), torch.tensor(tau_neg, dtype=r.dtype))
                return custom_value(r, tau)
            return reference_gate_value(gate, r, a_b, opts)

        gate_value = value(r_b)
        per_token = -gate_value * a_b
        probe = r_b.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (gate_grad,) = torch.autograd.grad(value(probe).sum(), probe)

    if beta != 0:
        kl = torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (batch * max_completion_length)
    elif loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = (per_token * mask).sum() / items.clamp(min=1.0)
    else:
        raise ValueError(loss_type)
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum().clamp(min=1.0)

    def masked_mean(x: Tensor) -> Tensor:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    gg = gate_grad.detach()
    per_group = []
    size = batch if group_size is None else group_size
    for g in range(batch // size):
        rows = slice(g * size, (g + 1) * size)
        count = mask[rows].sum()
        if count > 0:
            per_group.append((gg[rows] * mask[rows]).sum() / count)
    eur = torch.stack(per_group).mean() if per_group else torch.zeros((), dtype=hidden.dtype)
    r_tok = ratio.detach().expand(batch, length)
    valid = mask != 0
    metrics = {
        "eur": eur,
        "entropy": masked_mean(entropy.detach()),
        "ratio/mean": masked_mean(r_tok),
        "ratio/min": r_tok[valid].min() if valid.any() else torch.zeros((), dtype=hidden.dtype),
        "ratio/max": r_tok[valid].max() if valid.any() else torch.zeros((), dtype=hidden.dtype),
        "gate/mean": masked_mean(gate_value.detach()),
        "nonfinite_tokens": (valid & ~(logp.detach().isfinite() & entropy.detach().isfinite())).sum().to(hidden.dtype),
    }
    if beta != 0:
        metrics["kl"] = masked_mean(kl.detach().expand(batch, length))  # TRL logs the corrected term
    if gate == "clip":
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(hidden.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(hidden.dtype)
        if low.shape[1] == 1:  # sequence level with [B] advantages: TRL averages over rows
            low_mean, high_mean = low.mean(), high.mean()
        else:
            low_mean, high_mean = masked_mean(low), masked_mean(high)
        metrics.update({
            "clip_ratio/low_mean": low_mean,
            "clip_ratio/high_mean": high_mean,
            "clip_ratio/region_mean": low_mean + high_mean,
        })

    def zero_masked(x: Tensor) -> Tensor:
        return torch.where(valid, x.detach().expand(batch, length), torch.zeros((), dtype=x.dtype))

    return ReferenceResult(
        loss=loss,
        logprobs=zero_masked(logp),
        entropy=zero_masked(entropy),
        ratio=zero_masked(ratio),
        gate_value=zero_masked(gate_value),
        gate_grad=zero_masked(gate_grad),
        eur=eur,
        metrics=metrics,
    )
