"""The token-local gates that read more than the ratio, as Triton device functions for the token-level row kernel's
epilogue, and the check of a registered input gate's Triton pair against its torch pair.

Same maths as ``fused_gates.gate_inputs`` (its module docstring has the formulas and citations), in float32, per
token, from what the epilogue holds in registers: ``r``, ``A``, ``logp``, the behaviour policy's ``old_logp``
(``logp`` itself on-policy) and the entropy. :func:`input_gate_terms` gives the policy term ``P``, ``dP/dr``,
``dP/dlogp`` (a detached weight), ``gate_value`` and ``gate_grad`` (1 where ``A = 0``):

    dppo      valid = p - p_old <= delta_high (A > 0), >= -delta_low (A <= 0)    P = -sg(min(r, C) valid) A logp
    dppo_kl   valid = D <= delta_high or p <= p_old (A > 0),                      as dppo
                      D <= delta_low or p >= p_old (A <= 0);   D = KL(Bern(p_old) || Bern(p))
    aspo      rho = max(r, 1 - eps_low) (A < 0): P = -A rho;  rho = min(r, 1 + eps_high) (A >= 0): P = -A / rho
              (gradient -A grad logp / r where unclipped); where the weight exceeds c: P = -sg(c) A logp
    custom    f, f' = the registered pair of (r, tau, A, logp, old_logp, H);  P = -f A,  dP/dr = -f' A

m2po and bapo need a statistic of the whole batch and gmpo the whole row: they have no kernel form here (the chunk
driver takes the unfused path for them). DPPO's bounds, its truncation ``C``, ASPO's dual clip ``c`` and the
epsilons are runtime arguments; the gate id and a registered pair of ``@triton.jit`` functions are constexprs.

Binary-KL is formed without cancellation and never NaN: ``log(1 - p)`` from ``logp`` is ``log(-expm1(logp))`` above
``-ln 2`` and ``log1p(-exp(logp))`` below (the split that keeps both accurate), with ``expm1`` and ``log1p`` written
here (a Taylor polynomial and the ``atanh`` series where the plain forms cancel); the ``p_old = 1`` term is 0 and
``D = inf`` where ``p = 1 > p_old``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gates import BUILTIN_KERNEL_IDS, CUSTOM_INPUT_KERNEL_ID, INPUT_GATES, Gate, GateInputs

DPPO = tl.constexpr(BUILTIN_KERNEL_IDS["dppo"])
DPPO_KL = tl.constexpr(BUILTIN_KERNEL_IDS["dppo_kl"])
ASPO = tl.constexpr(BUILTIN_KERNEL_IDS["aspo"])
CUSTOM_INPUT = tl.constexpr(CUSTOM_INPUT_KERNEL_ID)
FUSED_INPUT_GATES = tuple(name for name in INPUT_GATES if name in BUILTIN_KERNEL_IDS)
"""The gates of ``fused_gates.gate_inputs`` with a kernel form (dppo, dppo_kl, aspo)."""

_LN_HALF = tl.constexpr(-0.6931471805599453)
_EXPM1_POLYNOMIAL_BELOW = tl.constexpr(0.35)  # |x|: degree 8 leaves 6e-10 relative; above, exp(x) - 1 loses < 4e-7
_LOG1P_SERIES_BELOW = tl.constexpr(0.25)  # |y|: atanh series to s^9 leaves 4e-10 relative; above, log(1 + y) is fine


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without cancellation near 0: the Taylor polynomial to x^8 for |x| < 0.35."""
    small = tl.abs(x) < _EXPM1_POLYNOMIAL_BELOW
    t = tl.where(small, x, 0.0)
    poly = t * (
        1.0
        + t
        * (
            0.5
            + t
            * (
                1.0 / 6.0
                + t * (1.0 / 24.0 + t * (1.0 / 120.0 + t * (1.0 / 720.0 + t * (1.0 / 5040.0 + t * (1.0 / 40320.0)))))
            )
        )
    )
    return tl.where(small, poly, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y):
    """``log(1 + y)`` for ``y >= -1`` without cancellation near 0: ``2 atanh(y / (2 + y))`` as its odd series for
    |y| < 0.25."""
    small = tl.abs(y) < _LOG1P_SERIES_BELOW
    t = tl.where(small, y, 0.0)
    s = t / (2.0 + t)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))))
    return tl.where(small, series, tl.log(tl.where(small, 1.0, 1.0 + y)))


@triton.jit
def log_one_minus_exp(x):
    """``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at 0): ``log(-expm1(x))`` above ``-ln 2``, ``log1p(-exp(x))``
    below."""
    near = x > _LN_HALF
    rest = -_expm1(tl.where(near, x, _LN_HALF))  # 1 - p in (0, 1/2] above -ln 2; 0 where p = 1
    above = tl.where(rest > 0, tl.log(tl.where(rest > 0, rest, 1.0)), float("-inf"))
    return tl.where(near, above, _log1p(-tl.exp(tl.where(near, _LN_HALF, x))))


@triton.jit
def binary_kl(old_logprob, logprob):
    """DPPO's Binary-KL ``KL(Bernoulli(p_old) || Bernoulli(p))`` from the two log-probabilities: finite unless
    ``p = 1 > p_old`` (then inf), never NaN."""
    old_logprob = tl.minimum(old_logprob, 0.0)
    logprob = tl.minimum(logprob, 0.0)
    old_rest = log_one_minus_exp(old_logprob)
    rest = log_one_minus_exp(logprob)
    p_old = tl.exp(old_logprob)
    token = p_old * (old_logprob - logprob)
    # log((1 - p_old) / (1 - p)): near 1 as log1p((p - p_old) / (1 - p)) (the difference of the two logarithms
    # would cancel), elsewhere as that difference; -inf - ... where p = 1 (then D = inf)
    spread = p_old * _expm1(logprob - old_logprob) / tl.exp(rest)
    close = tl.abs(spread) < _LOG1P_SERIES_BELOW
    rest_ratio = tl.where(close, _log1p(tl.where(close, spread, 0.0)), old_rest - rest)
    certain = old_rest == float("-inf")  # p_old = 1: the other outcome's term is 0 (0 log 0)
    return token + tl.where(certain, 0.0, tl.exp(old_rest) * tl.where(certain, 0.0, rest_ratio))


@triton.jit
def input_gate_terms(
    ratio,
    advantage,
    logprob,
    old_logprob,
    entropy,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    delta_low,
    delta_high,
    dual_clip,
    ratio_cap,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
):
    """``(P, dP/dr, dP/dlogp, gate_value, gate_grad)`` of one token (``old_logprob``: ``logprob`` on-policy)."""
    zero = logprob * 0.0
    if GATE == CUSTOM_INPUT:
        tau = tl.where(advantage > 0, tau_pos, tau_neg)
        value = CUSTOM_VALUE(ratio, tau, advantage, logprob, old_logprob, entropy)
        gate_grad = CUSTOM_DERIVATIVE(ratio, tau, advantage, logprob, old_logprob, entropy)
        policy = -value * advantage
        by_ratio = -gate_grad * advantage
        by_logprob = zero
    elif GATE == ASPO:
        negative = advantage < 0
        lower = 1.0 - epsilon_low
        upper = 1.0 + epsilon_high
        rho_positive = tl.minimum(ratio, upper)
        weight = tl.where(negative, tl.maximum(ratio, lower), 1.0 / rho_positive)  # the (flipped) importance weight
        dual_clipped = weight > dual_clip
        # d/dr of -A rho (A < 0) and of -A (rho / sg(rho)) / sg(rho) (A >= 0) where not dual clipped
        unclipped = tl.where(negative, ratio >= lower, ratio <= upper).to(tl.float32)
        slope = tl.where(negative, unclipped, unclipped / (rho_positive * rho_positive))
        slope = tl.where(dual_clipped, 0.0, slope)
        value = tl.where(dual_clipped, dual_clip, weight)
        policy = tl.where(dual_clipped, -dual_clip * advantage * logprob, -value * advantage)
        by_ratio = -slope * advantage
        by_logprob = tl.where(dual_clipped, -dual_clip * advantage, 0.0)
        gate_grad = tl.where(advantage == 0, 1.0, tl.where(dual_clipped, dual_clip / ratio, slope))
    else:
        if GATE == DPPO:
            shift = tl.exp(logprob) - tl.exp(old_logprob)
            valid = tl.where(advantage > 0, shift <= delta_high, shift >= -delta_low)
        else:
            tl.static_assert(GATE == DPPO_KL, "unknown input gate id")
            divergence = binary_kl(old_logprob, logprob)
            valid = tl.where(
                advantage > 0,
                (divergence <= delta_high) | (logprob <= old_logprob),
                (divergence <= delta_low) | (logprob >= old_logprob),
            )
        value = tl.minimum(ratio, ratio_cap) * valid.to(tl.float32)  # the detached weight of -A logp
        policy = -value * advantage * logprob
        by_ratio = zero
        by_logprob = -value * advantage
        gate_grad = tl.where(advantage == 0, 1.0, value / ratio)
    return policy, by_ratio, by_logprob, value, gate_grad


# -- a registered input gate's Triton pair, checked against its torch pair -----------------------------------------


@triton.jit
def _input_gate_grid_kernel(
    p_ratio,
    p_tau,
    p_advantage,
    p_logprob,
    p_old_logprob,
    p_entropy,
    p_value,
    p_derivative,
    n,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    b_r = tl.load(p_ratio + o_i, mask=m_i, other=1.0)
    b_tau = tl.load(p_tau + o_i, mask=m_i, other=1.0)
    b_a = tl.load(p_advantage + o_i, mask=m_i, other=0.0)
    b_lp = tl.load(p_logprob + o_i, mask=m_i, other=0.0)
    b_old = tl.load(p_old_logprob + o_i, mask=m_i, other=0.0)
    b_h = tl.load(p_entropy + o_i, mask=m_i, other=0.0)
    tl.store(p_value + o_i, CUSTOM_VALUE(b_r, b_tau, b_a, b_lp, b_old, b_h), mask=m_i)
    tl.store(p_derivative + o_i, CUSTOM_DERIVATIVE(b_r, b_tau, b_a, b_lp, b_old, b_h), mask=m_i)


_VALIDATED: set[tuple[str, int, int]] = set()
CHECK_RATIOS = (1e-3, 0.1, 0.5, 0.8, 0.95, 1.0, 1.05, 1.2, 1.5, 2.0, 3.0, 10.0, 1e3, 1e6)
CHECK_TAUS = (0.5, 1.0, 2.0, 10.0)
CHECK_ADVANTAGES = (-1.5, 0.0, 0.7)
CHECK_LOGPROBS = (-1e-4, -0.01, -0.7, -2.0, -12.0)
CHECK_ENTROPIES = (0.05, 1.0, 4.0, 11.0)


def check_grid(device: torch.device | str = "cpu") -> GateInputs:
    """The points a registered input gate's Triton pair is compared at (float32): every combination of
    :data:`CHECK_RATIOS`, :data:`CHECK_TAUS`, :data:`CHECK_ADVANTAGES`, :data:`CHECK_LOGPROBS` and
    :data:`CHECK_ENTROPIES` whose behaviour log-prob ``logp - log r`` is a log-probability (at most 0)."""
    grid = torch.cartesian_prod(*(torch.tensor(v, dtype=torch.float64) for v in (
        CHECK_RATIOS, CHECK_TAUS, CHECK_ADVANTAGES, CHECK_LOGPROBS, CHECK_ENTROPIES)))
    ratio, tau, advantage, logprob, entropy = grid.unbind(1)
    old_logprob = logprob - torch.log(ratio)
    keep = old_logprob <= 0
    columns = (ratio, tau, advantage, logprob, old_logprob, entropy)
    return GateInputs(*(c[keep].to(device, torch.float32).contiguous() for c in columns))


def validate_input_gate(gate: Gate) -> None:
    """Compare a registered input gate's Triton pair with its torch pair (float32) on :func:`check_grid`, once per
    pair; raises ValueError naming the function and the point where they disagree."""
    key = (gate.name, id(gate.triton_value), id(gate.triton_derivative))
    if key in _VALIDATED:
        return
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    inputs = check_grid(device)
    n = inputs.ratio.numel()
    value, derivative = torch.empty_like(inputs.ratio), torch.empty_like(inputs.ratio)
    block = 256
    _input_gate_grid_kernel[(triton.cdiv(n, block),)](
        inputs.ratio, inputs.tau, inputs.advantages, inputs.logprobs, inputs.old_logprobs, inputs.entropy, value,
        derivative, n, CUSTOM_VALUE=gate.triton_value, CUSTOM_DERIVATIVE=gate.triton_derivative, BLOCK=block,
    )
    with torch.no_grad():
        expected_value = gate.value(inputs).to(torch.float32)
        expected_derivative = gate.derivative(inputs).to(torch.float32)
    for what, fn, got, expected in (
        ("triton_value (f)", gate.triton_value, value, expected_value),
        ("triton_derivative (df/dr)", gate.triton_derivative, derivative, expected_derivative),
    ):
        got, expected = got.cpu(), expected.cpu()
        close = torch.isclose(got, expected, rtol=1e-4, atol=1e-5) | (got.isnan() & expected.isnan())
        if not close.all():
            i = int((~close).nonzero()[0])
            point = ", ".join(f"{name}={getattr(inputs, field)[i].item():g}" for name, field in (
                ("r", "ratio"), ("tau", "tau"), ("A", "advantages"), ("logp", "logprobs"),
                ("old_logp", "old_logprobs"), ("entropy", "entropy")))
            name = getattr(fn, "__name__", repr(fn))
            raise ValueError(
                f"gate {gate.name!r}: {what} {name!r} disagrees with its torch form at {point}: "
                f"{got[i].item():.7g} (Triton) vs {expected[i].item():.7g} (torch)"
            )
    _VALIDATED.add(key)
