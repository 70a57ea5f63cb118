"""The online softmax statistics every kernel folds logits into: one block's statistics, and the merge of two.

For logits ``z_v`` seen so far, relative to their maximum ``m``:

    S = sum_v exp(z_v - m),    Z = sum_v exp(z_v - m) (z_v - m)

so that ``lse = m + log S`` and the entropy is ``H = lse - sum_v p_v z_v = log S - Z / S``. Two sets of statistics
``(m_a, S_a, Z_a)`` and ``(m_b, S_b, Z_b)`` of disjoint logits merge into ``m = max(m_a, m_b)`` and, with
``a = exp(m_a - m)`` and ``b = exp(m_b - m)``,

    S = a S_a + b S_b,    Z = a (Z_a + (m_a - m) S_a) + b (Z_b + (m_b - m) S_b)

(an empty set has ``m = -inf``, ``S = Z = 0`` and contributes nothing). The row kernels fold vocabulary blocks one
by one, the tile kernel folds ``BLOCK_N x BLOCK_V`` tiles along the vocabulary axis, and the split merge folds the
partial statistics of vocabulary splits: all with these two functions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_statistics(b_z, AXIS: tl.constexpr):
    """``(m, S, Z)`` of a block of logits along ``AXIS``. Padded entries hold ``-inf`` and contribute nothing; every
    reduced line must hold at least one finite logit."""
    b_max = tl.max(b_z, axis=AXIS)
    b_shift = b_z - tl.expand_dims(b_max, AXIS)
    b_p = tl.exp(b_shift)  # 0 in padded entries
    b_p_shift = b_p * tl.where(b_p > 0, b_shift, 0.0)  # not 0 * -inf in padded entries
    return b_max, tl.sum(b_p, axis=AXIS), tl.sum(b_p_shift, axis=AXIS)


@triton.jit
def merge_statistics(max_a, sum_exp_a, sum_exp_shifted_a, max_b, sum_exp_b, sum_exp_shifted_b):
    """The statistics of the union of two disjoint sets of logits; ``a`` may be empty, ``b`` must not be."""
    new_max = tl.maximum(max_a, max_b)
    scale_a = tl.exp(max_a - new_max)  # 0 when a is empty (m_a = -inf)
    scale_b = tl.exp(max_b - new_max)
    step_a = tl.where(sum_exp_a > 0, max_a - new_max, 0.0)  # not -inf * 0 when a is empty
    step_b = max_b - new_max
    sum_exp = scale_a * sum_exp_a + scale_b * sum_exp_b
    sum_exp_shifted = scale_a * (sum_exp_shifted_a + step_a * sum_exp_a) + scale_b * (
        sum_exp_shifted_b + step_b * sum_exp_b
    )
    return new_max, sum_exp, sum_exp_shifted


@triton.jit
def finish_statistics(row_max, sum_exp, sum_exp_shifted):
    """``(lse, entropy, mean_p z)`` from the statistics of a whole row."""
    log_sum = tl.log(sum_exp)
    mean_shifted = sum_exp_shifted / sum_exp
    return row_max + log_sum, log_sum - mean_shifted, row_max + mean_shifted
