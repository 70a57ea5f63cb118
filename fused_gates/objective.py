"""The per-token part of the objective: O(N) work between the passes over the vocabulary.

Given each valid token's log-prob ``logp_t`` and entropy ``H_t`` (the only quantities that need the vocabulary),
this module forms the importance ratio, the policy term, the KL term, the loss and the two gradient coefficients the
vocabulary pass needs:

    loss = sum_t w_t l_t + sum_t e_t H_t,      g_t = d loss / d logp_t,      e_t = d loss / d H_t
    l_t  = q_t P_t + beta kl_t [r_t with bias correction]

``w_t`` (the aggregation weight of the loss type), ``e_t`` (the entropy bonus) and ``q_t`` (the policy weight: the
sampler's importance ratio times the entropy mask, TRL's order) are fixed before the pass (:func:`aggregation_weights`,
``fused_gates.tokens``). The policy term ``P_t`` is one of

* a gate (clip, sigmoid, erf, arctan, softsign, custom): ``P = -f(r) A``, with ``dP/dr = -f'(r) A``;
* ``cispo``: ``P = -min(r, eps_high) A logp`` with the weight detached, ``dP/dlogp = -min(r, eps_high) A``;
* ``vespo``: ``P = -phi A logp`` with TRL's detached gamma weight of the row's summed log-ratio
  ``log w = clamp(sum_t m_t clamp(logp - old, +-20) + sum_t clamp(log q^vllm_t, log 1e-8, 20), log 1e-8, 20)``,
  ``phi = exp(lam + k log w - lam w)`` (k, lam by the sign of A, A >= 0 taking the positive pair).

The ratio is ``r_t = exp(logp_t - old_t)`` (token level) or ``r_i = exp(sum_s m_s (logp_s - old_s) / n_i)`` shared
by row i (sequence level), so with ``dr_t/dlogp_t = r_t`` and ``dr_i/dlogp_t = r_i m_t / n_i`` the chain rule gives

    token level:     g_t = w_t (q_t dP/dr r_t + [beta kl_t r_t]) + w_t (q_t dP/dlogp + beta dkl_t [r_t])
    sequence level:  g_t = (m_t / n_i) r_i sum_{s in i} w_s (q_s dP_s/dr + [beta kl_s]) + w_t (...local, as above)

with ``kl = exp(ref - logp) - (ref - logp) - 1`` (k3), ``dkl = 1 - exp(ref - logp)``. TRL's off-policy sequence mask
multiplies ``q`` by ``1[A >= 0 or mean_t m_t (sampling_t - logp_t) <= threshold]`` of each row, from the current
log-probs (detached); the entropy-scaled trust region (``fused_gates.entropy_trust``) multiplies the gate's terms by
its keep mask. Whatever needs a whole row (sequence-level ratios, vespo, the off-policy mask) makes the
backends give the objective whole rows. Both backends call :func:`evaluate_objective`; the Triton row kernel
carries the token-level formulas in its epilogue (``fused_gates.kernels.row_kernels``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .admissibility import MAX_LOG_RATIO
from .entropy_trust import ESTR_EPSILON, apply_estr, estr_keep
from .gate_inputs import InputGateParameters, evaluate_input_gate
from .gates import Gate, GateParameters

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_LOWER_LOG_WEIGHT = math.log(1e-8)
"""TRL's clamps of the vespo weight: token log-ratios to +-20, the sequence's log-weight to [log 1e-8, 20]."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the per-token objective computes (everything but the tokens themselves)."""

    gate: Gate
    params: GateParameters
    sequence_level: bool
    beta: float
    use_bias_correction_kl: bool
    has_entropy_bonus: bool
    off_policy_mask_threshold: float | None = None
    input_params: InputGateParameters | None = None  # the parameters of a gate that reads more than r
    estr_threshold: float | None = None  # the entropy-scaled trust region's tau (fused_gates.entropy_trust)
    estr_epsilon: float = ESTR_EPSILON

    @property
    def needs_whole_rows(self) -> bool:
        """Whether a token's gradient coefficient depends on other tokens of its row (then a chunk must hold whole
        rows, or the backward recomputes)."""
        return (self.sequence_level or self.gate.is_vespo or self.off_policy_mask_threshold is not None
                or self.gate.whole_rows)

    @property
    def in_kernel_epilogue(self) -> bool:
        """Whether a backend's token-level kernel can evaluate this objective in its epilogue (a gate with a kernel
        form, no divergence that needs inputs the kernel does not read: DPPO's Top-K)."""
        topk = self.input_params is not None and self.input_params.dppo_topk
        return self.gate.kernel_id is not None and not topk

    @property
    def needs_whole_batch(self) -> bool:
        """Whether a token's coefficient depends on a statistic of the whole batch (then one chunk must hold the
        batch, or the backward recomputes)."""
        return self.gate.batch_statistic


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
    policy_weight: Tensor | None = None  # q_t before the off-policy mask; None: 1
    sampling_logprobs: Tensor | None = None  # the off-policy mask's sampling log-probs; None: logp itself
    vespo_log_offset: Tensor | None = None  # the row's sum_t clamp(log q^vllm_t), on each of its tokens
    row_token_counts: list[int] | None = None  # tokens of each row, on the host (read with the value checks)
    row_reduce: Callable[[Tensor], Tensor] | None = None  # per-row partial sums -> whole rows' (sequence-sharded)
    old_entropy: Tensor | None = None  # the behaviour policy's entropy (ESTR's H_t); None: the current policy's
    old_topk_logprobs: Tensor | None = None  # [N, K] the behaviour policy's top-K log-probs (DPPO's Top-K)
    current_topk_logprobs: Tensor | None = None  # [N, K] the current policy's at the same ids (a pass before the loss)

    @property
    def count(self) -> int:
        return self.advantages.shape[0]

    def row_counts(self) -> list[int]:
        """Tokens of each row, in order (read with the value checks; counted here, a host synchronisation, for token
        data made otherwise)."""
        if self.row_token_counts is not None:
            return self.row_token_counts
        return torch.bincount(self.row, minlength=self.num_rows).tolist()

    def select(self, rows: slice) -> TokenData:
        """The tokens ``rows`` (a contiguous range of the compacted tokens)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[rows] if isinstance(v, Tensor) else v
        values["row_token_counts"] = None  # rows are not cut by a token range
        return TokenData(**values)


@dataclass
class TokenTerms:
    """What the objective gives per token (detached), and the loss summed over those tokens."""

    loss: Tensor  # scalar
    grad_logprobs: Tensor  # g_t
    grad_entropy: Tensor  # e_t
    ratio: Tensor
    gate_value: Tensor  # f(r); for cispo / vespo the detached weight
    gate_grad: Tensor  # f'(r); for cispo / vespo the weight over r (the update relative to plain IS)
    kl: Tensor | None  # the KL term of the loss (times r with bias correction)
    policy_weight: Tensor | None = None  # q_t including the off-policy mask; None: 1

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
            policy_weight=cat("policy_weight"),
        )


@dataclass(frozen=True)
class RowTotals:
    """The sums over whole rows when this call's ``[B, T]`` rows are not the loss's rows (they continue on the other
    ranks of a sequence group, or hold several packed sequences): what :func:`aggregation_weights` and
    :func:`entropy_weights` divide by."""

    rows: int  # the loss's rows (sequences)
    row_tokens: Tensor  # [B, 1] or [B, T]: sum of the mask over the whole row of each position
    total: Tensor  # 0-dim: sum of the mask over every row


def aggregation_weights(
    mask: Tensor, loss_type: str, max_completion_length: int | None, num_items_in_batch: Tensor | float | None,
    totals: RowTotals | None = None,
) -> Tensor:
    """``w[b, t] = d loss / d l[b, t]`` for each loss type (TRL 1.16 ``_compute_loss``, before accumulation);
    ``mask`` is floating point (float32, or float64 for float64 inputs); ``totals``: the whole rows' sums when the
    rows continue elsewhere."""
    batch = mask.shape[0] if totals is None else totals.rows
    if loss_type == "grpo":
        row_tokens = mask.sum(-1, keepdim=True) if totals is None else totals.row_tokens
        return mask / (row_tokens.clamp(min=1.0) * batch)
    if loss_type == "bnpo":
        return mask / (mask.sum() if totals is None else totals.total).clamp(min=1.0)
    if loss_type == "dr_grpo":
        assert max_completion_length is not None
        return mask / (batch * max_completion_length)
    if loss_type == "dapo":
        total = mask.sum() if totals is None else totals.total
        items = total if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device)
        return mask / items.to(mask.dtype).clamp(min=1.0)
    if loss_type == "luspo":
        return mask / batch
    raise ValueError(f"unknown loss_type {loss_type!r}")


def entropy_weights(mask: Tensor, entropy_coef: float, total: Tensor | None = None) -> Tensor:
    """``e[b, t]`` of the bonus ``-entropy_coef * sum m H / max(sum m, 1)`` (TRL's mean over the batch; ``mask``
    already includes an entropy mask where one is given; ``total``: ``sum m`` over every rank when the rows continue
    elsewhere)."""
    return mask * (-entropy_coef / (mask.sum() if total is None else total).clamp(min=1.0))


def _row_sum(values: Tensor, tokens: TokenData) -> Tensor:
    sums = values.new_zeros(tokens.num_rows).index_add_(0, tokens.row, values)
    if tokens.row_reduce is not None:  # the rows continue on other ranks
        sums = tokens.row_reduce(sums)
    return sums[tokens.row]


def off_policy_keep(logprobs: Tensor, tokens: TokenData, threshold: float) -> Tensor:
    """TRL's off-policy sequence mask on each token: keep where ``A >= 0`` or the row's mean of
    ``m (sampling - logp)`` is at most ``threshold`` (NaN sampling log-probs count as no evidence)."""
    sampling = logprobs if tokens.sampling_logprobs is None else tokens.sampling_logprobs
    divergence = torch.nan_to_num(sampling - logprobs, nan=0.0)
    row_tokens = _row_sum(tokens.mask, tokens).clamp(min=1.0)
    mean_divergence = _row_sum(divergence * tokens.mask, tokens) / row_tokens
    return ((tokens.advantages >= 0) | (mean_divergence <= threshold)).to(logprobs.dtype)


def vespo_weight(log_ratio: Tensor, tokens: TokenData, params: GateParameters) -> Tensor:
    """TRL's gamma weight ``phi`` of each token's row (its sign pair chosen by the token's advantage)."""
    clamped = log_ratio.clamp(-VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP)
    seq_log_ratio = _row_sum(clamped * tokens.mask, tokens)
    if tokens.vespo_log_offset is not None:
        seq_log_ratio = seq_log_ratio + tokens.vespo_log_offset
    log_w = seq_log_ratio.clamp(VESPO_LOWER_LOG_WEIGHT, VESPO_LOG_RATIO_CLAMP)
    nonnegative = tokens.advantages >= 0
    k = torch.where(nonnegative, params.vespo_k_pos, params.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonnegative, params.vespo_lambda_pos, params.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def evaluate_objective(logprobs: Tensor, entropy: Tensor, tokens: TokenData, config: ObjectiveConfig) -> TokenTerms:
    """Loss contribution, gradient coefficients and per-token diagnostics of a set of tokens (whole rows when
    ``config.needs_whole_rows``). ``logprobs`` and ``entropy`` carry no autograd history."""
    advantages = tokens.advantages
    token_log_ratio = logprobs - tokens.old_logprobs if tokens.old_logprobs is not None else torch.zeros_like(logprobs)
    log_ratio = _row_sum(token_log_ratio * tokens.row_share, tokens) if config.sequence_level else token_log_ratio
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))

    # The policy term P: d P / d r (through the ratio) and d P / d logp (directly, detached weights).
    gate = config.gate
    row_chain = None
    if gate.reads_inputs:  # fused_gates.gate_inputs: P, dP/dr, dP/dlogp and, for a row's ratio, its chain
        read = evaluate_input_gate(gate, logprobs, entropy, tokens, config.params, config.input_params)
        ratio, gate_value, gate_grad, row_chain = read.ratio, read.gate_value, read.gate_grad, read.row_chain
        policy, policy_by_ratio, policy_by_logprob = read.policy, read.by_ratio, read.by_logprob
    elif gate.is_cispo or gate.is_vespo:
        if gate.is_cispo:
            weight = ratio.clamp(max=config.params.epsilon_high)
        else:
            weight = vespo_weight(token_log_ratio, tokens, config.params)
        gate_value, gate_grad = weight, weight / ratio
        policy = -weight * advantages * logprobs
        policy_by_ratio, policy_by_logprob = torch.zeros_like(logprobs), -weight * advantages
    else:
        gate_value, gate_grad = gate.evaluate(ratio, advantages, config.params)
        policy = -gate_value * advantages
        policy_by_ratio, policy_by_logprob = -advantages * gate_grad, torch.zeros_like(logprobs)

    if config.estr_threshold is not None:  # fused_gates.entropy_trust: the token dropped outside its scaled region
        behaviour_entropy = entropy if tokens.old_entropy is None else tokens.old_entropy
        keep = estr_keep(token_log_ratio, behaviour_entropy, config.estr_threshold, config.estr_epsilon)
        policy, policy_by_ratio, policy_by_logprob = policy * keep, policy_by_ratio * keep, policy_by_logprob * keep
        gate_value, gate_grad = apply_estr(keep, advantages, gate_value, gate_grad)

    policy_weight = tokens.policy_weight
    if config.off_policy_mask_threshold is not None:
        keep = off_policy_keep(logprobs, tokens, config.off_policy_mask_threshold)
        policy_weight = keep if policy_weight is None else policy_weight * keep
    if policy_weight is not None:
        policy, policy_by_ratio, policy_by_logprob = (
            policy * policy_weight, policy_by_ratio * policy_weight, policy_by_logprob * policy_weight
        )

    per_token_loss, loss_grad_ratio, local_grad = policy, policy_by_ratio, policy_by_logprob
    kl = None
    if config.beta != 0.0:
        assert tokens.ref_logprobs is not None
        delta = (tokens.ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        exp_delta = torch.exp(delta)
        kl = exp_delta - delta - 1
        kl_grad = 1 - exp_delta
        if config.use_bias_correction_kl:
            loss_grad_ratio = loss_grad_ratio + config.beta * kl
            local_grad = local_grad + config.beta * kl_grad * ratio
            kl = kl * ratio  # the term in the loss, as TRL logs it
        else:
            local_grad = local_grad + config.beta * kl_grad
        per_token_loss = per_token_loss + config.beta * kl

    weight = tokens.loss_weight
    loss = (weight * per_token_loss).sum()
    if config.has_entropy_bonus:
        loss = loss + (tokens.entropy_weight * entropy).sum()
    if row_chain is not None:
        grad_logprobs = _row_sum(weight * loss_grad_ratio, tokens) * row_chain + weight * local_grad
    elif config.sequence_level:
        grad_logprobs = _row_sum(weight * loss_grad_ratio, tokens) * ratio * tokens.row_share + weight * local_grad
    else:
        grad_logprobs = weight * (loss_grad_ratio * ratio + local_grad)
    return TokenTerms(loss, grad_logprobs, tokens.entropy_weight, ratio, gate_value, gate_grad, kl, policy_weight)
