"""The per-token part of the objective: O(N) work between the passes over the vocabulary.

Given each valid token's log-prob ``logp_t`` and entropy ``H_t`` (the only quantities that need the vocabulary),
this module forms the importance ratio, the gate, the KL term, the loss and the two gradient coefficients the
vocabulary pass needs:

    loss = sum_t w_t l_t + sum_t e_t H_t,      l_t = -f(r_t) A_t + beta * kl_t [* r_t with bias correction]
    g_t  = d loss / d logp_t,                  e_t = d loss / d H_t

``w_t`` (the aggregation weight of the loss type) and ``e_t`` (the entropy bonus) are fixed before the pass
(:func:`aggregation_weights`). With ``dr/dlogp = r`` (token level) the chain rule gives

    g_t = w_t (-A_t f'(r_t) r_t + beta dkl_t [r_t] + beta kl_t r_t [bias correction])

and at sequence level, where ``log r_i = sum_s m_s (logp_s - old_s) / n_i`` is shared by the tokens of row i,

    g_t = (m_t / n_i) r_i sum_{s in i} w_s (-A_s f'(r_i) [+ beta kl_s]) + w_t beta dkl_t [r_i]

with ``kl = exp(ref - logp) - (ref - logp) - 1`` (k3) and ``dkl = d kl / d logp = 1 - exp(ref - logp)``.
Both backends call :func:`evaluate_objective` on the tokens of a chunk (whole rows at sequence level); the Triton
row kernel carries the token-level formulas in its epilogue (``fused_gates.kernels.row_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .gates import MAX_LOG_RATIO, Gate, GateParameters

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the per-token objective computes (everything but the tokens themselves)."""

    gate: Gate
    params: GateParameters
    sequence_level: bool
    beta: float
    use_bias_correction_kl: bool
    has_entropy_bonus: bool

    @property
    def needs_whole_rows(self) -> bool:
        """Whether a token's gradient coefficient depends on other tokens of its row (then a chunk must hold whole
        rows, or the backward recomputes)."""
        return self.sequence_level


@dataclass
class TokenData:
    """Per valid token (masked-out tokens are dropped before any work), 1-D; float32 (float64 for float64 inputs)
    unless noted."""

    advantages: Tensor
    mask: Tensor  # m_t (TRL multiplies by the mask, so fractional masks weight tokens)
    loss_weight: Tensor  # w_t
    entropy_weight: Tensor  # e_t
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    row: Tensor  # int64: the sequence (row of the batch) of each token
    row_share: Tensor  # m_t / n_i: d log r_i / d logp_t at sequence level
    num_rows: int

    @property
    def count(self) -> int:
        return self.advantages.shape[0]

    def select(self, rows: slice) -> TokenData:
        """The tokens ``rows`` (a contiguous range of the compacted tokens)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[rows] if isinstance(v, Tensor) else v
        return TokenData(**values)


@dataclass
class TokenTerms:
    """What the objective gives per token (detached), and the loss summed over those tokens."""

    loss: Tensor  # scalar
    grad_logprobs: Tensor  # g_t
    grad_entropy: Tensor  # e_t
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    kl: Tensor | None  # the KL term of the loss (times r with bias correction)

    @staticmethod
    def concatenate(parts: list[TokenTerms], like: Tensor) -> TokenTerms:
        """The terms of consecutive chunks as one (``like``: an empty-safe template for dtype and device)."""
        if not parts:
            empty = like.new_empty(0)
            return TokenTerms(like.new_zeros(()), empty, empty, empty, empty, empty, None)
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return TokenTerms(
            loss=torch.stack([p.loss for p in parts]).sum(),
            grad_logprobs=cat("grad_logprobs"),
            grad_entropy=cat("grad_entropy"),
            ratio=cat("ratio"),
            gate_value=cat("gate_value"),
            gate_grad=cat("gate_grad"),
            kl=cat("kl"),
        )


def aggregation_weights(
    mask: Tensor, loss_type: str, max_completion_length: int | None, num_items_in_batch: Tensor | float | None
) -> Tensor:
    """``w[b, t] = d loss / d l[b, t]`` for each loss type (TRL 1.16 ``_compute_loss``, before accumulation);
    ``mask`` is floating point (float32, or float64 for float64 inputs)."""
    batch = mask.shape[0]
    if loss_type == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * batch)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        assert max_completion_length is not None
        return mask / (batch * max_completion_length)
    if loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device)
        return mask / items.to(mask.dtype).clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def entropy_weights(mask: Tensor, entropy_coef: float) -> Tensor:
    """``e[b, t]`` of the bonus ``-entropy_coef * sum m H / max(sum m, 1)`` (TRL's mean over the batch)."""
    return mask * (-entropy_coef / mask.sum().clamp(min=1.0))


def evaluate_objective(logprobs: Tensor, entropy: Tensor, tokens: TokenData, config: ObjectiveConfig) -> TokenTerms:
    """Loss contribution, gradient coefficients and per-token diagnostics of a set of tokens (whole rows at
    sequence level). ``logprobs`` and ``entropy`` carry no autograd history."""
    advantages = tokens.advantages
    log_ratio = logprobs - tokens.old_logprobs if tokens.old_logprobs is not None else torch.zeros_like(logprobs)
    if config.sequence_level:
        per_row = logprobs.new_zeros(tokens.num_rows).index_add_(0, tokens.row, log_ratio * tokens.row_share)
        log_ratio = per_row[tokens.row]
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    gate_value, gate_grad = config.gate.evaluate(ratio, advantages, config.params)

    per_token_loss = -gate_value * advantages
    loss_grad_ratio = -advantages * gate_grad  # d l_t / d r
    local_grad = torch.zeros_like(logprobs)  # d l_t / d logp_t, besides through r
    kl = None
    if config.beta != 0.0:
        assert tokens.ref_logprobs is not None
        delta = (tokens.ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        exp_delta = torch.exp(delta)
        kl = exp_delta - delta - 1
        kl_grad = 1 - exp_delta
        if config.use_bias_correction_kl:
            loss_grad_ratio = loss_grad_ratio + config.beta * kl
            local_grad = config.beta * kl_grad * ratio
            kl = kl * ratio  # the term in the loss, as TRL logs it
        else:
            local_grad = config.beta * kl_grad
        per_token_loss = per_token_loss + config.beta * kl

    weight = tokens.loss_weight
    loss = (weight * per_token_loss).sum()
    if config.has_entropy_bonus:
        loss = loss + (tokens.entropy_weight * entropy).sum()
    if config.sequence_level:
        row_grad = logprobs.new_zeros(tokens.num_rows).index_add_(0, tokens.row, weight * loss_grad_ratio)
        grad_logprobs = row_grad[tokens.row] * ratio * tokens.row_share + weight * local_grad
    else:
        grad_logprobs = weight * (loss_grad_ratio * ratio + local_grad)
    return TokenTerms(loss, grad_logprobs, tokens.entropy_weight, ratio, gate_value, gate_grad, kl)
