"""The diagnostics of one loss call: the paper's Effective Update Ratio, TRL's metrics, non-finite tokens.

All are 0-dim tensors computed on the device, without a host synchronisation.

EUR (paper eq. 12) is the mean over prompt groups of the group's token mean of f'(r): per group
``sum_t m_t f'_t / sum_t m_t`` over the group's tokens (``m_t``: the mask's weights, fractional weights included),
then the plain mean over the groups. A group without any valid token (every weight 0) has no token mean and is left
out of the mean over groups; with no valid token at all EUR is 0. Without group information the batch is one group,
so ``group_size=None`` and ``group_size=B`` agree.

The other means follow TRL's ``_compute_loss`` (``sum m x / max(sum m, 1)``).
"""

from __future__ import annotations

from torch import Tensor

from .objective import ObjectiveConfig, TokenData


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def effective_update_ratio(gate_grad: Tensor, tokens: TokenData, group_size: int | None) -> Tensor:
    """Paper eq. 12 with the group convention of this module's docstring."""
    m = tokens.mask
    if group_size is None:
        weighted, counts = (gate_grad * m).sum().reshape(1), m.sum().reshape(1)
    else:
        groups = tokens.row // group_size
        weighted = m.new_zeros(tokens.num_rows // group_size).index_add_(0, groups, gate_grad * m)
        counts = m.new_zeros(tokens.num_rows // group_size).index_add_(0, groups, m)
    present = counts > 0
    per_group = (weighted / counts.where(present, 1.0)).where(present, 0.0)
    return per_group.sum() / present.sum().clamp(min=1)


def loss_metrics(
    tokens: TokenData,
    config: ObjectiveConfig,
    entropy: Tensor,
    ratio: Tensor,
    gate_value: Tensor,
    gate_grad: Tensor,
    kl: Tensor,
    group_size: int | None,
    row_advantages: bool,
) -> dict[str, Tensor]:
    """``eur``, ``entropy``, ``ratio/mean|min|max``, ``gate/mean``, ``kl`` (beta != 0) and, for the clip gate, TRL's
    ``clip_ratio/low_mean|high_mean|region_mean``; per-token inputs are those of the computed tokens."""
    m = tokens.mask
    has_tokens = m.sum() > 0
    zero = m.new_zeros(())
    metrics: dict[str, Tensor] = {
        "eur": effective_update_ratio(gate_grad, tokens, group_size),
        "entropy": masked_mean(entropy, m),
        "ratio/mean": masked_mean(ratio, m),
    }
    if ratio.numel():
        metrics["ratio/min"] = ratio.min().where(has_tokens, zero)
        metrics["ratio/max"] = ratio.max().where(has_tokens, zero)
    else:
        metrics["ratio/min"] = metrics["ratio/max"] = zero
    metrics["gate/mean"] = masked_mean(gate_value, m)
    if config.beta != 0:
        metrics["kl"] = masked_mean(kl, m)
    if config.gate.is_clip:
        params = config.params
        low = ((ratio < 1 - params.epsilon_low) & (tokens.advantages < 0)).to(m.dtype)
        high = ((ratio > 1 + params.epsilon_high) & (tokens.advantages > 0)).to(m.dtype)
        if config.sequence_level and row_advantages:
            # TRL's ratio and advantage are then [B, 1]: it counts rows (every row of the batch), not tokens.
            low_mean = m.new_zeros(tokens.num_rows).scatter_reduce_(0, tokens.row, low, reduce="amax").mean()
            high_mean = m.new_zeros(tokens.num_rows).scatter_reduce_(0, tokens.row, high, reduce="amax").mean()
        else:
            low_mean, high_mean = masked_mean(low, m), masked_mean(high, m)
        metrics["clip_ratio/low_mean"] = low_mean
        metrics["clip_ratio/high_mean"] = high_mean
        metrics["clip_ratio/region_mean"] = low_mean + high_mean
    return metrics


def nonfinite_tokens(flagged: Tensor, computed: Tensor, logprobs: Tensor, entropy: Tensor) -> Tensor:
    """Tokens with the mask set whose hidden state (or given log-prob) was non-finite (``flagged``, [B, T]) or whose
    computed log-prob or entropy came out non-finite (``logprobs``, ``entropy`` at the ``computed`` tokens, [B, T])."""
    bad_output = computed & ~(logprobs.isfinite() & entropy.isfinite())
    return (flagged | bad_output).sum().to(logprobs.dtype)
