"""DPPO's Top-K divergence approximation (Qi et al. 2026, arXiv:2602.04879): the trust region of ``gate="dppo"`` /
``"dppo_kl"`` measured on the behaviour policy's K most likely tokens and the rest of the vocabulary as one bucket.

Given per token the behaviour policy's top-K token ids and log-probs (``old_topk_ids``, ``old_topk_logprobs`` [B, T,
K], what an inference engine returns when asked for K log-probs per position), with ``p_k`` their probabilities,
``q_k`` the current policy's at the same ids and the rest ``p_R = 1 - sum_k p_k``, ``q_R = 1 - sum_k q_k`` (clamped
at 0 against rounding):

    TV = (sum_k |p_k - q_k| + |p_R - q_R|) / 2                  (gate="dppo")
    KL = sum_k p_k (log p_k - log q_k) + p_R log(p_R / q_R)     (gate="dppo_kl"; 0 log 0 = 0; inf where q_R = 0 < p_R)

and, as the authors' code applies it, a token is dropped only when the divergence exceeds the bound *and* its own
probability moved the way its advantage pushes: ``D > delta_high and p > p_old`` where ``A > 0``, ``D > delta_low and
p < p_old`` otherwise (``p`` the sampled token's). The rest of the objective is the Binary variants' (the detached
truncated weight, ``fused_gates.gate_inputs``). The bounds default to the Binary variants' (0.15 TV, 0.05 KL): the
authors' released scripts give bounds for those only.

**Cost.** The current log-probs at the K ids come from one no-gradient pass over the vocabulary before the loss
(``fused_gates.topk_logprobs``; one product more than the Binary variants: four instead of three), chunked within
the memory budget; under a vocabulary-parallel head each rank gathers the ids of its slice, and the log-sum-exp and
the gathered logits are all-reduced. Nothing here needs a gradient: the mask is detached.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rest_mass(logprobs: Tensor) -> Tensor:
    return (1 - torch.exp(logprobs).sum(dim=-1)).clamp(min=0.0)


def topk_divergence(kind: str, old_topk: Tensor, current_topk: Tensor) -> Tensor:
    """Per token the Top-K ``"tv"`` or ``"kl"`` between the behaviour (``old_topk`` log-probs [N, K]) and the current
    policy (``current_topk`` at the same ids); never NaN."""
    p, q = torch.exp(old_topk), torch.exp(current_topk)
    p_rest, q_rest = _rest_mass(old_topk), _rest_mass(current_topk)
    if kind == "tv":
        return ((p - q).abs().sum(dim=-1) + (p_rest - q_rest).abs()) / 2
    ratio = torch.where(p_rest > 0, p_rest / q_rest, torch.ones_like(p_rest))  # inf where q_R = 0 < p_R
    return (p * (old_topk - current_topk)).sum(dim=-1) + p_rest * torch.log(ratio)


def topk_valid(kind: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, old_topk: Tensor,
               current_topk: Tensor, delta_low: float, delta_high: float) -> Tensor:
    """DPPO's Top-K trust region on each token (bool): kept unless the divergence exceeds the bound of the advantage's
    side and the sampled token's probability moved that way."""
    divergence = topk_divergence(kind, old_topk, current_topk)
    return torch.where(advantages > 0, (divergence <= delta_high) | (logprobs <= old_logprobs),
                       (divergence <= delta_low) | (logprobs >= old_logprobs))
