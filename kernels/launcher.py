"""The Triton backend's entry points: the same three functions, signatures and results as
:mod:`fused_gates.torch_backend`, called by :class:`fused_gates.function.GatedPolicyLossFunction` for
``backend="triton"`` and by :func:`fused_gates.token_logprobs`.

* no gradient: :func:`~fused_gates.kernels.logprob_stats.token_statistics` (one ``tl.dot`` pass, no logits in
  memory), then the O(N) objective in torch;
* training: :func:`~fused_gates.kernels.chunk_grad.fused_loss_chunks` (cuBLAS products, the gate fused into a row
  kernel), with the recomputing backward when a sequence-level row does not fit a chunk.

float64 inputs (gradcheck, references) go to the torch backend: the kernels compute in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import torch_backend
from ..objective import ObjectiveConfig, TokenData, evaluate_objective
from ..torch_backend import GradientNeeds, HeadSpec, LossForward
from .chunk_grad import fused_loss_chunks, recompute_gradient_chunks
from .gates import kernel_gate
from .logprob_stats import token_statistics

__all__ = ["logprobs_and_entropy", "loss_forward", "recompute_gradients"]


def _use_torch(head: HeadSpec) -> bool:
    return head.weight.dtype == torch.float64


def logprobs_and_entropy(hidden: Tensor, targets: Tensor, head: HeadSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` per token of ``hidden`` [N, H]; one pass of ``tl.dot`` tiles, no gradient."""
    if _use_torch(head):
        return torch_backend.logprobs_and_entropy(hidden, targets, head)
    return token_statistics(hidden.detach(), targets, head.weight.detach(), _detached(head.bias), head.inv_temperature)


def loss_forward(
    hidden: Tensor,
    targets: Tensor,
    tokens: TokenData,
    head: HeadSpec,
    config: ObjectiveConfig,
    needs: GradientNeeds,
) -> LossForward:
    """Statistics, objective and (when the chunks allow it) the gradients, as ``torch_backend.loss_forward``."""
    if _use_torch(head):
        return torch_backend.loss_forward(hidden, targets, tokens, head, config, needs)
    kernel_gate(config.gate)  # a custom gate without Triton functions fails here, before any work
    hidden, head = hidden.detach(), _detached_head(head)
    if needs.any and hidden.shape[0]:
        result = fused_loss_chunks(hidden, targets, tokens, head, config, needs)
        if result is not None:
            return LossForward(result.logprobs, result.entropy, result.terms, result.gradients)
    # No gradient, or a sequence-level row longer than a chunk: statistics now, gradients recomputed in backward.
    logprobs, entropy, log_sum_exp = logprobs_and_entropy(hidden, targets, head)
    terms = evaluate_objective(logprobs, entropy, tokens, config)
    return LossForward(logprobs, entropy, [terms], None, log_sum_exp, terms.grad_logprobs, terms.grad_entropy)


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
    """The backward that recomputes each chunk's product from the saved ``lse`` and ``H``."""
    if _use_torch(head):
        return torch_backend.recompute_gradients(
            hidden, targets, head, needs, log_sum_exp, entropy, grad_logprobs, grad_entropy
        )
    return recompute_gradient_chunks(
        hidden.detach(), targets, _detached_head(head), needs, log_sum_exp, entropy, grad_logprobs, grad_entropy
    )


def _detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def _detached_head(head: HeadSpec) -> HeadSpec:
    return HeadSpec(head.weight.detach(), _detached(head.bias), head.inv_temperature, head.memory_budget_mb)
