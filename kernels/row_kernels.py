"""Row kernels of the training path: one program per token row of a chunk's float32 ``h W^T`` product.

* :func:`fused_token_rows_kernel` -- statistics (pass 1), the objective's epilogue in registers, then the logits
  gradient ``dz`` over the row (pass 2): token-level importance sampling, every gate;
* :func:`rows_statistics_kernel` -- pass 1 only (``logp``, ``H``, ``lse``), for objectives that need whole rows
  (sequence-level ratios) before any gradient coefficient is known;
* :func:`rows_grad_kernel` -- pass 2 only, from saved ``lse``, ``H`` and the coefficients ``g``, ``e``.

Per row, ``z = (acc + b) / T`` (or soft-capped, :mod:`fused_gates.kernels.logits`); pass 1 folds vocabulary blocks
into ``(m, S, Z)`` with :mod:`fused_gates.kernels.online_softmax`; pass 2 writes ``dz = g (onehot(y) - p) - e p (z -
mean_p z)`` (reading each block before writing it, so ``dz`` may overwrite the product in place, or go to the low-
precision operand of the backward products). The epilogue is :func:`token_objective`, the token-level formulas of
``fused_gates.objective.evaluate_objective``:

    r = exp(clamp(logp - old, +-80))       f(r), f'(r) from the gate (tau = tau_pos if A > 0 else tau_neg)
    P = -f(r) A  (cispo: -min(r, eps_high) A logp, weight detached)
                 (dppo, dppo_kl, aspo, a registered input gate's Triton pair: P, dP/dr, dP/dlogp from
                 :func:`fused_gates.kernels.input_gates.input_gate_terms`, reading logp, old, A and H too)
    l = q P + beta kl [* r]                kl = exp(d) - d - 1, d = clamp(ref - logp, +-80), q the policy weight
    loss_t = w l + e H,                    g = w (dl/dr r + dl/dlogp)

Optional inputs are ``None`` pointers; the flags that select the code (``HAS_BIAS``, ``HAS_OLD``, ``HAS_KL``,
``HAS_ENTROPY``, ``HAS_POLICY_WEIGHT``, ``HAS_SOFTCAP``) are derived from them by ``triton.heuristics``. Runtime floats
(temperatures, epsilons, delta, beta, the soft-cap, DPPO's bounds and truncation, ASPO's dual clip) are runtime
arguments: a new value never recompiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..admissibility import MAX_LOG_RATIO
from .gates import CISPO, gate_value_and_derivative
from .input_gates import ASPO, CUSTOM_INPUT, DPPO, DPPO_KL, input_gate_terms
from .logits import softcap_slope, to_logits
from .online_softmax import block_statistics, finish_statistics, merge_statistics

_MAX_LOG_RATIO = tl.constexpr(MAX_LOG_RATIO)


def _given(name: str):
    return lambda args: args[name] is not None


@triton.jit
def _load_logits(
    p_row, p_bias, o_v, m_v, inv_temperature, softcap, pad, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    """``z`` of one vocabulary block from the product ``acc`` (and the bias); ``pad`` in padded columns."""
    b_x = tl.load(p_row + o_v, mask=m_v, other=0.0)
    if HAS_BIAS:
        b_x += tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32)
    return tl.where(m_v, to_logits(b_x, inv_temperature, softcap, HAS_SOFTCAP), pad)


@triton.jit
def _row_statistics(
    p_row,
    p_bias,
    target,
    V,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 1 over a row: ``(lse, entropy, mean_p z, z_y)``."""
    target_x = tl.load(p_row + target)
    if HAS_BIAS:
        target_x += tl.load(p_bias + target).to(tl.float32)
    target_logit = to_logits(target_x, inv_temperature, softcap, HAS_SOFTCAP)
    row_max = float("-inf")
    sum_exp = 0.0
    sum_exp_shifted = 0.0
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = _load_logits(p_row, p_bias, o_v, m_v, inv_temperature, softcap, float("-inf"), HAS_BIAS, HAS_SOFTCAP)
        block_max, block_sum_exp, block_sum_exp_shifted = block_statistics(b_z, 0)  # every block has a column
        row_max, sum_exp, sum_exp_shifted = merge_statistics(
            row_max, sum_exp, sum_exp_shifted, block_max, block_sum_exp, block_sum_exp_shifted
        )
    log_sum_exp, entropy, mean_logit = finish_statistics(row_max, sum_exp, sum_exp_shifted)
    return log_sum_exp, entropy, mean_logit, target_logit


@triton.jit
def _row_write_grad(
    p_row,
    p_dz_row,
    p_bias,
    target,
    V,
    inv_temperature,
    softcap,
    log_sum_exp,
    mean_logit,
    grad_logprob,
    grad_entropy,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 2: ``dz = g (onehot - p) - e p (z - mean_p z)``, times the soft-cap's slope (reads each block before
    writing it)."""
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        # padded columns: 0, never stored
        b_z = _load_logits(p_row, p_bias, o_v, m_v, inv_temperature, softcap, 0.0, HAS_BIAS, HAS_SOFTCAP)
        b_p = tl.exp(b_z - log_sum_exp)
        b_dz = b_p * (-grad_logprob - grad_entropy * (b_z - mean_logit)) if HAS_ENTROPY else -grad_logprob * b_p
        b_dz += tl.where(o_v == target, grad_logprob, 0.0)
        if HAS_SOFTCAP:
            b_dz *= softcap_slope(b_z, inv_temperature, softcap)
        tl.store(p_dz_row + o_v, b_dz.to(p_dz_row.dtype.element_ty), mask=m_v)


@triton.jit
def token_objective(
    logprob,
    entropy,
    advantage,
    old_logprob,
    ref_logprob,
    loss_weight,
    entropy_weight,
    policy_weight,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    delta,
    beta,
    input_delta_low,
    input_delta_high,
    input_dual_clip,
    input_ratio_cap,
    trust_entropy,
    estr_threshold,
    estr_epsilon,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_ESTR: tl.constexpr,
):
    """The token-level objective of one token: ``(w l + e H, g, r, f(r), f'(r), kl)`` (for a gate that reads more
    than r, ``gate_value`` and ``gate_grad`` for the last two: :mod:`fused_gates.kernels.input_gates`)."""
    if HAS_OLD:
        log_ratio = tl.minimum(tl.maximum(logprob - old_logprob, -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
    else:
        log_ratio = logprob * 0.0  # on-policy: r = 1 with gradient dr/dlogp = r
    ratio = tl.exp(log_ratio)
    if (GATE == DPPO) | (GATE == DPPO_KL) | (GATE == ASPO) | (GATE == CUSTOM_INPUT):  # gates that read more than r
        policy, by_ratio, by_logprob, value, derivative = input_gate_terms(
            ratio,
            advantage,
            logprob,
            old_logprob if HAS_OLD else logprob,
            entropy,
            tau_pos,
            tau_neg,
            epsilon_low,
            epsilon_high,
            input_delta_low,
            input_delta_high,
            input_dual_clip,
            input_ratio_cap,
            GATE,
            CUSTOM_VALUE,
            CUSTOM_DERIVATIVE,
        )
        token_loss = policy * policy_weight
        grad_ratio = by_ratio * policy_weight
        grad_local = by_logprob * policy_weight
    else:
        value, derivative = gate_value_and_derivative(
            ratio, advantage, tau_pos, tau_neg, epsilon_low, epsilon_high, delta, GATE, CUSTOM_VALUE,
            CUSTOM_DERIVATIVE
        )
        if GATE == CISPO:  # the weight min(r, eps_high) of -A logp is detached: no gradient through r
            token_loss = -value * advantage * logprob * policy_weight
            grad_ratio = logprob * 0.0
            grad_local = -value * advantage * policy_weight
        else:
            token_loss = -value * advantage * policy_weight
            grad_ratio = -advantage * derivative * policy_weight
            grad_local = logprob * 0.0
    if HAS_ESTR:  # the entropy-scaled trust region (fused_gates.entropy_trust): (logp - old)^2 <= tau (H + eps)
        token_log_ratio = logprob - old_logprob if HAS_OLD else logprob * 0.0
        keep = (token_log_ratio * token_log_ratio <= estr_threshold * (trust_entropy + estr_epsilon)).to(tl.float32)
        token_loss *= keep
        grad_ratio *= keep
        grad_local *= keep
        value *= keep
        derivative = tl.where(advantage == 0, derivative, derivative * keep)
    kl = logprob * 0.0
    if HAS_KL:
        delta = tl.minimum(tl.maximum(ref_logprob - logprob, -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
        exp_delta = tl.exp(delta)
        kl = exp_delta - delta - 1.0
        if BIAS_CORRECTION:
            grad_ratio += beta * kl
            grad_local += beta * (1.0 - exp_delta) * ratio
            kl = kl * ratio
        else:
            grad_local += beta * (1.0 - exp_delta)
        token_loss += beta * kl
    weighted_loss = loss_weight * token_loss
    if HAS_ENTROPY:
        weighted_loss += entropy_weight * entropy
    grad_logprob = loss_weight * (grad_ratio * ratio + grad_local)
    return weighted_loss, grad_logprob, ratio, value, derivative, kl


@triton.heuristics(
    {
        "HAS_BIAS": _given("p_bias"),
        "HAS_OLD": _given("p_old_logprobs"),
        "HAS_KL": _given("p_ref_logprobs"),
        "HAS_ENTROPY": _given("p_entropy_weight"),
        "HAS_POLICY_WEIGHT": _given("p_policy_weight"),
        "HAS_OLD_ENTROPY": _given("p_old_entropy"),
        "HAS_SOFTCAP": _given("softcap"),
    }
)
@triton.jit
def fused_token_rows_kernel(
    p_logits,
    p_dz,
    p_bias,
    p_targets,
    p_advantages,
    p_old_logprobs,
    p_ref_logprobs,
    p_loss_weight,
    p_entropy_weight,
    p_policy_weight,
    p_old_entropy,
    p_logprobs,
    p_entropy,
    p_log_sum_exp,
    p_ratio,
    p_gate_value,
    p_gate_grad,
    p_kl,
    p_grad_logprobs,
    p_token_loss,
    V,
    stride_logits,
    stride_dz,
    inv_temperature,
    softcap,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    delta,
    beta,
    input_delta_low,
    input_delta_high,
    input_dual_clip,
    input_ratio_cap,
    estr_threshold,
    estr_epsilon,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_ESTR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_POLICY_WEIGHT: tl.constexpr,
    HAS_OLD_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token row: statistics, the objective's epilogue, then dz over the row."""
    i = tl.program_id(0)
    p_row = p_logits + i.to(tl.int64) * stride_logits
    target = tl.load(p_targets + i)
    log_sum_exp, entropy, mean_logit, target_logit = _row_statistics(
        p_row, p_bias, target, V, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_V
    )
    logprob = target_logit - log_sum_exp

    old_logprob = tl.load(p_old_logprobs + i) if HAS_OLD else 0.0
    ref_logprob = tl.load(p_ref_logprobs + i) if HAS_KL else 0.0
    entropy_weight = tl.load(p_entropy_weight + i) if HAS_ENTROPY else 0.0
    policy_weight = tl.load(p_policy_weight + i) if HAS_POLICY_WEIGHT else 1.0
    trust_entropy = tl.load(p_old_entropy + i) if HAS_OLD_ENTROPY else entropy  # ESTR's H: the behaviour's, or ours
    token_loss, grad_logprob, ratio, value, derivative, kl = token_objective(
        logprob,
        entropy,
        tl.load(p_advantages + i),
        old_logprob,
        ref_logprob,
        tl.load(p_loss_weight + i),
        entropy_weight,
        policy_weight,
        tau_pos,
        tau_neg,
        epsilon_low,
        epsilon_high,
        delta,
        beta,
        input_delta_low,
        input_delta_high,
        input_dual_clip,
        input_ratio_cap,
        trust_entropy,
        estr_threshold,
        estr_epsilon,
        GATE,
        CUSTOM_VALUE,
        CUSTOM_DERIVATIVE,
        HAS_OLD,
        HAS_KL,
        BIAS_CORRECTION,
        HAS_ENTROPY,
        HAS_ESTR,
    )
    tl.store(p_logprobs + i, logprob)
    tl.store(p_entropy + i, entropy)
    tl.store(p_log_sum_exp + i, log_sum_exp)
    tl.store(p_ratio + i, ratio)
    tl.store(p_gate_value + i, value)
    tl.store(p_gate_grad + i, derivative)
    if HAS_KL:
        tl.store(p_kl + i, kl)
    tl.store(p_grad_logprobs + i, grad_logprob)
    tl.store(p_token_loss + i, token_loss)

    _row_write_grad(
        p_row,
        p_dz + i.to(tl.int64) * stride_dz,
        p_bias,
        target,
        V,
        inv_temperature,
        softcap,
        log_sum_exp,
        mean_logit,
        grad_logprob,
        entropy_weight,
        HAS_BIAS,
        HAS_ENTROPY,
        HAS_SOFTCAP,
        BLOCK_V,
    )


@triton.heuristics({"HAS_BIAS": _given("p_bias"), "HAS_SOFTCAP": _given("softcap")})
@triton.jit
def rows_statistics_kernel(
    p_logits,
    p_bias,
    p_targets,
    p_logprobs,
    p_entropy,
    p_log_sum_exp,
    V,
    stride_logits,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0)
    target = tl.load(p_targets + i)
    log_sum_exp, entropy, _, target_logit = _row_statistics(
        p_logits + i.to(tl.int64) * stride_logits,
        p_bias,
        target,
        V,
        inv_temperature,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        BLOCK_V,
    )
    tl.store(p_logprobs + i, target_logit - log_sum_exp)
    tl.store(p_entropy + i, entropy)
    tl.store(p_log_sum_exp + i, log_sum_exp)


@triton.heuristics(
    {"HAS_BIAS": _given("p_bias"), "HAS_ENTROPY": _given("p_grad_entropy"), "HAS_SOFTCAP": _given("softcap")}
)
@triton.jit
def rows_grad_kernel(
    p_logits,
    p_dz,
    p_bias,
    p_targets,
    p_log_sum_exp,
    p_entropy,
    p_grad_logprobs,
    p_grad_entropy,
    V,
    stride_logits,
    stride_dz,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz of one row from saved statistics: ``mean_p z = lse - H``."""
    i = tl.program_id(0)
    log_sum_exp = tl.load(p_log_sum_exp + i)
    grad_entropy = tl.load(p_grad_entropy + i) if HAS_ENTROPY else 0.0
    mean_logit = log_sum_exp - tl.load(p_entropy + i) if HAS_ENTROPY else 0.0
    _row_write_grad(
        p_logits + i.to(tl.int64) * stride_logits,
        p_dz + i.to(tl.int64) * stride_dz,
        p_bias,
        tl.load(p_targets + i),
        V,
        inv_temperature,
        softcap,
        log_sum_exp,
        mean_logit,
        tl.load(p_grad_logprobs + i),
        grad_entropy,
        HAS_BIAS,
        HAS_ENTROPY,
        HAS_SOFTCAP,
        BLOCK_V,
    )
