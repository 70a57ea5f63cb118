"""The chunk driver: every vocabulary pass of every backend, written once.

It plans chunk rows from the memory budget (before allocating anything), makes chunks of whole rows where the
objective needs them, runs the chunk loop, takes the recompute path for rows longer than a chunk (and for a repeated
backward), accumulates the gradients (the first chunk writes dW) and makes a vocabulary-parallel slice's statistics
global. A backend (:class:`fused_gates.contract.ChunkBackend`) supplies only how a chunk's logits are formed and how
its statistics and dz are computed.

The gradient of the chunk's logits comes factored, ``dz = diag(s) M + g onehot(y)``; then

    dh = (s * (M W) + g W[y]) / T,    dW += M^T (s * h / T) + onehot(y)^T (g h / T),    db += (M^T s + onehot^T g) / T

in float32, so that a backend may hand over ``M = exp(z - max)`` as the statistics pass left it and let the row
scales act on the small ``[n, H]`` operands (no pass over the ``n x V`` buffer to form dz).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import (
    NO_GRADIENT,
    ChunkBackend,
    ChunkGradient,
    ChunkStatistics,
    ChunkTargets,
    GradientNeeds,
    Gradients,
    LossForward,
    SavedStatistics,
)
from .head import Head
from .objective import ObjectiveConfig, TokenData, TokenTerms, evaluate_objective
from .products import addmm_into, mm_into
from .vocab_parallel import combine_slice_statistics

SPARSE_COLUMN_BLOCK = 64
"""Columns per step of a gradient held by a few columns per token (a sampler's support): ``n x 64 x H`` gathered
rows of the weight at a time."""
CPU_MEMORY_BUDGET_MB = 512.0
"""Working buffers on CPU. Every token chunk re-reads and re-writes the float32 dW accumulator (``8 V H`` bytes)
against ``6 n H V`` flops of products, so its share of a step is about ``8 F / (6 n B)`` (F flop/s, B bytes/s):
with F ~ 0.2 TFLOP/s and B ~ 10 GB/s on two cores it stays under 5% from n ~ 530 rows, i.e. ~330 MB of float32
logits at V = 152k. Measured at Qwen2.5-0.5B's head (2,048 tokens, 2 cores, best of 3 against the three bare
products of the same run): 1.13x at 128 MiB, 1.07x at 256, 1.04x at 512, with 134 / 238 / 371 MiB of extra memory
against the materialised logits' 3,045 (benchmarks/results/cpu-fp32-2026-12-03-budget512.md)."""
GPU_MEMORY_BUDGET_MB = 1792.0
GPU_MIN_MEMORY_BUDGET_MB = 256.0
GPU_FREE_MEMORY_SHARE = 0.1
"""On GPU every token chunk also reads and writes the float32 dW accumulator (8 V H bytes: 4.4 GB at Qwen2.5-7B's
head), against ``2 n H V`` flops of dW arithmetic: by roofline the traffic is ``4 F / (n B)`` of that arithmetic
(F flop/s, B bytes/s), ~900 / n on an H100, so chunks want thousands of rows. The default therefore takes the
largest budget that stays within the 2 GiB of extra memory this package allows itself (1.75 GiB of buffers: ~2,000
rows of float32 logits plus their bfloat16 dz at V = 152k), and less where the device has little free memory
(10% of what is free, at least 256 MiB)."""


def default_memory_budget_mb(device: torch.device) -> float:
    """The working-buffer budget when the caller gives none (see :data:`GPU_MEMORY_BUDGET_MB`)."""
    if device.type != "cuda":
        return CPU_MEMORY_BUDGET_MB
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # memory the caching allocator holds but no tensor uses is free to this call too (during training it is most of
    # what mem_get_info leaves out)
    free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    share = GPU_FREE_MEMORY_SHARE * free_bytes / 2**20
    return max(GPU_MIN_MEMORY_BUDGET_MB, min(GPU_MEMORY_BUDGET_MB, share))


# -- planning ------------------------------------------------------------------------------------------------------


def plan_chunk_rows(num_tokens: int, bytes_per_row: int, memory_budget_mb: float) -> int:
    """Tokens per chunk so that the chunk's buffers (``bytes_per_row`` each token) fit the budget; at least 1, at
    most ``num_tokens``. The tokens are spread evenly over the chunks this takes, so that no chunk is a small
    remainder (each chunk pays the dW accumulator's traffic whatever its size)."""
    capacity = chunk_capacity(num_tokens, bytes_per_row, memory_budget_mb)
    if not num_tokens:
        return capacity
    chunks = -(-num_tokens // capacity)
    return max(1, -(-num_tokens // chunks))


def chunk_capacity(num_tokens: int, bytes_per_row: int, memory_budget_mb: float) -> int:
    """The most tokens a chunk's buffers may hold within the budget (at least 1, at most ``num_tokens``)."""
    return max(1, min(num_tokens, int(memory_budget_mb * 2**20) // bytes_per_row))


def token_chunks(num_tokens: int, rows: int) -> list[slice]:
    return [slice(s, min(s + rows, num_tokens)) for s in range(0, num_tokens, rows)]


def row_aligned_chunks(row_counts: list[int], rows: int) -> list[slice] | None:
    """Chunks of at most ``rows`` tokens whose boundaries fall between rows of the batch (``row_counts``: tokens of
    each row, in order); ``None`` when one row alone exceeds a chunk."""
    chunks, start, size = [], 0, 0
    for count in row_counts:
        if count > rows:
            return None
        if size + count > rows:
            chunks.append(slice(start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(slice(start, start + size))
    return chunks


def plan_loss_chunks(tokens: TokenData, rows: int, config: ObjectiveConfig,
                     capacity: int | None = None) -> list[slice] | None:
    """The forward's chunks: ``rows`` tokens each (evened out), or whole rows packed up to ``capacity`` (default
    ``rows``: packing to the budget's capacity instead keeps whole-row chunks as few as token chunks)."""
    if config.needs_whole_batch:  # a batch statistic: the batch in one chunk, or the statistics pass first
        return [slice(0, tokens.count)] if tokens.count <= rows else None
    if not config.needs_whole_rows:
        return token_chunks(tokens.count, rows)
    if tokens.row_reduce is not None:
        return None  # the rows continue on other ranks: every rank's statistics first, the gradients in the backward
    return row_aligned_chunks(tokens.row_counts(), rows if capacity is None else capacity)


def largest_chunk(chunks: list[slice]) -> int:
    return max((c.stop - c.start for c in chunks), default=1)


# -- the vocabulary-parallel slice ---------------------------------------------------------------------------------


def chunk_targets(head: Head, targets: Tensor, rows: slice | None = None) -> ChunkTargets:
    """The chunk ``rows``' targets (``targets`` already sliced) and, with a support, the chunk's part of it."""
    support = None if head.support is None else head.support.select(rows)
    if head.shard is None:
        return ChunkTargets(targets, None, support)
    local, owned = head.shard.local_targets(targets)
    return ChunkTargets(local, owned, support)


def global_statistics(head: Head, stats: ChunkStatistics, targets: Tensor) -> ChunkStatistics:
    """The whole vocabulary's statistics from this rank's slice's (two all-reduces; a whole head: as they are)."""
    if head.shard is None:
        return stats
    logprobs, entropy, log_sum_exp = combine_slice_statistics(
        head.shard, stats.logprobs, stats.entropy, stats.log_sum_exp, targets
    )
    return ChunkStatistics(logprobs, entropy, log_sum_exp)


# -- gradient accumulation -----------------------------------------------------------------------------------------


class GradientAccumulator:
    """``dh``, ``dW``, ``db`` of the factored chunk gradients (module docstring), in the accumulation dtype. The first
    chunk writes dW rather than adding to zeros (one read of the accumulator less)."""

    def __init__(self, num_tokens: int, hidden_size: int, head: Head, needs: GradientNeeds, device: torch.device):
        self.head = head
        acc = head.accumulate_dtype
        self.hidden = torch.zeros(num_tokens, hidden_size, device=device, dtype=acc) if needs.hidden else None
        self.weight = torch.empty(head.weight.shape, device=device, dtype=acc) if needs.weight else None
        self.bias = torch.zeros(head.local_vocab, device=device, dtype=acc) if needs.bias else None
        self._weight_written = False

    def add(self, rows: slice, dz: ChunkGradient, hidden: Tensor, backend: ChunkBackend) -> None:
        inv_t = self.head.inv_temperature
        operands = backend.product_operands()
        acc = self.head.accumulate_dtype
        if dz.matrix is None:
            self._add_columns(rows, dz, hidden, operands)
            return
        row_scale = None if dz.row_scale is None else dz.row_scale.unsqueeze(1)
        target_grad = None if dz.target_grad is None else dz.target_grad.unsqueeze(1)
        if self.hidden is not None or self.weight is not None:
            operand = backend.dz_operand(dz.matrix)
        if self.hidden is not None:
            out = mm_into(self.hidden[rows], operand, operands.weight)
            if row_scale is not None:
                out.mul_(row_scale)
            if target_grad is not None:
                out.add_(operands.weight.index_select(0, dz.targets).to(acc) * target_grad)
            if inv_t != 1.0:
                out.mul_(inv_t)
        if self.weight is not None:
            scaled_hidden = operands.cast(hidden * inv_t if inv_t != 1.0 else hidden)
            rhs = scaled_hidden if row_scale is None else scaled_hidden * row_scale.to(scaled_hidden.dtype)
            addmm_into(self.weight, operand.t(), rhs, overwrite=not self._weight_written)
            self._weight_written = True
            if target_grad is not None:
                self.weight.index_add_(0, dz.targets, scaled_hidden.to(acc) * target_grad)
        if self.bias is not None:
            matrix = dz.matrix if dz.matrix.dtype == acc else dz.matrix.to(acc)
            scale = dz.row_scale if dz.row_scale is not None else matrix.new_ones(matrix.shape[0])
            self.bias.add_(matrix.t().mv(scale), alpha=inv_t)
            if target_grad is not None:
                self.bias.index_add_(0, dz.targets, dz.target_grad * inv_t)

    def _add_columns(self, rows: slice, dz: ChunkGradient, hidden: Tensor, operands) -> None:
        """A gradient held by a few columns per token (``dz.targets`` [n, K], -1: none; ``dz.target_grad`` [n, K]):
        ``dh = sum_k g_k W[c_k] / T``, ``dW[c_k] += g_k h / T``, ``db[c_k] += g_k / T`` -- ``O(n K H)``, no product over
        the vocabulary (a sampler's support of K tokens)."""
        acc, inv_t = self.head.accumulate_dtype, self.head.inv_temperature
        valid = dz.targets >= 0
        columns = torch.where(valid, dz.targets, torch.zeros_like(dz.targets))
        values = torch.where(valid, dz.target_grad, torch.zeros((), dtype=acc, device=columns.device)) * inv_t
        weight = operands.weight
        scaled_hidden = hidden.to(acc)
        if self.weight is not None and not self._weight_written:
            self.weight.zero_()
            self._weight_written = True
        for start in range(0, columns.shape[1], SPARSE_COLUMN_BLOCK):
            part = slice(start, start + SPARSE_COLUMN_BLOCK)
            block, block_values = columns[:, part], values[:, part]
            if self.hidden is not None:
                rows_of_w = weight.index_select(0, block.reshape(-1)).to(acc).view(*block.shape, -1)
                self.hidden[rows] += torch.einsum("nk,nkh->nh", block_values, rows_of_w)
            if self.weight is not None:
                contributions = block_values.unsqueeze(2) * scaled_hidden.unsqueeze(1)
                self.weight.index_add_(0, block.reshape(-1), contributions.reshape(-1, scaled_hidden.shape[1]))
            if self.bias is not None:
                self.bias.index_add_(0, block.reshape(-1), block_values.reshape(-1))

    def result(self) -> Gradients:
        if self.weight is not None and not self._weight_written:
            self.weight.zero_()
        if self.hidden is not None and self.head.shard is not None:
            self.head.shard.all_reduce(self.hidden)  # each slice's dh is a partial sum over the vocabulary
        return self.hidden, self.weight, self.bias


# -- the passes ----------------------------------------------------------------------------------------------------

BackendFactory = Callable[[Head, GradientNeeds], ChunkBackend]


def _allocated(make: BackendFactory, head: Head, needs: GradientNeeds, num_tokens: int,
               at_least: int = 0) -> tuple[ChunkBackend, int]:
    backend = make(head, needs)
    rows = plan_chunk_rows(num_tokens, backend.bytes_per_row(), head.memory_budget_mb)
    backend.allocate(max(rows, at_least))
    return backend, rows


@torch.no_grad()
def logprobs_and_entropy(make: BackendFactory, hidden: Tensor, targets: Tensor, head: Head) -> tuple[Tensor, ...]:
    """``(logp, entropy, lse)`` per token, one product, no gradient."""
    num_tokens = hidden.shape[0]
    out = [hidden.new_empty(num_tokens, dtype=head.accumulate_dtype) for _ in range(3)]
    if not num_tokens:
        return tuple(out)
    backend, rows = _allocated(make, head, NO_GRADIENT, num_tokens)
    for chunk in token_chunks(num_tokens, rows):
        ids = targets[chunk]
        stats = global_statistics(head, backend.statistics(hidden[chunk], chunk_targets(head, ids, chunk), None), ids)
        out[0][chunk], out[1][chunk], out[2][chunk] = stats.logprobs, stats.entropy, stats.log_sum_exp
    return tuple(out)


def _statistics_only_forward(tokens: TokenData, config: ObjectiveConfig, statistics: tuple[Tensor, Tensor, Tensor]
                             ) -> LossForward:
    logprobs, entropy, log_sum_exp = statistics
    terms = evaluate_objective(logprobs, entropy, tokens, config)
    return LossForward(logprobs, entropy, terms, SavedStatistics.of(log_sum_exp, entropy, terms, config), None)


@torch.no_grad()
def loss_forward(
    make: BackendFactory,
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: Head,
    config: ObjectiveConfig,
    needs: GradientNeeds,
    *,
    statistics_pass: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> LossForward:
    """Statistics, objective and, when the chunks allow it, the gradients in the same pass (three products in all).
    Without a gradient, where a row the objective needs whole exceeds a chunk, or where dz would be float16, only the
    statistics are formed (by ``statistics_pass`` where the backend has a better no-grad pass) and the backward
    recomputes."""
    num_tokens = hidden.shape[0]

    def statistics_only() -> LossForward:
        statistics = statistics_pass() if statistics_pass is not None else logprobs_and_entropy(
            make, hidden, targets, head)
        return _statistics_only_forward(tokens, config, statistics)

    if not needs.any or not num_tokens:
        return statistics_only()
    backend = make(head, needs)
    if backend.product_operands().operand_dtype == torch.float16:
        # A float16 dz formed for a unit upstream gradient flushes the softmax tail (p g below 6e-8) that a loss
        # scale exists to keep: the backward forms it, with the upstream gradient in it (a fourth product).
        return statistics_only()
    rows = plan_chunk_rows(num_tokens, backend.bytes_per_row(), head.memory_budget_mb)
    capacity = chunk_capacity(num_tokens, backend.bytes_per_row(), head.memory_budget_mb)
    chunks = plan_loss_chunks(tokens, rows, config, capacity)
    if chunks is None:
        return statistics_only()
    backend.allocate(max(rows, largest_chunk(chunks)))
    acc = head.accumulate_dtype
    logprobs, entropy, log_sum_exp = (hidden.new_empty(num_tokens, dtype=acc) for _ in range(3))
    grads = GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    fused = getattr(backend, "fused_token_chunk", None)
    use_fused = fused is not None and not config.needs_whole_rows and head.shard is None and config.in_kernel_epilogue
    keep = "logits" if config.has_entropy_bonus else "exp"
    parts = []
    for chunk in chunks:
        chunk_tokens, ids = tokens.select(chunk), targets[chunk]
        if use_fused:
            step = fused(hidden[chunk], ids, chunk_tokens, config)
            stats, terms, dz = step.stats, step.terms, step.gradient
        else:
            where = chunk_targets(head, ids, chunk)
            stats = global_statistics(head, backend.statistics(hidden[chunk], where, keep), ids)
            terms = evaluate_objective(stats.logprobs, stats.entropy, chunk_tokens, config)
            dz = backend.gradient(stats, where, terms.grad_logprobs,
                                  terms.grad_entropy if config.has_entropy_bonus else None)
        grads.add(chunk, dz, hidden[chunk], backend)
        parts.append(terms)
        logprobs[chunk], entropy[chunk], log_sum_exp[chunk] = stats.logprobs, stats.entropy, stats.log_sum_exp
    terms = TokenTerms.concatenate(parts, logprobs)
    saved = SavedStatistics.of(log_sum_exp, entropy, terms, config, chunks)
    return LossForward(logprobs, entropy, terms, saved, grads.result())


@torch.no_grad()
def recompute_gradients(
    make: BackendFactory, hidden: Tensor, targets: Tensor, head: Head, needs: GradientNeeds, saved: SavedStatistics
) -> Gradients:
    """The backward from saved per-token statistics, recomputing each chunk's logits (a fourth product), in the
    forward's chunks when it formed the gradients (so that a repeated backward reproduces it)."""
    num_tokens = hidden.shape[0]
    grads = GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    if not num_tokens:
        return grads.result()
    at_least = 0 if saved.chunks is None else largest_chunk(saved.chunks)  # the forward's chunks, up to the capacity
    backend, rows = _allocated(make, head, needs, num_tokens, at_least)
    keep = "exp" if saved.grad_entropy is None else "logits"
    for chunk in saved.chunks if saved.chunks is not None else token_chunks(num_tokens, rows):
        ids, chunk_saved = targets[chunk], saved.select(chunk)
        where = chunk_targets(head, ids, chunk)
        recompute = getattr(backend, "gradient_from_saved", None)
        if recompute is None and saved.chunks is None:  # no forward gradient to reproduce: dz from the saved lse
            recompute = getattr(backend, "gradient_from_lse", None)
        if recompute is not None:
            dz = recompute(hidden[chunk], where, chunk_saved)
        else:
            stats = global_statistics(head, backend.statistics(hidden[chunk], where, keep), ids)
            dz = backend.gradient(stats, where, chunk_saved.grad_logprobs, chunk_saved.grad_entropy)
        grads.add(chunk, dz, hidden[chunk], backend)
    return grads.result()


def planned_chunk_rows(backend: Backend, head: Head, needs: GradientNeeds, num_tokens: int) -> int:
    """The chunk rows ``backend`` takes for ``num_tokens`` tokens through ``head`` (the plan, nothing allocated)."""
    return plan_chunk_rows(num_tokens, backend.chunks(head, needs).bytes_per_row(), head.memory_budget_mb)


# -- a backend, as the autograd.Function and the public functions see it -------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A backend: its chunk operations and, where it has one, a no-grad pass better than the chunk loop."""

    name: str
    chunks: BackendFactory
    unsupported: Callable[[Head, ObjectiveConfig | None], str | None]
    """Why the backend cannot run this input (``None``: it can)."""
    no_grad_statistics: Callable[[Tensor, Tensor, Head], tuple[Tensor, Tensor, Tensor] | None] | None = None

    def logprobs_and_entropy(self, hidden: Tensor, targets: Tensor, head: Head) -> tuple[Tensor, Tensor, Tensor]:
        if self.no_grad_statistics is not None:
            result = self.no_grad_statistics(hidden, targets, head)
            if result is not None:
                return result
        return logprobs_and_entropy(self.chunks, hidden, targets, head)

    def loss_forward(self, hidden: Tensor, targets: Tensor, tokens: TokenData, head: Head, config: ObjectiveConfig,
                     needs: GradientNeeds) -> LossForward:
        return loss_forward(self.chunks, hidden, targets, tokens, head, config, needs,
                            statistics_pass=lambda: self.logprobs_and_entropy(hidden, targets, head))

    def recompute_gradients(self, hidden: Tensor, targets: Tensor, head: Head, needs: GradientNeeds,
                            saved: SavedStatistics) -> Gradients:
        return recompute_gradients(self.chunks, hidden, targets, head, needs, saved)
