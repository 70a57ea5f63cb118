"""The pure-PyTorch backend: the vocabulary passes in token chunks, never an N x V tensor.

Each chunk of ``n`` valid tokens owns one float32 buffer of ``n x V`` logits (``n`` chosen from the memory
budget). Per chunk:

1. ``z = (h / T) W^T + b / T`` into the buffer (scaling the small ``h`` instead of the logits saves a pass); with a
   soft-cap ``c``, ``z = (c / T) tanh((h / c) W^T + b / c)``, whose slope ``1 - (z T / c)^2`` then multiplies dz;
2. statistics in cache-sized vocabulary blocks: ``m = max z``, ``S = sum exp(z - m)``,
   ``Z = sum exp(z - m)(z - m)``, so ``lse = m + log S``, ``logp = z_y - lse`` and
   ``H = lse - sum p z = log S - Z / S``; the buffer is left holding ``exp(z - m)``;
3. when the gradient coefficients ``g`` (d loss / d logp) and ``e`` (d loss / d H) of the chunk's tokens are
   known from the chunk alone (token-level ratios, or sequence-level ratios with whole rows in the chunk), the
   logits gradient ``dz = g (onehot - p) - e p (z - sum p z)`` is used at once: ``dh = dz W / T``,
   ``dW += dz^T h / T``, ``db += sum dz / T``, accumulated in float32. Without an entropy term
   ``dz = diag(-g / S) exp(z - m) + g onehot``, so the products take the buffer as it is and the row scale is
   applied to the small operands. Three matrix products in all: the floor of any forward + backward.

Otherwise (rows longer than a chunk at sequence level) the forward keeps ``lse`` and ``H`` and the backward
recomputes the logits (a fourth product). Without gradients only steps 1-2 run (one product).

With a vocabulary-parallel head (:mod:`fused_gates.vocab_parallel`) the buffer holds this rank's slice of the
logits, step 2's statistics are made global by two reductions per chunk, the one-hot part of dz belongs to the rank
that owns the target, and dh is all-reduced at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backend import (
    VOCAB_BLOCK,
    GradientNeeds,
    Gradients,
    HeadSpec,
    LossForward,
    ProductOperands,
    SavedStatistics,
    addmm_into,
    mm_into,
    plan_chunk_tokens,
    row_aligned_chunks,
    saved_statistics,
    token_chunks,
)
from .objective import ObjectiveConfig, TokenData, TokenTerms, evaluate_objective
from .vocab_parallel import reduce_statistics

NAME = "torch"


def unsupported(head: HeadSpec, config: ObjectiveConfig | None) -> str | None:
    """The torch backend runs every input (any device, any dtype, every gate); its no-grad pass has one method."""
    if head.statistics_method != "auto":
        return f"statistics_method={head.statistics_method!r} selects a Triton kernel; the torch backend has none"
    return None


class _ChunkWorkspace:
    """Buffers reused by every chunk: fresh multi-hundred-MB allocations would page-fault on each chunk."""

    def __init__(self, rows: int, head: HeadSpec, device: torch.device, with_grad: bool):
        acc = head.accumulate_dtype
        self.operands = ProductOperands(head.weight, acc)
        self.logits = torch.empty(rows, head.vocab, device=device, dtype=acc)
        block = min(VOCAB_BLOCK, head.vocab)
        self.block_a = torch.empty(rows, block, device=device, dtype=acc)
        self.block_b = torch.empty(rows, block, device=device, dtype=acc)
        # The backward products take dz in the weight's dtype when float32-output products of that dtype exist.
        low = self.operands.operand_dtype
        with_copy = with_grad and low != acc
        self.low_precision = torch.empty(rows, head.vocab, device=device, dtype=low) if with_copy else None
        # x / T, or x / c before the soft-cap's tanh; then z = alpha tanh(x / c) with alpha = c / T
        self.input_scale = head.inv_temperature if head.softcap is None else 1.0 / head.softcap
        self.softcap_alpha = None if head.softcap is None else head.softcap * head.inv_temperature
        self.scaled_bias = None if head.bias is None else head.bias.to(acc) * self.input_scale

    def dz_operand(self, matrix: Tensor) -> Tensor:
        """The chunk's ``n x V`` float32 matrix as the backward products take it."""
        if self.low_precision is None:
            return matrix
        return self.low_precision[: matrix.shape[0]].copy_(matrix)


def _workspace_for(num_tokens: int, head: HeadSpec, device, with_grad: bool) -> tuple[int, _ChunkWorkspace]:
    low_precision_copy = with_grad and head.weight.dtype != head.accumulate_dtype
    extra = 2 if low_precision_copy else 0
    rows = plan_chunk_tokens(num_tokens, head.planning_vocab, head.memory_budget_mb, extra_bytes_per_logit=extra)
    return rows, _ChunkWorkspace(rows, head, device, with_grad)


@dataclass
class _ChunkStatistics:
    max_logit: Tensor  # of the logits in the buffer (this rank's slice with a vocabulary-parallel head)
    log_sum_exp: Tensor  # over the whole vocabulary
    logprobs: Tensor
    entropy: Tensor
    mean_logit: Tensor  # sum_v p_v z_v
    targets: Tensor  # the target's column in the buffer (0 where another rank owns it)
    owned: Tensor | None  # whether this rank owns the target (None: a whole head)
    target_slope: Tensor | None  # the soft-cap's slope at the target's logit

    def probability_scale(self) -> Tensor:
        """``exp(max - lse)``: the buffer's ``exp(z - max)`` times this is ``p`` (``1 / S`` for a whole head)."""
        return torch.exp(self.max_logit - self.log_sum_exp)

    def target_grad(self, grad_logprobs: Tensor) -> Tensor:
        """The one-hot part of dz: ``g`` (times the soft-cap's slope) at the target, on the rank that owns it."""
        grad = grad_logprobs if self.target_slope is None else grad_logprobs * self.target_slope
        return grad if self.owned is None else grad * self.owned


def _scale(x: Tensor, factor: float) -> Tensor:
    return x * factor if factor != 1.0 else x


def _chunk_logits(ws: _ChunkWorkspace, hidden: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor]:
    """``z`` of the chunk in the buffer, and ``h / T`` (the small operand the gradient products take)."""
    n = hidden.shape[0]
    operand = ws.operands.cast(_scale(hidden, ws.input_scale))
    logits = mm_into(ws.logits[:n], operand, ws.operands.weight.t())
    if ws.scaled_bias is not None:
        logits.add_(ws.scaled_bias)
    if ws.softcap_alpha is None:
        return logits, operand
    logits.tanh_().mul_(ws.softcap_alpha)
    return logits, ws.operands.cast(_scale(hidden, head.inv_temperature))


def _softcap_slope(z: Tensor, alpha: float, out: Tensor) -> Tensor:
    """``1 - (z / alpha)^2 = 1 - tanh^2``: d z / d x of soft-capped logits, up to the ``1 / T`` of the products."""
    return torch.div(z, alpha, out=out).square_().neg_().add_(1.0)


def _chunk_statistics(
    logits: Tensor, targets: Tensor, ws: _ChunkWorkspace, head: HeadSpec, keep_exp: bool
) -> _ChunkStatistics:
    """Per-row statistics of the logits; with ``keep_exp`` the buffer is left holding ``exp(z - max)`` (times the
    soft-cap's slope), from which the gradient needs only a per-row scale (see :class:`_GradientAccumulator`)."""
    n, vocab = logits.shape
    alpha = ws.softcap_alpha
    owned = None
    if head.shard is not None:
        targets, owned = head.shard.local_targets(targets)
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    if owned is not None:
        target_logit = target_logit * owned
    max_logit = logits.amax(dim=1)
    max_col = max_logit.unsqueeze(1)
    sum_exp = logits.new_zeros(n)
    sum_exp_shifted = logits.new_zeros(n)
    for start in range(0, vocab, VOCAB_BLOCK):
        block = logits[:, start : start + VOCAB_BLOCK]
        width = block.shape[1]
        slope = _softcap_slope(block, alpha, ws.block_b[:n, :width]) if keep_exp and alpha is not None else None
        shifted = torch.sub(block, max_col, out=ws.block_a[:n, :width])
        weights = torch.exp(shifted, out=block if keep_exp else ws.block_b[:n, :width])
        sum_exp += weights.sum(dim=1)
        sum_exp_shifted += shifted.mul_(weights).sum(dim=1)
        if slope is not None:
            weights.mul_(slope)
    global_max = max_logit
    if head.shard is not None:
        global_max, sum_exp, sum_exp_shifted, target_logit = reduce_statistics(
            head.shard, max_logit, sum_exp, sum_exp_shifted, target_logit
        )
    log_sum = torch.log(sum_exp)
    log_sum_exp = global_max + log_sum
    mean_shifted = sum_exp_shifted / sum_exp
    return _ChunkStatistics(
        max_logit=max_logit,
        log_sum_exp=log_sum_exp,
        logprobs=target_logit - log_sum_exp,
        entropy=log_sum - mean_shifted,
        mean_logit=mean_shifted + global_max,
        targets=targets,
        owned=owned,
        target_slope=None if alpha is None else 1.0 - (target_logit / alpha).square(),
    )


def _entropy_grad_inplace(
    logits: Tensor, log_sum_exp: Tensor, mean_logit: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor,
    ws: _ChunkWorkspace,
) -> Tensor:
    """``p (-g - e (z - mean_p z))`` (times the soft-cap's slope) written over the logits: ``dz`` without its one-hot
    part ``g 1[v = y]``."""
    n, vocab = logits.shape
    lse_col = log_sum_exp.unsqueeze(1)
    # p * (-g - e (z - mean)) = p * (z * (-e) + (e mean - g))
    neg_e = (-grad_entropy).unsqueeze(1)
    offset = (grad_entropy * mean_logit - grad_logprobs).unsqueeze(1)
    for start in range(0, vocab, VOCAB_BLOCK):
        block = logits[:, start : start + VOCAB_BLOCK]
        width = block.shape[1]
        coefficient = torch.mul(block, neg_e, out=ws.block_a[:n, :width]).add_(offset)
        if ws.softcap_alpha is not None:
            coefficient.mul_(_softcap_slope(block, ws.softcap_alpha, ws.block_b[:n, :width]))
        block.sub_(lse_col).exp_().mul_(coefficient)
    return logits


class _GradientAccumulator:
    """Accumulates ``dh = dz W / T``, ``dW += dz^T h / T`` and ``db += sum dz / T`` for a chunk whose logits gradient
    is given factored as ``dz = diag(row_scale) M + g onehot(y)``.

    Without an entropy term ``M = exp(z - max)`` (left by the statistics pass) and ``row_scale = -g / S``, so the
    products run on ``M`` directly and the scales apply to the small ``[n, H]`` operands: no pass over the
    ``n x V`` buffer is needed to form ``dz``. The one-hot part costs a gather / scatter of ``n`` rows of W. The
    first chunk writes dW instead of adding to zeros (one read of the accumulator less).
    """

    def __init__(self, num_tokens: int, hidden_size: int, head: HeadSpec, needs: GradientNeeds, device):
        self.head = head
        acc = head.accumulate_dtype
        self.hidden = torch.zeros(num_tokens, hidden_size, device=device, dtype=acc) if needs.hidden else None
        self.weight = torch.empty(head.weight.shape, device=device, dtype=acc) if needs.weight else None
        self.bias = torch.zeros(head.vocab, device=device, dtype=acc) if needs.bias else None
        self._weight_written = False

    def add(
        self,
        rows: slice,
        matrix: Tensor,
        row_scale: Tensor | None,
        target_grad: Tensor,
        targets: Tensor,
        scaled_hidden: Tensor,
        ws: _ChunkWorkspace,
    ) -> None:
        inv_t = self.head.inv_temperature
        weight = ws.operands.weight
        acc = matrix.dtype
        operand = ws.dz_operand(matrix) if self.hidden is not None or self.weight is not None else matrix
        target_col = target_grad.unsqueeze(1)
        if self.hidden is not None:
            dh = mm_into(self.hidden[rows], operand, weight)
            if row_scale is not None:
                dh.mul_(row_scale.unsqueeze(1))
            dh.add_(weight.index_select(0, targets).to(acc) * target_col)
            if inv_t != 1.0:
                dh.mul_(inv_t)
        if self.weight is not None:
            rhs = scaled_hidden
            if row_scale is not None:
                rhs = scaled_hidden * row_scale.unsqueeze(1).to(scaled_hidden.dtype)
            addmm_into(self.weight, operand.t(), rhs, overwrite=not self._weight_written)
            self._weight_written = True
            self.weight.index_add_(0, targets, scaled_hidden.to(acc) * target_col)
        if self.bias is not None:
            scale = row_scale if row_scale is not None else matrix.new_ones(matrix.shape[0])
            self.bias.add_(matrix.t().mv(scale), alpha=inv_t)
            self.bias.index_add_(0, targets, target_grad * inv_t)

    def result(self) -> Gradients:
        if self.weight is not None and not self._weight_written:
            self.weight.zero_()
        if self.hidden is not None and self.head.shard is not None:
            self.head.shard.all_reduce(self.hidden)  # each slice's dh is a partial sum over the vocabulary
        return self.hidden, self.weight, self.bias


@torch.no_grad()
def logprobs_and_entropy(hidden: Tensor, targets: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` per token of ``hidden`` [N, H]; one matrix product, no gradient."""
    num_tokens = hidden.shape[0]
    out = [hidden.new_empty(num_tokens, dtype=head.accumulate_dtype) for _ in range(3)]
    if num_tokens == 0:
        return out[0], out[1], out[2]
    rows, ws = _workspace_for(num_tokens, head, hidden.device, with_grad=False)
    for chunk in token_chunks(num_tokens, rows):
        logits, _ = _chunk_logits(ws, hidden[chunk], head)
        stats = _chunk_statistics(logits, targets[chunk], ws, head, keep_exp=False)
        out[0][chunk], out[1][chunk], out[2][chunk] = stats.logprobs, stats.entropy, stats.log_sum_exp
    return out[0], out[1], out[2]


def _chunk_gradient(
    ws: _ChunkWorkspace,
    grads: _GradientAccumulator,
    chunk: slice,
    hidden: Tensor,
    targets: Tensor,
    head: HeadSpec,
    with_entropy: bool,
    coefficients: Callable[[_ChunkStatistics], tuple[Tensor, Tensor | None]],
) -> _ChunkStatistics:
    """One chunk of the three-product pass: logits, statistics, the gradient coefficients ``(g, e)`` that
    ``coefficients`` gives for them, and the gradient products. The forward and a recomputing backward both run this,
    so a repeated backward reproduces the forward's gradient bit for bit."""
    logits, scaled_hidden = _chunk_logits(ws, hidden[chunk], head)
    stats = _chunk_statistics(logits, targets[chunk], ws, head, keep_exp=not with_entropy)
    g, e = coefficients(stats)
    if with_entropy:
        matrix, row_scale = _entropy_grad_inplace(logits, stats.log_sum_exp, stats.mean_logit, g, e, ws), None
    else:
        matrix, row_scale = logits, -g * stats.probability_scale()  # logits hold exp(z - max) (times the slope)
    grads.add(chunk, matrix, row_scale, stats.target_grad(g), stats.targets, scaled_hidden, ws)
    return stats


@torch.no_grad()
def loss_forward(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
) -> LossForward:
    """Statistics, objective and (when the chunks allow it) the gradients in one pass over the vocabulary."""
    num_tokens = hidden.shape[0]
    rows, ws = _workspace_for(max(num_tokens, 1), head, hidden.device, with_grad=needs.any)
    chunks = row_aligned_chunks(tokens, rows, config) if num_tokens else []

    if chunks is None or not needs.any:
        # Statistics for every token first; the gradient (if any) is recomputed in backward.
        del ws
        logprobs, entropy, log_sum_exp = logprobs_and_entropy(hidden, targets, head)
        terms = evaluate_objective(logprobs, entropy, tokens, config)
        return LossForward(logprobs, entropy, terms, saved_statistics(log_sum_exp, entropy, terms, config), None)

    acc = head.accumulate_dtype
    logprobs = hidden.new_empty(num_tokens, dtype=acc)
    entropy = hidden.new_empty(num_tokens, dtype=acc)
    log_sum_exp = hidden.new_empty(num_tokens, dtype=acc)
    grads = _GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    parts = []
    for chunk in chunks:

        def objective(stats: _ChunkStatistics, chunk: slice = chunk) -> tuple[Tensor, Tensor]:
            terms = evaluate_objective(stats.logprobs, stats.entropy, tokens.select(chunk), config)
            parts.append(terms)
            return terms.grad_logprobs, terms.grad_entropy

        stats = _chunk_gradient(ws, grads, chunk, hidden, targets, head, config.has_entropy_bonus, objective)
        logprobs[chunk], entropy[chunk], log_sum_exp[chunk] = stats.logprobs, stats.entropy, stats.log_sum_exp
    terms = TokenTerms.concatenate(parts, logprobs)
    saved = saved_statistics(log_sum_exp, entropy, terms, config, chunks)
    return LossForward(logprobs, entropy, terms, saved, grads.result())


@torch.no_grad()
def recompute_gradients(
    hidden: Tensor, targets: Tensor, head: HeadSpec, needs: GradientNeeds, saved: SavedStatistics
) -> Gradients:
    """The backward that recomputes each chunk's logits and statistics and takes the saved coefficients ``g``, ``e``
    (in the forward's chunks when it formed the gradients, so that the result is the same)."""
    num_tokens = hidden.shape[0]
    grads = _GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    if num_tokens == 0:
        return grads.result()
    rows, ws = _workspace_for(num_tokens, head, hidden.device, with_grad=True)
    chunks = saved.chunks if saved.chunks is not None else token_chunks(num_tokens, rows)
    with_entropy = saved.grad_entropy is not None
    for chunk in chunks:

        def coefficients(stats: _ChunkStatistics, chunk: slice = chunk) -> tuple[Tensor, Tensor | None]:
            return saved.grad_logprobs[chunk], saved.grad_entropy[chunk] if with_entropy else None

        _chunk_gradient(ws, grads, chunk, hidden, targets, head, with_entropy, coefficients)
    return grads.result()
