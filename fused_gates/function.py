"""The ``autograd.Function`` over the backends: loss from hidden states and the lm_head, gradients for both."""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_backend
from .objective import ObjectiveConfig, TokenData
from .torch_backend import GradientNeeds, HeadSpec


def _backend_module(backend: str):
    if backend == "torch":
        return torch_backend
    if backend == "triton":
        from .kernels import launcher

        return launcher
    raise ValueError(f"unknown backend {backend!r}")


class GatedPolicyLossFunction(torch.autograd.Function):
    """``loss(hidden, weight, bias)`` plus detached per-token outputs.

    Inputs are the valid tokens only (``hidden`` [N, H], ``targets`` [N]); ``tokens`` carries their advantages,
    masks, log-probs and aggregation weights. Returns ``(loss, logprobs, entropy, ratio, gate_value, gate_grad,
    kl)`` with ``kl`` empty when ``beta == 0``. No gradient flows to the advantages or the given log-probs
    (TRL treats them as constants too).
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
        inv_temperature: float,
        memory_budget_mb: float,
        backend: str,
    ):
        needs = GradientNeeds(*ctx.needs_input_grad[:3])
        head = HeadSpec(weight, bias, inv_temperature, memory_budget_mb)
        impl = _backend_module(backend)
        result = impl.loss_forward(hidden, targets, tokens, head, config, needs)

        terms = result.terms
        acc = head.accumulate_dtype
        loss = torch.stack([t.loss for t in terms]).sum() if terms else hidden.new_zeros((), dtype=acc)

        def cat(name: str) -> Tensor:
            parts = [getattr(t, name) for t in terms]
            if not parts or parts[0] is None:
                return hidden.new_empty(0, dtype=acc)
            return torch.cat(parts)

        ratio, gate_value, gate_grad, kl = cat("ratio"), cat("gate_value"), cat("gate_grad"), cat("kl")

        ctx.impl = impl
        ctx.head = head
        ctx.needs = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if result.gradients is not None:
            ctx.precomputed = True
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in result.gradients))
        else:
            ctx.precomputed = False
            ctx.has_entropy_grad = config.has_entropy_bonus
            ctx.save_for_backward(
                hidden,
                targets,
                result.log_sum_exp,
                result.entropy,
                result.grad_logprobs,
                result.grad_entropy,
            )
        outputs = (result.logprobs, result.entropy, ratio, gate_value, gate_grad, kl)
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *unused: Tensor):
        needs: GradientNeeds = ctx.needs
        if ctx.precomputed:
            grads = list(ctx.saved_tensors)
        else:
            hidden, targets, lse, entropy, grad_logprobs, grad_entropy = ctx.saved_tensors
            grads = list(
                ctx.impl.recompute_gradients(
                    hidden,
                    targets,
                    ctx.head,
                    needs,
                    lse,
                    entropy,
                    grad_logprobs,
                    grad_entropy if ctx.has_entropy_grad else None,
                )
            )
        # The forward formed d(loss) for a unit upstream gradient; scale by the actual one (a 0-dim tensor).
        scale_is_one = (
            grad_loss.device.type == "cpu" and not torch.compiler.is_compiling() and float(grad_loss) == 1.0
        )
        out: list[Tensor | None] = []
        for grad, needed, dtype in zip(grads, (needs.hidden, needs.weight, needs.bias), ctx.dtypes, strict=True):
            if not needed or grad is None:
                out.append(None)
                continue
            if not scale_is_one:
                grad = grad * grad_loss.to(grad.dtype)  # not in place: a retained graph may run backward again
            out.append(grad.to(dtype))
        return (*out, None, None, None, None, None, None)
