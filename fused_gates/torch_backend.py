"""The pure-PyTorch backend: a chunk's logits in a float32 buffer, their statistics and dz in cache-sized blocks.

Per chunk of ``n`` valid tokens (the loop, the plan and the gradient products are the chunk driver's):

1. ``z = (h / T) W^T + b / T`` into the buffer (scaling the small ``h`` instead of the logits saves a pass); with a
   soft-cap ``c``, ``z = (c / T) tanh((h / c) W^T + b / c)``, whose slope ``1 - (z T / c)^2`` then multiplies dz;
2. statistics in vocabulary blocks of :data:`VOCAB_BLOCK` columns: ``m = max z``, ``S = sum exp(z - m)``,
   ``Z = sum exp(z - m)(z - m)``, so ``lse = m + log S``, ``logp = z_y - lse`` and ``H = log S - Z / S``; before a
   gradient without entropy term the buffer is left holding ``exp(z - m)`` (times the soft-cap's slope);
3. dz: without an entropy term ``dz = diag(-g exp(m - lse)) exp(z - m) + g onehot`` takes the buffer as it is (the
   driver applies the row scale to the small operands); with one, ``p (-g - e (z - sum p z))`` is written over the
   logits and the one-hot part stays factored.

A backward that recomputes where the forward formed no gradient (a batch statistic over several chunks, rows longer
than a chunk) forms ``p = exp(z - lse)`` from the saved ``lse`` in one pass instead of step 2
(:meth:`TorchChunks.gradient_from_lse`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk_driver import Backend
from .contract import ChunkGradient, ChunkStatistics, ChunkTargets, GradientNeeds, SavedStatistics
from .head import Head
from .objective import ObjectiveConfig
from .products import ProductOperands, mm_into

NAME = "torch"
VOCAB_BLOCK = 2048
"""Columns per elementwise step: a ``chunk x 2048`` float32 block stays in cache."""


def unsupported(head: Head, config: ObjectiveConfig | None) -> str | None:
    """The torch backend runs every input (any device, any dtype, every gate); its no-grad pass has one method."""
    if head.statistics_method != "auto":
        return f"statistics_method={head.statistics_method!r} selects a Triton kernel; the torch backend has none"
    return None


def _softcap_slope(z: Tensor, alpha: float, out: Tensor) -> Tensor:
    """``1 - (z / alpha)^2 = 1 - tanh^2``: d z / d x of soft-capped logits, up to the ``1 / T`` of the products."""
    return torch.div(z, alpha, out=out).square_().neg_().add_(1.0)


class TorchChunks:
    """The torch backend's side of the chunk driver's contract, for one call."""

    def __init__(self, head: Head, needs: GradientNeeds):
        self.head = head
        self.needs = needs
        acc = head.accumulate_dtype
        self.operands = ProductOperands(head.weight, acc)
        # the backward products take dz in the weight's dtype when float32-output products of that dtype exist
        self.low_precision = needs.any and self.operands.operand_dtype != acc
        # x / T, or x / c before the soft-cap's tanh; then z = alpha tanh(x / c) with alpha = c / T
        self.input_scale = head.inv_temperature if head.softcap is None else 1.0 / head.softcap
        self.softcap_alpha = None if head.softcap is None else head.softcap * head.inv_temperature
        self.scaled_bias = None if head.bias is None else head.bias.to(acc) * self.input_scale

    def bytes_per_row(self) -> int:
        vocab = self.head.planning_vocab
        low = self.operands.operand_dtype.itemsize if self.low_precision else 0
        return vocab * (self.head.accumulate_dtype.itemsize + low) + 2 * min(VOCAB_BLOCK, vocab) * 4

    def allocate(self, rows: int) -> None:
        acc, vocab, device = self.head.accumulate_dtype, self.head.local_vocab, self.head.weight.device
        self.logits = torch.empty(rows, vocab, device=device, dtype=acc)
        block = min(VOCAB_BLOCK, vocab)
        self.block_a = torch.empty(rows, block, device=device, dtype=acc)
        self.block_b = torch.empty(rows, block, device=device, dtype=acc)
        low = self.operands.operand_dtype
        self.dz_copy = torch.empty(rows, vocab, device=device, dtype=low) if self.low_precision else None

    def product_operands(self) -> ProductOperands:
        return self.operands

    def dz_operand(self, matrix: Tensor) -> Tensor:
        if self.dz_copy is None or matrix.dtype == self.dz_copy.dtype:
            return matrix
        return self.dz_copy[: matrix.shape[0]].copy_(matrix)

    def chunk_logits(self, hidden: Tensor) -> Tensor:
        """The chunk's logits ``z`` [n, local vocab] in the buffer (valid until the next chunk)."""
        return self._logits(hidden)

    def _logits(self, hidden: Tensor) -> Tensor:
        operand = hidden * self.input_scale if self.input_scale != 1.0 else hidden
        logits = mm_into(self.logits[: hidden.shape[0]], self.operands.cast(operand), self.operands.weight.t())
        if self.scaled_bias is not None:
            logits.add_(self.scaled_bias)
        if self.softcap_alpha is not None:
            logits.tanh_().mul_(self.softcap_alpha)
        return logits

    def statistics(self, hidden: Tensor, targets: ChunkTargets, keep: str | None) -> ChunkStatistics:
        logits = self._logits(hidden)
        n, vocab = logits.shape
        alpha = self.softcap_alpha
        keep_exp = keep == "exp"
        target_logit = logits.gather(1, targets.read.unsqueeze(1)).squeeze(1)
        if targets.owned is not None:
            target_logit = target_logit * targets.owned
        max_logit = logits.amax(dim=1)
        max_col = max_logit.unsqueeze(1)
        sum_exp = logits.new_zeros(n)
        sum_exp_shifted = logits.new_zeros(n)
        for start in range(0, vocab, VOCAB_BLOCK):
            block = logits[:, start : start + VOCAB_BLOCK]
            width = block.shape[1]
            slope = _softcap_slope(block, alpha, self.block_b[:n, :width]) if keep_exp and alpha is not None else None
            shifted = torch.sub(block, max_col, out=self.block_a[:n, :width])
            weights = torch.exp(shifted, out=block if keep_exp else self.block_b[:n, :width])
            sum_exp += weights.sum(dim=1)
            sum_exp_shifted += shifted.mul_(weights).sum(dim=1)
            if slope is not None:
                weights.mul_(slope)
        log_sum = torch.log(sum_exp)
        log_sum_exp = max_logit + log_sum
        # kept for the gradient of this chunk: exp(z - m) in the buffer needs exp(m - lse) to become p
        self._max_logit = max_logit
        self._target_slope = None if alpha is None else 1.0 - (target_logit / alpha).square()
        return ChunkStatistics(target_logit - log_sum_exp, log_sum - sum_exp_shifted / sum_exp, log_sum_exp)

    def gradient(self, stats: ChunkStatistics, targets: ChunkTargets, grad_logprobs: Tensor,
                 grad_entropy: Tensor | None) -> ChunkGradient:
        n = grad_logprobs.shape[0]
        logits = self.logits[:n]
        target_grad = grad_logprobs if self._target_slope is None else grad_logprobs * self._target_slope
        if targets.owned is not None:
            target_grad = target_grad * targets.owned
        if grad_entropy is None:  # the buffer holds exp(z - m) (times the slope)
            row_scale = -grad_logprobs * torch.exp(self._max_logit - stats.log_sum_exp)
            return ChunkGradient(logits, row_scale, target_grad, targets.read)
        return ChunkGradient(self._entropy_gradient(logits, stats, grad_logprobs, grad_entropy), None, target_grad,
                             targets.read)

    def gradient_from_lse(self, hidden: Tensor, targets: ChunkTargets, saved: SavedStatistics) -> ChunkGradient:
        """A recomputing backward's chunk where the forward formed no gradient: the product again, then dz from the
        saved ``lse`` (no max, no sums): without an entropy term the buffer becomes ``p = exp(z - lse)`` (times the
        soft-cap's slope) in one pass. (Where the forward formed the gradients, a repeated backward repeats the
        forward's arithmetic instead, so that it reproduces them bit for bit.)"""
        logits = self._logits(hidden)
        n, vocab = logits.shape
        alpha = self.softcap_alpha
        target_logit = logits.gather(1, targets.read.unsqueeze(1)).squeeze(1)
        self._target_slope = None if alpha is None else 1.0 - (target_logit / alpha).square()
        self._max_logit = saved.log_sum_exp  # gradient() scales the buffer by exp(max - lse) = 1
        if saved.grad_entropy is None:
            lse_col = saved.log_sum_exp.unsqueeze(1)
            for start in range(0, vocab, VOCAB_BLOCK):
                block = logits[:, start : start + VOCAB_BLOCK]
                width = block.shape[1]
                slope = None if alpha is None else _softcap_slope(block, alpha, self.block_b[:n, :width])
                block.sub_(lse_col).exp_()
                if slope is not None:
                    block.mul_(slope)
        stats = ChunkStatistics(saved.log_sum_exp, saved.entropy, saved.log_sum_exp)  # logp is not read
        return self.gradient(stats, targets, saved.grad_logprobs, saved.grad_entropy)

    def _entropy_gradient(self, logits: Tensor, stats: ChunkStatistics, grad_logprobs: Tensor,
                          grad_entropy: Tensor) -> Tensor:
        """``p (-g - e (z - mean_p z))`` (times the soft-cap's slope) written over the logits: ``dz`` without its
        one-hot part ``g 1[v = y]``."""
        n, vocab = logits.shape
        lse_col = stats.log_sum_exp.unsqueeze(1)
        mean_logit = stats.log_sum_exp - stats.entropy
        # p * (-g - e (z - mean)) = p * (z * (-e) + (e mean - g))
        neg_e = (-grad_entropy).unsqueeze(1)
        offset = (grad_entropy * mean_logit - grad_logprobs).unsqueeze(1)
        for start in range(0, vocab, VOCAB_BLOCK):
            block = logits[:, start : start + VOCAB_BLOCK]
            width = block.shape[1]
            coefficient = torch.mul(block, neg_e, out=self.block_a[:n, :width]).add_(offset)
            if self.softcap_alpha is not None:
                coefficient.mul_(_softcap_slope(block, self.softcap_alpha, self.block_b[:n, :width]))
            block.sub_(lse_col).exp_().mul_(coefficient)
        return logits


BACKEND = Backend(NAME, TorchChunks, unsupported)
