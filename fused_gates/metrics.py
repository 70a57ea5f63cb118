"""The diagnostics of one loss call: the paper's Effective Update Ratio, TRL's metrics, non-finite tokens.

All are 0-dim tensors computed on the device, without a host synchronisation.

EUR (paper eq. 12) is the mean over prompt groups of the group's token mean of f'(r): per group
``sum_t m_t f'_t / sum_t m_t`` over the group's tokens (``m_t``: the mask's weights, fractional weights included),
then the plain mean over the groups. A group without any valid token (every weight 0) has no token mean and is left
out of the mean over groups; with no valid token at all EUR is 0. Without group information the batch is one group,
so ``group_size=None`` and ``group_size=B`` agree.

The other means follow TRL's ``_compute_loss`` (``sum m x / max(sum m, 1)``).

The formulas are written once, here, as pieces that return sums and counts (:func:`masked_sum_and_count`,
:func:`clip_flags`, :func:`cispo_flags`, :func:`group_mean_parts`): :func:`loss_metrics` divides them for one call,
the TRL integration sums them over processes first and divides the totals.
"""

from __future__ import annotations

from torch import Tensor

from .gate_inputs import input_gate_metrics
from .objective import ObjectiveConfig, TokenData


def masked_sum_and_count(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum w x, sum w)``: the numerator and denominator of a token-weighted mean."""
    return (values * weights).sum(), weights.sum()


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    total, count = masked_sum_and_count(values, weights)
    return total / count.clamp(min=1.0)


def clip_flags(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float,
               delta: float | None = None) -> tuple[Tensor, Tensor]:
    """TRL's clip indicators ``(low, high)``: the ratio (after the two-sided cap ``delta``) below ``1 - epsilon_low``
    where the advantage is negative, above ``1 + epsilon_high`` where it is positive (elementwise, broadcasting)."""
    capped = ratio if delta is None else ratio.clamp(max=delta)
    return (capped < 1 - epsilon_low) & (advantages < 0), (capped > 1 + epsilon_high) & (advantages > 0)


def cispo_flags(ratio: Tensor, advantages: Tensor, epsilon_high: float) -> Tensor:
    """TRL's CISPO clip indicator: the ratio above ``epsilon_high`` where the advantage is positive."""
    return (ratio > epsilon_high) & (advantages > 0)


def group_mean_parts(weighted: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum over groups with a valid token of the group's mean weighted / counts, number of such groups)``: EUR's
    mean over prompt groups, before the division (groups without a token are left out)."""
    present = counts > 0
    per_group = (weighted / counts.where(present, 1.0)).where(present, 0.0)
    return per_group.sum(), present.sum()


def effective_update_ratio(
    gate_grad: Tensor, tokens: TokenData, group_size: int | None, group_ids: Tensor | None = None
) -> Tensor:
    """Paper eq. 12 with the group convention of this module's docstring; the groups are consecutive rows of
    ``group_size``, or given per row by ``group_ids`` (any integers: rows with equal ids form a group)."""
    m = tokens.mask
    if group_ids is not None:
        return _eur_by_group_ids(gate_grad, tokens, group_ids)
    if group_size is None:
        weighted, counts = (gate_grad * m).sum().reshape(1), m.sum().reshape(1)
    else:
        groups = tokens.row // group_size
        weighted = m.new_zeros(tokens.num_rows // group_size).index_add_(0, groups, gate_grad * m)
        counts = m.new_zeros(tokens.num_rows // group_size).index_add_(0, groups, m)
    total, groups = group_mean_parts(weighted, counts)
    return total / groups.clamp(min=1)


def _row_or_token_mean(flags: Tensor, tokens: TokenData, per_row: bool) -> Tensor:
    """TRL's mean of a flag: over tokens (mask-weighted), or over every row of the batch when its values are one per
    row (sequence-level ratio with [B] advantages)."""
    if not per_row:
        return masked_mean(flags, tokens.mask)
    return flags.new_zeros(tokens.num_rows).scatter_reduce_(0, tokens.row, flags, reduce="amax").mean()


def _eur_by_group_ids(gate_grad: Tensor, tokens: TokenData, group_ids: Tensor) -> Tensor:
    """The same mean with arbitrary group ids and no host synchronisation: a [B, B] same-group matrix sums the rows
    of each row's group, and each group counts once through the weight 1 / (rows in the group)."""
    m = tokens.mask
    row_weighted = m.new_zeros(tokens.num_rows).index_add_(0, tokens.row, gate_grad * m)
    row_counts = m.new_zeros(tokens.num_rows).index_add_(0, tokens.row, m)
    return eur_from_row_sums(row_weighted, row_counts, None, group_ids)


def eur_from_row_sums(row_weighted: Tensor, row_counts: Tensor, group_size: int | None,
                      group_ids: Tensor | None) -> Tensor:
    """EUR from each row's ``sum m f'(r)`` and ``sum m`` ([B] each; for rows sharded by sequence, their sums over the
    ranks), with the groups of :func:`effective_update_ratio`."""
    m = row_counts
    if group_ids is None:
        if group_size is None:
            weighted, counts = row_weighted.sum().reshape(1), row_counts.sum().reshape(1)
        else:
            weighted, counts = row_weighted.view(-1, group_size).sum(1), row_counts.view(-1, group_size).sum(1)
        total, groups = group_mean_parts(weighted, counts)
        return total / groups.clamp(min=1)
    same_group = (group_ids[:, None] == group_ids[None, :]).to(m.dtype)
    group_weighted, group_counts = same_group @ row_weighted, same_group @ row_counts
    share = 1.0 / same_group.sum(1)  # each group's rows share one vote
    present = group_counts > 0
    per_group = (group_weighted / group_counts.where(present, 1.0)).where(present, 0.0)
    return (per_group * share).sum() / (present * share).sum().clamp(min=1e-30)


def loss_metrics(
    tokens: TokenData,
    config: ObjectiveConfig,
    entropy: Tensor,
    ratio: Tensor,
    gate_value: Tensor,
    gate_grad: Tensor,
    kl: Tensor,
    group_size: int | None,
    group_ids: Tensor | None,
    row_advantages: bool,
) -> dict[str, Tensor]:
    """``eur``, ``entropy``, ``ratio/mean|min|max``, ``gate/mean``, ``kl`` (beta != 0) and TRL's clip fractions:
    ``clip_ratio/low_mean|high_mean|region_mean`` for clip, ``cispo_clip_ratio`` for cispo, ``vespo/phi_seq_mean`` for
    vespo, what a gate that reads more than r decided (``fused_gates.gate_inputs.input_gate_metrics``); per-token
    inputs are those of the computed tokens."""
    m = tokens.mask
    has_tokens = m.sum() > 0
    zero = m.new_zeros(())
    per_row = config.sequence_level and row_advantages  # TRL's ratio and advantage are then [B, 1]
    metrics: dict[str, Tensor] = {
        "eur": effective_update_ratio(gate_grad, tokens, group_size, group_ids),
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
    params = config.params
    if config.gate.is_clip:
        # TRL counts clipping on the ratio after the two-sided cap
        low, high = (flags.to(m.dtype) for flags in clip_flags(ratio, tokens.advantages, params.epsilon_low,
                                                               params.epsilon_high, params.delta))
        low_mean, high_mean = _row_or_token_mean(low, tokens, per_row), _row_or_token_mean(high, tokens, per_row)
        metrics["clip_ratio/low_mean"] = low_mean
        metrics["clip_ratio/high_mean"] = high_mean
        metrics["clip_ratio/region_mean"] = low_mean + high_mean
    elif config.gate.is_cispo:
        clipped = cispo_flags(ratio, tokens.advantages, params.epsilon_high).to(m.dtype)
        metrics["cispo_clip_ratio"] = _row_or_token_mean(clipped, tokens, per_row)
    elif config.gate.is_vespo:  # one phi per row with [B] advantages: the mean over rows that have a valid token
        if row_advantages:
            phi = m.new_zeros(tokens.num_rows).scatter_reduce_(0, tokens.row, gate_value, reduce="amax")
            present = m.new_zeros(tokens.num_rows).index_add_(0, tokens.row, m) > 0
            metrics["vespo/phi_seq_mean"] = (phi * present).sum() / present.sum().clamp(min=1)
        else:
            metrics["vespo/phi_seq_mean"] = masked_mean(gate_value, m)
    elif config.gate.reads_inputs:
        metrics.update(input_gate_metrics(config.gate, ratio, gate_value, tokens.advantages, m, config.input_params))
    return metrics


def nonfinite_tokens(flagged: Tensor, computed: Tensor, logprobs: Tensor, entropy: Tensor) -> Tensor:
    """Tokens with the mask set whose hidden state (or given log-prob) was non-finite (``flagged``, [B, T]) or whose
    computed log-prob or entropy came out non-finite (``logprobs``, ``entropy`` at the ``computed`` tokens, [B, T])."""
    bad_output = computed & ~(logprobs.isfinite() & entropy.isfinite())
    return (flagged | bad_output).sum().to(logprobs.dtype)
