"""The rows the loss aggregates over when they are not the batch's rows: packed sequences (padding-free batches,
``sequence_ids=``), and the whole-row totals that sequence-sharded or packed rows need (:func:`whole_row_totals`).

With ``sequence_ids`` [B, T] each position names the sequence (0..S-1) it belongs to; a row of the batch may hold
several sequences one after the other. The loss then treats the S sequences as its rows: ``grpo`` averages over them,
``dr_grpo`` divides by ``S * max_completion_length``, ``luspo`` by ``S``, sequence-level ratios, vespo and the
off-policy mask take each sequence's sums, and the per-row inputs (``advantages``, ``group_ids``) hold one value per
sequence, indexed by the id. Positions whose id lies outside [0, S) (padding, e.g. -1) belong to no sequence and
must be masked. Along the batch (row after row) the valid tokens' ids never decrease: each sequence is one run, in
order, as packing leaves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .objective import RowTotals


@dataclass(frozen=True)
class PackedRows:
    """``count`` sequences packed into a ``[B, T]`` batch."""

    count: int
    index: Tensor  # [B, T] int64: each position's sequence (0 where it belongs to none)
    member: Tensor  # [B, T] bool: the position belongs to a sequence

    @staticmethod
    def of(sequence_ids: Tensor, count: int) -> PackedRows:
        ids = sequence_ids.long()
        member = (ids >= 0) & (ids < count)
        return PackedRows(count, torch.where(member, ids, torch.zeros_like(ids)), member)

    def sums(self, values: Tensor) -> Tensor:
        """``[k, B, T]`` values summed over each sequence's positions: ``[k, S]``."""
        flat = torch.where(self.member, values, torch.zeros_like(values)).reshape(values.shape[0], -1)
        return flat.new_zeros(values.shape[0], self.count).index_add_(1, self.index.reshape(-1), flat)

    def out_of_order(self, selected: Tensor) -> Tensor:
        """Whether a selected position's id is below that of a selected position before it (0-dim bool)."""
        ids = torch.where(selected, self.index, torch.full_like(self.index, -1)).reshape(-1)
        running = ids.cummax(0).values
        before = torch.cat([running.new_full((1,), -1), running[:-1]])
        return (selected.reshape(-1) & (ids < before)).any()


def whole_row_totals(
    packed: PackedRows | None,
    mask: Tensor,
    bonus_mask: Tensor | None,
    vespo_log_ratio: Tensor | None,
    reduce: Callable[[Tensor], Tensor] | None,
) -> tuple[RowTotals, Tensor, Tensor | None]:
    """``(totals, the entropy bonus's total, vespo's per-position row sum or None)`` over whole rows -- packed
    sequences (``packed``) and / or rows that continue on other ranks (``reduce`` sums over them, one collective):
    each row's mask sum, the entropy bonus's masked sum (where an entropy mask makes it differ) and vespo's log-ratio
    sum over the row's positions."""
    parts = torch.stack([mask] + [p for p in (bonus_mask, vespo_log_ratio) if p is not None])
    sums = parts.sum(-1) if packed is None else packed.sums(parts)
    if reduce is not None:
        sums = reduce(sums)

    def at_positions(per_row: Tensor) -> Tensor:
        return per_row.unsqueeze(1) if packed is None else per_row[packed.index]

    totals = RowTotals(sums.shape[1], at_positions(sums[0]), sums[0].sum())
    bonus_total = sums[1].sum() if bonus_mask is not None else totals.total
    return totals, bonus_total, None if vespo_log_ratio is None else at_positions(sums[-1])
