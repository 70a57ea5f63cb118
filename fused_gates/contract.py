"""What the chunk driver and a backend exchange: the backend supplies, per chunk of tokens, how the logits are
formed and how their statistics and the logits gradient dz are computed; the driver (:mod:`fused_gates.chunk_driver`)
does everything else (planning, the chunk loop, the recompute path, gradient accumulation, the vocabulary-parallel
reductions). The ``autograd.Function`` sees only :class:`LossForward`, :class:`SavedStatistics` and
:data:`Gradients`.

Inputs are the valid tokens only: ``hidden`` [N, H], ``targets`` [N]; per-token results are [N] in the head's
accumulation dtype (float32; float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .objective import ObjectiveConfig, TokenTerms


@dataclass(frozen=True)
class GradientNeeds:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


NO_GRADIENT = GradientNeeds(False, False, False)

Gradients = tuple[Tensor | None, Tensor | None, Tensor | None]
"""``(dh, dW, db)`` in the accumulation dtype, ``None`` where not needed."""


@dataclass
class SavedStatistics:
    """Per-token results of the forward from which a backward can recompute the gradient: ``lse``, ``H`` and the
    gradient coefficients ``g = d loss / d logp`` and ``e = d loss / d H`` (``None`` without an entropy term)."""

    log_sum_exp: Tensor
    entropy: Tensor
    grad_logprobs: Tensor
    grad_entropy: Tensor | None
    chunks: list[slice] | None = None  # the forward's chunks, when it formed the gradients in them

    @staticmethod
    def of(log_sum_exp: Tensor, entropy: Tensor, terms: TokenTerms, config: ObjectiveConfig,
           chunks: list[slice] | None = None) -> SavedStatistics:
        return SavedStatistics(log_sum_exp, entropy, terms.grad_logprobs,
                               terms.grad_entropy if config.has_entropy_bonus else None, chunks)

    def select(self, rows: slice) -> SavedStatistics:
        grad_entropy = None if self.grad_entropy is None else self.grad_entropy[rows]
        return SavedStatistics(self.log_sum_exp[rows], self.entropy[rows], self.grad_logprobs[rows], grad_entropy)


@dataclass
class LossForward:
    """The forward's per-token results, the objective's terms, and the gradients when the pass could form them."""

    logprobs: Tensor
    entropy: Tensor
    terms: TokenTerms
    saved: SavedStatistics
    gradients: Gradients | None  # None: the backward recomputes from ``saved``


@dataclass(frozen=True)
class ChunkTargets:
    """A chunk's target ids as this rank's slice of the vocabulary sees them."""

    read: Tensor  # the target's column in the slice, safe to load (0 where another rank owns the target)
    owned: Tensor | None  # bool: this rank owns the target (None: a whole head)
    support: object | None = None  # the chunk's fused_gates.support.TokenSupport (None: the whole vocabulary)

    @property
    def one_hot(self) -> Tensor:
        """The column that takes the one-hot part of dz: the target's, or -1 where another rank owns it."""
        return self.read if self.owned is None else torch.where(self.owned, self.read, torch.full_like(self.read, -1))


@dataclass
class ChunkStatistics:
    """Per token of a chunk: ``logp``, ``H`` and ``lse`` of the logits the backend holds (this rank's slice alone
    until the driver combines the slices)."""

    logprobs: Tensor
    entropy: Tensor
    log_sum_exp: Tensor


@dataclass
class ChunkGradient:
    """A chunk's logits gradient, factored: ``dz = diag(row_scale) matrix + target_grad onehot(targets)``
    (``row_scale`` None: 1; ``target_grad`` None: the one-hot part is already in ``matrix``). ``matrix`` None: the
    gradient is held by a few columns per token, ``targets`` [n, K] (-1: none) with values ``target_grad`` [n, K].
    """

    matrix: Tensor | None  # [n, local V], float32 or already in the products' operand dtype
    row_scale: Tensor | None = None
    target_grad: Tensor | None = None
    targets: Tensor | None = None  # the one-hot columns (with target_grad)


class ChunkBackend(Protocol):
    """What a backend supplies for one call (made by its ``chunk_backend(head, needs)``)."""

    def bytes_per_row(self) -> int:
        """Working-buffer bytes per token of a chunk (the plan is made from this before any allocation)."""

    def allocate(self, rows: int) -> None:
        """The buffers for chunks of up to ``rows`` tokens (reused by every chunk)."""

    def statistics(self, hidden: Tensor, targets: ChunkTargets, keep: str | None) -> ChunkStatistics:
        """Form the chunk's logits and their statistics over this rank's slice. ``keep`` says what the buffer must
        hold afterwards for :meth:`gradient`: ``"exp"`` (a gradient without entropy term follows), ``"logits"``
        (one with an entropy term), None (nothing follows)."""

    def gradient(self, stats: ChunkStatistics, targets: ChunkTargets, grad_logprobs: Tensor,
                 grad_entropy: Tensor | None) -> ChunkGradient:
        """dz of the chunk whose :meth:`statistics` ran last, from its global statistics and coefficients."""

    def product_operands(self):
        """The :class:`fused_gates.products.ProductOperands` of the weight."""

    def dz_operand(self, matrix: Tensor) -> Tensor:
        """``matrix`` in the dtype of the gradient products."""


@dataclass(frozen=True)
class FusedChunk:
    """What a backend's optional ``fused_token_chunk`` returns: statistics, objective and dz in one step."""

    stats: ChunkStatistics
    terms: TokenTerms
    gradient: ChunkGradient

