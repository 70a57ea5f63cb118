"""The lm_head as the loss evaluates it: one object from the checked arguments down to the kernels.

``z = x / T`` with ``x = hidden W^T + bias``, or ``z = c tanh(x / c) / T`` for soft-capped logits; ``weight`` may be
this rank's slice of a vocabulary-parallel head (``shard``). ``vocab`` is always the whole vocabulary, ``local_vocab``
the rows this rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .vocab_parallel import VocabShard

STATISTICS_METHODS = ("auto", "dot", "cublas")
"""How the Triton backend's no-grad pass forms the logits: ``tl.dot`` tiles that never write them, or cuBLAS chunk
products into a float32 buffer read back by the statistics row kernel."""


@dataclass(frozen=True)
class Head:
    weight: Tensor | None  # [local_vocab, H]; None while autograd carries the tensors (see without_tensors)
    bias: Tensor | None  # [local_vocab]
    inv_temperature: float
    memory_budget_mb: float
    softcap: float | None = None
    shard: VocabShard | None = None
    statistics_method: str = "auto"
    support: object | None = None  # fused_gates.support.TokenSupport of the computed tokens (None: whole vocabulary)

    @property
    def local_vocab(self) -> int:
        """Rows of ``weight``: this rank's slice of a vocabulary-parallel head, else the whole vocabulary."""
        return self.weight.shape[0]

    @property
    def vocab(self) -> int:
        """The whole vocabulary (every slice of a vocabulary-parallel head)."""
        return self.local_vocab if self.shard is None else self.shard.vocab

    @property
    def planning_vocab(self) -> int:
        """The vocabulary the chunk plan is made for: every rank of a vocabulary-parallel head plans for the largest
        slice, so that all take the same chunks (their collectives must match)."""
        return self.local_vocab if self.shard is None else self.shard.largest_slice

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float32 statistics and gradients, float64 for float64 inputs (gradcheck, references)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def without_tensors(self) -> Head:
        """The head's options alone: an ``autograd.Function`` takes the tensors as inputs, and a tracer such as Dynamo
        must not see them twice."""
        return replace(self, weight=None, bias=None)

    def with_tensors(self, weight: Tensor, bias: Tensor | None) -> Head:
        return replace(self, weight=weight, bias=bias)

    def detached(self) -> Head:
        return self.with_tensors(self.weight.detach(), None if self.bias is None else self.bias.detach())
