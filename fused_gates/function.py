"""The ``autograd.Function`` over the backends: loss from hidden states and the lm_head, gradients for both.

The forward usually forms the gradients already (the backends' three-product pass). Autograd semantics that
follow from that:

* the precomputed gradients are handed to the first backward and released, so that nothing the caller does to
  ``.grad`` afterwards (accumulation, ``zero_()``) can touch a buffer this node still needs;
* a repeated backward through a retained graph recomputes them from the saved per-token statistics (one more
  product pass) and returns fresh tensors: three backwards give three times the gradient;
* double backward (``create_graph=True``) is not supported (the gradient is the output of a fused pass, not of
  differentiable operations) and raises at once rather than returning a gradient without a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk_driver import Backend
from .contract import GradientNeeds, SavedStatistics
from .head import Head
from .objective import ObjectiveConfig, TokenData

DOUBLE_BACKWARD_ERROR = (
    "gated_policy_loss: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the loss's "
    "gradient comes from a fused pass over the vocabulary, not from differentiable operations. Compute the penalty "
    "on a loss built from materialised logits instead."
)


class GatedPolicyLossFunction(torch.autograd.Function):
    """``loss(hidden, weight, bias)`` plus detached per-token outputs.

    Inputs are the valid tokens only (``hidden`` [N, H], ``targets`` [N]); ``tokens`` carries their advantages,
    masks, log-probs and aggregation weights. Returns ``(loss, logprobs, entropy, ratio, gate_value, gate_grad,
    kl, policy_weight)`` with ``kl`` empty when ``beta == 0`` and ``policy_weight`` empty when it is 1. No gradient
    flows to the advantages or the given log-probs (TRL treats them as constants too).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        tokens: TokenData,
        config: ObjectiveConfig,
        head: Head,
        backend: Backend,
    ):
        """``head`` describes how ``weight`` and ``bias`` make the logits; its own tensor fields are left empty (the
        tensors come as inputs, for autograd, and must not appear twice to a tracer such as Dynamo)."""
        needs = GradientNeeds(*ctx.needs_input_grad[:3])
        result = backend.loss_forward(hidden, targets, tokens, head.with_tensors(weight, bias), config, needs)
        terms = result.terms

        ctx.backend = backend
        ctx.head = head  # the tensors are saved for backward
        ctx.needs = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.gradients = result.gradients  # handed out (and released) by the first backward
        saved = result.saved
        ctx.chunks = saved.chunks
        ctx.save_for_backward(
            hidden, weight, bias, targets, saved.log_sum_exp, saved.entropy, saved.grad_logprobs, saved.grad_entropy
        )
        outputs = (result.logprobs, result.entropy, terms.ratio, terms.gate_value, terms.gate_grad,
                   terms.kl if terms.kl is not None else terms.ratio.new_empty(0),
                   terms.policy_weight if terms.policy_weight is not None else terms.ratio.new_empty(0))
        ctx.mark_non_differentiable(*outputs)
        return (terms.loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *unused: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        needs: GradientNeeds = ctx.needs
        grads, ctx.gradients = ctx.gradients, None
        if grads is None:
            # dz is linear in the per-token coefficients: the upstream gradient (a 0-dim tensor, e.g. a loss scale)
            # enters there, O(N) work, before any float16 rounding of dz, and the gradients come out scaled
            hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy = ctx.saved_tensors
            upstream = grad_loss.to(grad_logprobs.dtype)
            saved = SavedStatistics(lse, entropy, grad_logprobs * upstream,
                                    None if grad_entropy is None else grad_entropy * upstream, ctx.chunks)
            grads = ctx.backend.recompute_gradients(hidden, targets, ctx.head.with_tensors(weight, bias), needs, saved)
            unit = True
        else:
            # The forward formed d(loss) for a unit upstream gradient; the actual one is applied in the final cast
            # (one pass over each gradient, no second full-size copy, no host read on a GPU).
            unit = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling() and float(grad_loss) == 1.0
        out: list[Tensor | None] = []
        for grad, needed, dtype in zip(grads, (needs.hidden, needs.weight, needs.bias), ctx.dtypes, strict=True):
            if not needed or grad is None:
                out.append(None)
            elif unit:
                out.append(grad.to(dtype))
            elif dtype == grad.dtype:
                out.append(grad.mul_(grad_loss.to(grad.dtype)))
            else:
                out.append(torch.mul(grad, grad_loss.to(grad.dtype), out=torch.empty_like(grad, dtype=dtype)))
        return (*out, None, None, None, None, None)  # targets, tokens, config, head, backend
