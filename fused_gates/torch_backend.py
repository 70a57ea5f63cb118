"""The pure-PyTorch backend: the vocabulary passes in token chunks, never an N x V tensor.

Each chunk of ``n`` valid tokens owns one float32 buffer of ``n x V`` logits (``n`` chosen from the memory
budget). Per chunk:

1. ``z = (h / T) W^T + b / T`` into the buffer (scaling the small ``h`` instead of the logits saves a pass);
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .objective import ObjectiveConfig, TokenData, TokenTerms, evaluate_objective

CPU_MEMORY_BUDGET_MB = 128.0
"""Working buffers on CPU: 128 MiB keeps the loss within 1.04x of the three-product floor at Qwen2.5-0.5B's head
(2,048 tokens, 2 cores) with 4.7% of the materialised-logits version's extra memory (benchmarks/results/)."""
GPU_MEMORY_BUDGET_MB = 768.0
"""On GPU each chunk also round-trips the float32 dW accumulator, so larger chunks pay off; 768 MiB keeps the
loss's working memory under 1 GiB."""


def default_memory_budget_mb(device: torch.device) -> float:
    return GPU_MEMORY_BUDGET_MB if device.type == "cuda" else CPU_MEMORY_BUDGET_MB
VOCAB_BLOCK = 2048
"""Columns per elementwise step: a ``chunk x 2048`` float32 block stays in cache across its few passes."""


@dataclass(frozen=True)
class HeadSpec:
    """The lm_head and how to evaluate it: ``z = (hidden W^T + bias) / temperature``."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    inv_temperature: float
    memory_budget_mb: float

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float32 statistics and gradients, float64 for float64 inputs (gradcheck, references)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class GradientNeeds:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def plan_chunk_tokens(num_tokens: int, vocab: int, memory_budget_mb: float, extra_bytes_per_logit: int = 0) -> int:
    """Tokens per chunk so that the chunk's ``n x V`` float32 logits (plus ``extra_bytes_per_logit``, e.g. a
    low-precision copy for the backward products) fit the budget; at least 1, at most ``num_tokens``."""
    per_token = vocab * (4 + extra_bytes_per_logit) + 2 * min(VOCAB_BLOCK, vocab) * 4
    budget = int(memory_budget_mb * 2**20)
    return max(1, min(num_tokens, budget // per_token))


def mm_into_fp32(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out = a @ b`` for a float32 (or float64) ``out`` without rounding the product to a low-precision dtype."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if out.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` accumulated in float32 (rounding each chunk's product to bf16 biases the sum)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda":
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _ChunkWorkspace:
    """Buffers reused by every chunk: fresh multi-hundred-MB allocations would page-fault on each chunk."""

    def __init__(self, rows: int, head: HeadSpec, device: torch.device, low_precision: torch.dtype | None):
        acc = head.accumulate_dtype
        self.logits = torch.empty(rows, head.vocab, device=device, dtype=acc)
        block = min(VOCAB_BLOCK, head.vocab)
        self.block_a = torch.empty(rows, block, device=device, dtype=acc)
        self.block_b = torch.empty(rows, block, device=device, dtype=acc)
        self.low_precision = (
            torch.empty(rows, head.vocab, device=device, dtype=low_precision) if low_precision is not None else None
        )
        self.scaled_bias = None if head.bias is None else head.bias.to(acc) * head.inv_temperature


@dataclass
class _ChunkStatistics:
    max_logit: Tensor
    sum_exp: Tensor  # S = sum_v exp(z_v - max)
    log_sum_exp: Tensor
    logprobs: Tensor
    entropy: Tensor
    mean_logit: Tensor  # sum_v p_v z_v


def _chunk_logits(ws: _ChunkWorkspace, hidden: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor]:
    n = hidden.shape[0]
    scaled_hidden = hidden * head.inv_temperature if head.inv_temperature != 1.0 else hidden
    logits = mm_into_fp32(ws.logits[:n], scaled_hidden, head.weight.t())
    if ws.scaled_bias is not None:
        logits.add_(ws.scaled_bias)
    return logits, scaled_hidden


def _chunk_statistics(logits: Tensor, targets: Tensor, ws: _ChunkWorkspace, keep_exp: bool) -> _ChunkStatistics:
    """Per-row statistics of the logits; with ``keep_exp`` the buffer is left holding ``exp(z - max)``, from which
    the gradient needs only a per-row scale (see :class:`_GradientAccumulator`)."""
    n, vocab = logits.shape
    target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    max_logit = logits.amax(dim=1)
    max_col = max_logit.unsqueeze(1)
    sum_exp = logits.new_zeros(n)
    sum_exp_shifted = logits.new_zeros(n)
    for start in range(0, vocab, VOCAB_BLOCK):
        block = logits[:, start : start + VOCAB_BLOCK]
        width = block.shape[1]
        shifted = torch.sub(block, max_col, out=ws.block_a[:n, :width])
        weights = torch.exp(shifted, out=block if keep_exp else ws.block_b[:n, :width])
        sum_exp += weights.sum(dim=1)
        sum_exp_shifted += shifted.mul_(weights).sum(dim=1)
    log_sum = torch.log(sum_exp)
    log_sum_exp = max_logit + log_sum
    mean_shifted = sum_exp_shifted / sum_exp
    return _ChunkStatistics(
        max_logit=max_logit,
        sum_exp=sum_exp,
        log_sum_exp=log_sum_exp,
        logprobs=target_logit - log_sum_exp,
        entropy=log_sum - mean_shifted,
        mean_logit=mean_shifted + max_logit,
    )


def _probabilities_inplace(logits: Tensor, log_sum_exp: Tensor) -> Tensor:
    lse_col = log_sum_exp.unsqueeze(1)
    for start in range(0, logits.shape[1], VOCAB_BLOCK):
        logits[:, start : start + VOCAB_BLOCK].sub_(lse_col).exp_()
    return logits


def _entropy_grad_inplace(
    logits: Tensor, log_sum_exp: Tensor, mean_logit: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor,
    ws: _ChunkWorkspace,
) -> Tensor:
    """``p (-g - e (z - mean_p z))`` written over the logits: ``dz`` without its one-hot part ``g 1[v = y]``."""
    n, vocab = logits.shape
    lse_col = log_sum_exp.unsqueeze(1)
    # p * (-g - e (z - mean)) = p * (z * (-e) + (e mean - g))
    neg_e = (-grad_entropy).unsqueeze(1)
    offset = (grad_entropy * mean_logit - grad_logprobs).unsqueeze(1)
    for start in range(0, vocab, VOCAB_BLOCK):
        block = logits[:, start : start + VOCAB_BLOCK]
        coefficient = torch.mul(block, neg_e, out=ws.block_a[:n, : block.shape[1]]).add_(offset)
        block.sub_(lse_col).exp_().mul_(coefficient)
    return logits


class _GradientAccumulator:
    """Accumulates ``dh = dz W / T``, ``dW += dz^T h / T`` and ``db += sum dz / T`` for a chunk whose logits gradient
    is given factored as ``dz = diag(row_scale) M + g onehot(y)``.

    Without an entropy term ``M = exp(z - max)`` (left by the statistics pass) and ``row_scale = -g / S``, so the
    products run on ``M`` directly and the scales apply to the small ``[n, H]`` operands: no pass over the
    ``n x V`` buffer is needed to form ``dz``. The one-hot part costs a gather / scatter of ``n`` rows of W.
    """

    def __init__(self, num_tokens: int, hidden_size: int, head: HeadSpec, needs: GradientNeeds, device):
        self.head = head
        self.needs = needs
        acc = head.accumulate_dtype
        self.hidden = torch.zeros(num_tokens, hidden_size, device=device, dtype=acc) if needs.hidden else None
        self.weight = torch.zeros(head.weight.shape, device=device, dtype=acc) if needs.weight else None
        self.bias = torch.zeros(head.vocab, device=device, dtype=acc) if needs.bias else None

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
        weight, inv_t = self.head.weight, self.head.inv_temperature
        acc = matrix.dtype
        operand = matrix
        if weight.dtype != acc and ws.low_precision is not None:
            operand = ws.low_precision[: matrix.shape[0]].copy_(matrix)
        target_col = target_grad.unsqueeze(1)
        if self.hidden is not None:
            dh = mm_into_fp32(self.hidden[rows], operand, weight)
            if row_scale is not None:
                dh.mul_(row_scale.unsqueeze(1))
            dh.add_(weight.index_select(0, targets).to(acc) * target_col)
            if inv_t != 1.0:
                dh.mul_(inv_t)
        if self.weight is not None:
            rhs = scaled_hidden
            if row_scale is not None:
                rhs = scaled_hidden * row_scale.unsqueeze(1).to(scaled_hidden.dtype)
            addmm_fp32(self.weight, operand.t(), rhs)
            self.weight.index_add_(0, targets, scaled_hidden.to(acc) * target_col)
        if self.bias is not None:
            scale = row_scale if row_scale is not None else matrix.new_ones(matrix.shape[0])
            self.bias.add_(matrix.t().mv(scale), alpha=inv_t)
            self.bias.index_add_(0, targets, target_grad * inv_t)


def _workspace_for(num_tokens: int, head: HeadSpec, device, with_low_precision: bool) -> tuple[int, _ChunkWorkspace]:
    low = head.weight.dtype if with_low_precision and head.weight.dtype != head.accumulate_dtype else None
    extra = 2 if low is not None else 0
    rows = plan_chunk_tokens(num_tokens, head.vocab, head.memory_budget_mb, extra_bytes_per_logit=extra)
    return rows, _ChunkWorkspace(rows, head, device, low)


@torch.no_grad()
def logprobs_and_entropy(hidden: Tensor, targets: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` per token of ``hidden`` [N, H]; one matrix product, no gradient."""
    num_tokens = hidden.shape[0]
    out = [hidden.new_empty(num_tokens, dtype=head.accumulate_dtype) for _ in range(3)]
    if num_tokens == 0:
        return out[0], out[1], out[2]
    rows, ws = _workspace_for(num_tokens, head, hidden.device, with_low_precision=False)
    for start in range(0, num_tokens, rows):
        chunk = slice(start, min(start + rows, num_tokens))
        logits, _ = _chunk_logits(ws, hidden[chunk], head)
        stats = _chunk_statistics(logits, targets[chunk], ws, keep_exp=False)
        out[0][chunk], out[1][chunk], out[2][chunk] = stats.logprobs, stats.entropy, stats.log_sum_exp
    return out[0], out[1], out[2]


@dataclass
class LossForward:
    """The forward's per-token results and what its backward needs."""

    logprobs: Tensor
    entropy: Tensor
    terms: list[TokenTerms]
    gradients: tuple[Tensor | None, Tensor | None, Tensor | None] | None  # computed in the forward pass
    log_sum_exp: Tensor | None = None  # for a recomputing backward
    grad_logprobs: Tensor | None = None
    grad_entropy: Tensor | None = None


def row_aligned_chunks(tokens: TokenData, rows: int, sequence_level: bool) -> list[slice] | None:
    """Chunk boundaries of at most ``rows`` tokens; at sequence level they must fall between rows of the batch
    (``None`` when one row alone exceeds a chunk)."""
    num_tokens = tokens.advantages.shape[0]
    if not sequence_level:
        return [slice(s, min(s + rows, num_tokens)) for s in range(0, num_tokens, rows)]
    counts = torch.bincount(tokens.row, minlength=tokens.num_rows).tolist()
    chunks, start, size = [], 0, 0
    for count in counts:
        if count > rows:
            return None
        if size + count > rows:
            chunks.append(slice(start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(slice(start, start + size))
    return chunks


def loss_forward(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
    objective: Callable[[Tensor, Tensor, TokenData, ObjectiveConfig], TokenTerms] = evaluate_objective,
) -> LossForward:
    """Statistics, objective and (when the chunks allow it) the gradients in one pass over the vocabulary."""
    num_tokens = hidden.shape[0]
    rows, ws = _workspace_for(max(num_tokens, 1), head, hidden.device, with_low_precision=needs.any)
    chunks = row_aligned_chunks(tokens, rows, config.sequence_level) if num_tokens else []
    logprobs = hidden.new_empty(num_tokens, dtype=head.accumulate_dtype)
    entropy = hidden.new_empty(num_tokens, dtype=head.accumulate_dtype)

    if chunks is None or not needs.any:
        # Statistics for every token first; the gradient (if any) is recomputed in backward.
        logprobs, entropy, log_sum_exp = logprobs_and_entropy(hidden, targets, head)
        terms = objective(logprobs, entropy, tokens, config)
        return LossForward(logprobs, entropy, [terms], None, log_sum_exp, terms.grad_logprobs, terms.grad_entropy)

    grads = _GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    all_terms = []
    with torch.no_grad():
        for chunk in chunks:
            logits, scaled_hidden = _chunk_logits(ws, hidden[chunk], head)
            stats = _chunk_statistics(logits, targets[chunk], ws, keep_exp=not config.has_entropy_bonus)
            logprobs[chunk], entropy[chunk] = stats.logprobs, stats.entropy
            terms = objective(stats.logprobs, stats.entropy, tokens.select(chunk), config)
            all_terms.append(terms)
            g = terms.grad_logprobs
            if config.has_entropy_bonus:
                matrix = _entropy_grad_inplace(logits, stats.log_sum_exp, stats.mean_logit, g, terms.grad_entropy, ws)
                row_scale = None
            else:
                matrix, row_scale = logits, -g / stats.sum_exp  # logits now hold exp(z - max)
            grads.add(chunk, matrix, row_scale, g, targets[chunk], scaled_hidden, ws)
    return LossForward(logprobs, entropy, all_terms, (grads.hidden, grads.weight, grads.bias))


@torch.no_grad()
def recompute_gradients(
    hidden: Tensor,
    targets: Tensor,
    head: HeadSpec,
    needs: GradientNeeds,
    log_sum_exp: Tensor,
    entropy: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward that recomputes each chunk's logits from saved ``lse`` and ``H``."""
    num_tokens = hidden.shape[0]
    grads = _GradientAccumulator(num_tokens, hidden.shape[1], head, needs, hidden.device)
    if num_tokens == 0:
        return grads.hidden, grads.weight, grads.bias
    rows, ws = _workspace_for(num_tokens, head, hidden.device, with_low_precision=True)
    for start in range(0, num_tokens, rows):
        chunk = slice(start, min(start + rows, num_tokens))
        logits, scaled_hidden = _chunk_logits(ws, hidden[chunk], head)
        g = grad_logprobs[chunk]
        if grad_entropy is None:
            matrix, row_scale = _probabilities_inplace(logits, log_sum_exp[chunk]), -g
        else:
            mean_logit = log_sum_exp[chunk] - entropy[chunk]
            matrix = _entropy_grad_inplace(logits, log_sum_exp[chunk], mean_logit, g, grad_entropy[chunk], ws)
            row_scale = None
        grads.add(chunk, matrix, row_scale, g, targets[chunk], scaled_hidden, ws)
    return grads.hidden, grads.weight, grads.bias
