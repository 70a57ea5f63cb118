"""Gates that read more than the ratio: the per-token probabilities, the advantage, the row, a batch statistic.

The paper's gates are functions f(r) of the importance ratio alone. The trust-region objectives that followed SAPO
look at more: the probability difference ``p - p_old`` (DPPO), the second moment of the batch's log-ratios (M2PO),
the share of the batch's loss carried by positive-advantage tokens (BAPO), the reciprocal ratio of positive tokens
(ASPO), the geometric mean of the row's clipped ratios (GMPO). Each is evaluated here on the O(N) per-token vectors
between the passes over the vocabulary (``fused_gates.objective`` calls :func:`evaluate_input_gate`), from what the
statistics pass already holds: ``logp``, the behaviour policy's ``old_logp``, the advantage ``A``, the mask ``m``,
the row of each token, and the entropy.

Every gate gives per token its policy term ``P_t`` of the loss (aggregated by the loss type like the paper's gates),
``dP_t / dr_t`` (through the ratio) or ``dP_t / dlogp_t`` (a detached weight), and two diagnostics: ``gate_value``
(what multiplies ``-A``, or the detached weight of ``-A logp``) and ``gate_grad``, the token's **gradient weight
relative to the unclipped policy gradient** ``r A grad logp``: f'(r) for a gate of r, 0 / 1 for a mask, ``w / r`` for
a detached weight ``w``. The Effective Update Ratio (paper eq. 12, ``fused_gates.metrics``) is the mean of
``gate_grad`` over tokens (and prompt groups), so EUR generalises to every gate. Where ``A = 0`` the loss and its
gradient vanish whatever the gate does; ``gate_grad`` is 1 there (the token is not clipped), as for clip.

``r = exp(clamp(logp - old_logp, +-80))``; ``old_logp = logp`` (on-policy) when none is given. With ``m_t`` the
mask's weights (fractional masks weight tokens), per token:

``dppo`` -- DPPO-Binary-TV, Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning"
    (arXiv:2602.04879): the trust region is a bound on the total-variation proxy ``p - p_old`` (probabilities, not a
    ratio). ``valid = p - p_old <= delta_high`` where ``A > 0``, ``p - p_old >= -delta_low`` otherwise;
    ``P = -sg(min(r, C) valid) A logp`` (the weight detached). delta = 0.15 on both sides (the value of the
    authors' released Binary-TV run scripts); the truncation ``C = 20`` of the importance weight is verl's
    ``clip_ratio_c`` default for its ``dppo_tv`` loss, which the paper leaves to the implementation.
    ``gate_grad = min(r, C) valid / r``.
``dppo_kl`` -- DPPO-Binary-KL, the same paper: the divergence is the KL between the two-outcome distributions
    (the token, everything else) of the behaviour and current policies,
    ``D = p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p))``, and a token is trusted unless it moves
    the wrong way past the bound: ``valid = D <= delta_high or p <= p_old`` where ``A > 0``, ``D <= delta_low or
    p >= p_old`` otherwise (as verl's ``dppo_kl`` writes it); the rest as ``dppo``. delta = 0.05 on both sides (the
    authors' Binary-KL run scripts). ``D`` is formed exactly (``log(1 - p)`` from ``logp`` without cancellation;
    verl adds 1e-8 inside the logarithms): ``(1 - p_old) log(...)`` is 0 where ``p_old = 1`` and ``D = inf`` where
    ``p = 1 > p_old``.
``m2po`` -- Zheng et al. 2025, "Second-Moment Trust Policy Optimization" (arXiv:2510.01161): a batch statistic.
    The tokens with the largest ``(log r)^2`` are masked, largest first, until the second moment
    ``sum m (log r)^2 / sum m`` over the tokens kept is at most ``tau_M2 = 0.04``; ``P = -M r A`` with the mask
    ``M`` detached and no clipping. Ties are masked in token order (row-major). ``gate_grad = M``.
``bapo`` -- Xi et al. 2025, "BAPO: Balanced Policy Optimization with Adaptive Clipping" (arXiv:2510.18927),
    Algorithm 1: the clip bounds of ``min(r A, clip(r, c_low, c_high) A)`` are chosen per batch. Starting at
    ``c_low = a-``, ``c_high = a+``: while the positive tokens' share ``rho`` of the policy loss is below ``rho_0``
    and ``c_low + delta_2 <= b-``, raise ``c_high`` by ``delta_1`` if ``c_high + delta_1 <= b+``, else ``c_low`` by
    ``delta_2``. ``rho = sum_{A>0} m |L_t| / sum m |L_t|`` with ``L_t = min(r A, clip(r, c_low, c_high) A)`` (1 when
    the batch has no loss). Defaults from the paper: ``rho_0 = 0.5``, ``[a-, b-] = [0.6, 0.9]``, ``[a+, b+] =
    [1.2, 3.0]``; the steps ``delta_1 = 0.1``, ``delta_2 = 0.05`` are those of the authors' verl recipe (the paper
    names them without values). Bounds are compared with a 1e-9 tolerance so that ``1.2 + 18 x 0.1`` reaches 3.0.
    ``gate_grad`` is clip's: ``1[r <= c_high]`` where ``A > 0``, ``1[r >= c_low]`` where ``A < 0``.
``aspo`` -- Wang et al. 2025, "ASPO: Asymmetric Importance Sampling Policy Optimization" (arXiv:2510.06062), as
    the authors' code writes it with one pair of epsilons (``epsilon_low`` / ``epsilon_high``, 0.2): for ``A < 0``,
    ``rho = max(r, 1 - eps_low)`` and ``P = -A rho`` (PPO's clip); for ``A >= 0`` the ratio is flipped,
    ``rho = min(r, 1 + eps_high)`` and ``P = -A (rho / sg(rho)) / sg(rho)`` (value ``-A / rho``, gradient
    ``-A grad logp / r`` where unclipped). The soft dual clip: where the weight exceeds ``c = 3`` (``rho > c`` for
    ``A < 0``, ``1 / rho > c`` for ``A >= 0``) the term is ``-sg(c) A logp``, which keeps a gradient of weight c.
    ``gate_grad = 1[r >= 1 - eps_low]`` (``A < 0``), ``1[r <= 1 + eps_high] / r^2`` (``A > 0``), ``c / r`` where dual
    clipped.
``gmpo`` -- Zhao et al. 2025, "Geometric-Mean Policy Optimization" (arXiv:2507.20673), as verl's ``geo_mean`` loss
    writes it: per token ``l_t = clamp(log r_t, +-20)``, clipped on the side of its advantage's sign s,
    ``c_t = s min(s l_t, s clamp(l_t, -eps_low, eps_high))`` (0 where ``A = 0``); the row's ratio is the geometric
    mean ``R_i = exp(sum_t m_t c_t / n_i)`` and ``P_t = -A_t R_i`` (so with ``loss_type="grpo"`` the loss is verl's
    mean over rows of ``-mean(A) R_i``). eps = 0.4 on both sides (the paper's ``(e^-0.4, e^0.4)``; verl defaults to
    0.2). ``gate_grad`` is the token's clip indicator ``dc_t / dl_t`` (0 / 1), ``ratio`` and ``gate_value`` the
    row's ``R_i``.

A user's gate of (r, tau) and the token's other inputs (the entropy, ``logp``, ``old_logp``, ``A``), registered with
:func:`fused_gates.register_input_gate`, is evaluated here too: ``P = -f A``, ``dP/dr = -f' A``, ``gate_grad = f'``,
its other inputs held constant (no gradient through the entropy). It is checked against the paper's properties as
a function of r at fixed other inputs when registered (and its Triton pair, if it has one, against the torch pair
at first use on the Triton backend).

Which inputs a gate reads: dppo and dppo_kl ``logp, old_logp, A``; m2po ``logp, old_logp, A, m`` and the batch;
bapo the same; aspo ``logp, old_logp, A``; gmpo ``logp, old_logp, A, m`` and the row. The importance-sampling level
is each gate's own (``importance_sampling_level="token"`` only). Batch statistics are the batch's whatever the memory
budget: when the batch fits one chunk the loss, gradient coefficients and gradients come from the same pass (three
products); otherwise the forward takes the statistics pass and the backward recomputes the logits (four products),
as for a row longer than a chunk (``fused_gates.chunk_driver``). On the Triton backend the token-local gates
dppo, dppo_kl and aspo, and registered gates with a Triton pair, run in the token-level row kernel's epilogue
(``fused_gates.kernels.input_gates``: the same formulas in float32, Binary-KL without cancellation); m2po and bapo
(a batch statistic) and gmpo (whole rows), registered gates without a Triton pair, DPPO's Top-K divergences, the
entropy-scaled trust region, and every gate on a vocabulary-parallel head take the unfused path (the statistics
kernel, this module in torch, the gradient kernel): no extra product, but no fused epilogue either. DPPO's Top-K
divergence approximations (``old_topk_ids`` / ``old_topk_logprobs``, the behaviour policy's top-K per token) replace
the Binary divergence of ``dppo`` / ``dppo_kl``: ``fused_gates.topk_divergence``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .admissibility import MAX_LOG_RATIO
from .gates import INPUT_GATES, Gate, GateInputs, GateParameters
from .topk_divergence import topk_valid
from .validation import check_number, fail

DPPO_RATIO_CAP = 20.0
"""verl's ``clip_ratio_c`` default: DPPO's truncation of the detached importance weight."""
GMPO_LOG_RATIO_CLAMP = 20.0
"""verl's clamp of the token log-ratio before GMPO's clip."""
BAPO_TOLERANCE = 1e-9
"""Slack of BAPO's bound comparisons (``a + k delta <= b`` in floating point)."""


@dataclass(frozen=True)
class InputGateParameters:
    """The hyperparameters of the gates of this module, with each paper's defaults (module docstring)."""

    dppo_delta_low: float = 0.15  # the bound of the gate chosen: Binary-TV's here, Binary-KL's below
    dppo_delta_high: float = 0.15
    dppo_kl_delta_low: float = 0.05
    dppo_kl_delta_high: float = 0.05
    m2po_threshold: float = 0.04
    bapo_rho: float = 0.5
    bapo_bounds: tuple[float, float, float, float] = (0.6, 0.9, 1.2, 3.0)  # a-, b-, a+, b+
    bapo_steps: tuple[float, float] = (0.1, 0.05)  # delta_1 (upper bound), delta_2 (lower bound)
    aspo_dual_clip: float = 3.0
    gmpo_epsilon_low: float = 0.4
    gmpo_epsilon_high: float = 0.4
    dppo_topk: bool = False  # the Top-K divergence (given the behaviour policy's top-K) instead of the Binary one


DEFAULTS = InputGateParameters()
DPPO_GATES = ("dppo", "dppo_kl")
"""DPPO's two divergences: total variation (Binary-TV, or Top-K TV) and KL (Binary-KL, or Top-K KL)."""

GATE_OPTIONS = {
    "dppo_delta": DPPO_GATES,
    "m2po_threshold": ("m2po",),
    "bapo_rho": ("bapo",),
    "bapo_bounds": ("bapo",),
    "bapo_steps": ("bapo",),
    "aspo_dual_clip": ("aspo",),
    "gmpo_epsilon": ("gmpo",),
}
"""Each option of this module and the gates it applies to (any other gate refuses it)."""


def _pair(name: str, value: object, **bounds) -> tuple[float, float]:
    """A number (both sides) or a ``(low, high)`` pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise fail(name, f"expected a number or a (low, high) pair, got {value!r}", TypeError)
        return check_number(f"{name}[0]", value[0], **bounds), check_number(f"{name}[1]", value[1], **bounds)
    number = check_number(name, value, **bounds)
    return number, number


def resolve_input_parameters(gate: Gate, options: dict[str, object]) -> InputGateParameters | None:
    """Check this module's options (``options``: name -> value or None) against ``gate``: each error names the
    option; an option given to a gate it does not apply to is refused. ``None`` for a gate of r."""
    for name, value in options.items():
        if value is not None and gate.name not in GATE_OPTIONS[name]:
            applies = " / ".join(f"gate={g!r}" for g in GATE_OPTIONS[name])
            raise fail(name, f"only applies to {applies}; it would be ignored with gate={gate.name!r}")
    if not gate.reads_inputs:
        return None
    d = DEFAULTS
    dppo = options.get("dppo_delta")
    if gate.name == "dppo_kl":  # a KL bound: any positive number
        dppo_low, dppo_high = (d.dppo_kl_delta_low, d.dppo_kl_delta_high) if dppo is None else _pair("dppo_delta", dppo)
    else:  # a bound on a probability difference
        dppo_low, dppo_high = (d.dppo_delta_low, d.dppo_delta_high) if dppo is None else _pair(
            "dppo_delta", dppo, minimum=0.0, maximum=1.0)
    threshold = options.get("m2po_threshold")
    threshold = d.m2po_threshold if threshold is None else check_number("m2po_threshold", threshold)
    rho = options.get("bapo_rho")
    rho = d.bapo_rho if rho is None else check_number("bapo_rho", rho, maximum=1.0, allow_maximum=False)
    bounds = options.get("bapo_bounds")
    bounds = d.bapo_bounds if bounds is None else _check_bapo_bounds(bounds)
    steps = options.get("bapo_steps")
    steps = d.bapo_steps if steps is None else _pair("bapo_steps", steps)
    dual = options.get("aspo_dual_clip")
    dual = d.aspo_dual_clip if dual is None else check_number("aspo_dual_clip", dual, minimum=1.0)
    gmpo = options.get("gmpo_epsilon")
    gmpo_low, gmpo_high = (d.gmpo_epsilon_low, d.gmpo_epsilon_high) if gmpo is None else _pair("gmpo_epsilon", gmpo)
    return InputGateParameters(dppo_low, dppo_high, d.dppo_kl_delta_low, d.dppo_kl_delta_high, threshold, rho, bounds,
                               steps, dual, gmpo_low, gmpo_high)


def _check_bapo_bounds(value: object) -> tuple[float, float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 4:
        raise fail("bapo_bounds", f"expected (a-, b-, a+, b+), the ranges of c_low and c_high, got {value!r}",
                   TypeError)
    low_start, low_max, high_start, high_max = (check_number(f"bapo_bounds[{i}]", v) for i, v in enumerate(value))
    if not low_start <= low_max < 1.0 < high_start <= high_max:
        raise fail("bapo_bounds", f"must satisfy 0 < a- <= b- < 1 < a+ <= b+, got {tuple(value)!r}")
    return low_start, low_max, high_start, high_max


# -- evaluation ----------------------------------------------------------------------------------------------------


class Tokens(Protocol):
    """What the gates read of ``fused_gates.objective.TokenData``."""

    advantages: Tensor
    mask: Tensor
    old_logprobs: Tensor | None
    row: Tensor
    row_share: Tensor
    num_rows: int
    row_reduce: Callable[[Tensor], Tensor] | None
    old_topk_logprobs: Tensor | None
    current_topk_logprobs: Tensor | None


@dataclass
class InputGateTerms:
    """Per token: the policy term and its derivatives (see :func:`evaluate_input_gate`) and the diagnostics."""

    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    policy: Tensor  # P_t
    by_ratio: Tensor  # dP_t / d(ratio) (the row's ratio where row_chain is given)
    by_logprob: Tensor  # dP_t / dlogp_t through a detached weight
    row_chain: Tensor | None = None  # d(row ratio) / dlogp_t: the policy's gradient couples the row's tokens


def _row_sum(values: Tensor, tokens: Tokens) -> Tensor:
    sums = values.new_zeros(tokens.num_rows).index_add_(0, tokens.row, values)
    if tokens.row_reduce is not None:  # the rows continue on other ranks (sequence-sharded)
        sums = tokens.row_reduce(sums)
    return sums[tokens.row]


def _unclipped_at_zero(gate_grad: Tensor, advantages: Tensor) -> Tensor:
    return gate_grad.masked_fill(advantages == 0, 1.0)


def evaluate_input_gate(gate: Gate, logprobs: Tensor, entropy: Tensor, tokens: Tokens, params: GateParameters,
                        inputs: InputGateParameters | None) -> InputGateTerms:
    """The gate's terms on a set of tokens: the whole batch for a batch statistic, whole rows for gmpo (the chunk
    driver guarantees it); ``logprobs`` and ``entropy`` carry no autograd history."""
    advantages = tokens.advantages
    old = logprobs if tokens.old_logprobs is None else tokens.old_logprobs
    log_ratio = (logprobs - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    zeros = torch.zeros_like(logprobs)
    if gate.name not in INPUT_GATES:  # registered with fused_gates.register_input_gate: -f A, f of all the inputs
        tau = torch.full_like(ratio, params.tau_neg).masked_fill_(advantages > 0, params.tau_pos)
        read = GateInputs(ratio, tau, advantages, logprobs, old, entropy)
        value, derivative = gate.value(read), gate.derivative(read)
        return InputGateTerms(ratio, value, derivative, -value * advantages, -derivative * advantages, zeros)
    assert inputs is not None
    if gate.name in DPPO_GATES:
        return _dppo(gate.name, logprobs, old, ratio, tokens, inputs, zeros)
    if gate.name == "m2po":
        keep = m2po_keep(log_ratio, tokens.mask, inputs.m2po_threshold)
        return InputGateTerms(ratio, keep * ratio, _unclipped_at_zero(keep, advantages), -keep * ratio * advantages,
                              -keep * advantages, zeros)
    if gate.name == "bapo":
        c_low, c_high = bapo_bounds(ratio, advantages, tokens.mask, inputs)
        return _bapo(ratio, advantages, c_low, c_high, zeros)
    if gate.name == "aspo":
        return _aspo(logprobs, ratio, advantages, params, inputs, zeros)
    return _gmpo(logprobs, old, advantages, tokens, inputs, zeros)


def _dppo(name: str, logprobs: Tensor, old: Tensor, ratio: Tensor, tokens: Tokens, inputs: InputGateParameters,
          zeros: Tensor) -> InputGateTerms:
    advantages = tokens.advantages
    if inputs.dppo_topk:  # fused_gates.topk_divergence
        valid = topk_valid("tv" if name == "dppo" else "kl", logprobs, old, advantages, tokens.old_topk_logprobs,
                           tokens.current_topk_logprobs, inputs.dppo_delta_low, inputs.dppo_delta_high)
    elif name == "dppo":
        shift = torch.exp(logprobs) - torch.exp(old)
        valid = torch.where(advantages > 0, shift <= inputs.dppo_delta_high, shift >= -inputs.dppo_delta_low)
    else:
        divergence = binary_kl(old, logprobs)
        valid = torch.where(advantages > 0, (divergence <= inputs.dppo_delta_high) | (logprobs <= old),
                            (divergence <= inputs.dppo_delta_low) | (logprobs >= old))
    weight = ratio.clamp(max=DPPO_RATIO_CAP) * valid.to(ratio.dtype)
    gate_grad = _unclipped_at_zero(weight / ratio, advantages)
    return InputGateTerms(ratio, weight, gate_grad, -weight * advantages * logprobs, zeros, -weight * advantages)


def _log_one_minus_exp(logp: Tensor) -> Tensor:
    """``log(1 - exp(logp))`` for ``logp <= 0`` without cancellation (Maechler's split at log 1/2)."""
    return torch.where(logp > -0.6931471805599453, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def binary_kl(old_logp: Tensor, logp: Tensor) -> Tensor:
    """DPPO's Binary-KL ``KL(Bernoulli(p_old) || Bernoulli(p))`` from the two log-probabilities: finite unless
    ``p = 1 > p_old`` (then inf), never NaN."""
    old_logp, logp = old_logp.clamp(max=0.0), logp.clamp(max=0.0)
    old_rest, rest = _log_one_minus_exp(old_logp), _log_one_minus_exp(logp)
    token = torch.exp(old_logp) * (old_logp - logp)
    others = torch.exp(old_rest) * (old_rest - rest)
    return token + torch.where(old_rest == -torch.inf, torch.zeros_like(others), others)


def m2po_keep(log_ratio: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """M2PO's mask (1 kept, 0 masked): the fewest largest ``(log r)^2`` masked so that the mask-weighted mean over the
    tokens kept is at most ``threshold``; no host synchronisation (suffix sums over the descending order)."""
    second = log_ratio.square()
    order = torch.sort(second, descending=True, stable=True).indices
    values, weights = second[order] * mask[order], mask[order]
    zero = values.new_zeros(1)
    # kept after masking the k largest: suffix sums from k (k = 0 .. N; the empty suffix has mean 0)
    suffix_values = torch.cat([values.flip(0).cumsum(0).flip(0), zero])
    suffix_weights = torch.cat([weights.flip(0).cumsum(0).flip(0), zero])
    small = suffix_values <= threshold * suffix_weights
    masked = torch.argmax(small.to(torch.int8))  # the first k that satisfies the bound (k = N always does)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank >= masked).to(log_ratio.dtype)


def bapo_bounds(ratio: Tensor, advantages: Tensor, mask: Tensor, inputs: InputGateParameters) -> tuple[Tensor, Tensor]:
    """BAPO's ``(c_low, c_high)`` for this batch (0-dim tensors, no host synchronisation): every candidate of the
    paper's loop is scored at once, and the first that meets ``rho_0`` (else the last the loop reaches) is taken."""
    low_start, low_max, high_start, high_max = inputs.bapo_bounds
    step_high, step_low = inputs.bapo_steps
    n_high = int((high_max - high_start) / step_high + BAPO_TOLERANCE)
    n_low = int((low_max - low_start) / step_low + BAPO_TOLERANCE)
    last = n_high + n_low if n_low >= 1 else 0  # the loop runs only while c_low + delta_2 <= b- holds
    steps = torch.arange(last + 1, device=ratio.device, dtype=ratio.dtype)
    c_high = high_start + steps.clamp(max=n_high) * step_high
    c_low = low_start + (steps - n_high).clamp(min=0) * step_low
    r, a, m = ratio.unsqueeze(0), advantages.unsqueeze(0), mask.unsqueeze(0)
    clipped = torch.minimum(r * a, torch.minimum(torch.maximum(r, c_low[:, None]), c_high[:, None]) * a).abs() * m
    total = clipped.sum(1)
    positive = (clipped * (a > 0)).sum(1)
    share = torch.where(total > 0, positive / total.where(total > 0, 1.0), 1.0)
    met = torch.cat([share >= inputs.bapo_rho, share.new_ones(1, dtype=torch.bool)])
    chosen = torch.argmax(met.to(torch.int8)).clamp(max=last)
    return c_low[chosen], c_high[chosen]


def _bapo(ratio: Tensor, advantages: Tensor, c_low: Tensor, c_high: Tensor, zeros: Tensor) -> InputGateTerms:
    positive = advantages > 0
    value = torch.where(positive, torch.minimum(ratio, c_high), torch.maximum(ratio, c_low))
    unclipped = torch.where(positive, ratio <= c_high, ratio >= c_low).to(ratio.dtype)
    gate_grad = _unclipped_at_zero(unclipped, advantages)
    return InputGateTerms(ratio, value, gate_grad, -value * advantages, -unclipped * advantages, zeros)


def _aspo(logprobs: Tensor, ratio: Tensor, advantages: Tensor, params: GateParameters, inputs: InputGateParameters,
          zeros: Tensor) -> InputGateTerms:
    dual = inputs.aspo_dual_clip
    negative = advantages < 0
    lower, upper = 1.0 - params.epsilon_low, 1.0 + params.epsilon_high
    rho_negative = ratio.clamp(min=lower)
    rho_positive = ratio.clamp(max=upper)
    weight = torch.where(negative, rho_negative, 1.0 / rho_positive)  # the (flipped) importance weight
    dual_clipped = weight > dual
    # through the ratio where not dual clipped: d rho / dr = 1[unclipped]; the flipped form -A rho/sg(rho)/sg(rho)
    # has d/dr = 1[r <= upper] / rho^2
    slope = torch.where(negative, (ratio >= lower).to(ratio.dtype),
                        (ratio <= upper).to(ratio.dtype) / rho_positive.square())
    slope = slope.masked_fill(dual_clipped, 0.0)
    value = torch.where(dual_clipped, torch.full_like(ratio, dual), weight)
    policy = torch.where(dual_clipped, -dual * advantages * logprobs, -value * advantages)
    by_logprob = torch.where(dual_clipped, -dual * advantages, zeros)
    gate_grad = torch.where(dual_clipped, dual / ratio, slope)
    return InputGateTerms(ratio, value, _unclipped_at_zero(gate_grad, advantages), policy, -slope * advantages,
                          by_logprob)


def _gmpo(logprobs: Tensor, old: Tensor, advantages: Tensor, tokens: Tokens, inputs: InputGateParameters,
          zeros: Tensor) -> InputGateTerms:
    log_ratio = logprobs - old
    inside = (log_ratio.abs() <= GMPO_LOG_RATIO_CLAMP).to(log_ratio.dtype)
    log_ratio = log_ratio.clamp(-GMPO_LOG_RATIO_CLAMP, GMPO_LOG_RATIO_CLAMP)
    positive, negative = advantages > 0, advantages < 0
    clipped = log_ratio.clamp(-inputs.gmpo_epsilon_low, inputs.gmpo_epsilon_high)
    term = torch.where(positive, torch.minimum(log_ratio, clipped),
                       torch.where(negative, torch.maximum(log_ratio, clipped), zeros))
    through = torch.where(positive, log_ratio <= inputs.gmpo_epsilon_high,
                          negative & (log_ratio >= -inputs.gmpo_epsilon_low)).to(log_ratio.dtype) * inside
    row_ratio = torch.exp(_row_sum(term * tokens.row_share, tokens).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    chain = row_ratio * tokens.row_share * through
    return InputGateTerms(row_ratio, row_ratio, _unclipped_at_zero(through, advantages), -advantages * row_ratio,
                          -advantages, zeros, chain)


def input_gate_metrics(gate: Gate, ratio: Tensor, gate_value: Tensor, advantages: Tensor, mask: Tensor,
                       inputs: InputGateParameters) -> dict[str, Tensor]:
    """What a gate decided for the batch: ``dppo/masked_fraction``, ``dppo_kl/masked_fraction`` and
    ``m2po/masked_fraction`` (the mask-weighted share of tokens whose policy term the gate masked), ``bapo/c_low``
    and ``bapo/c_high`` (the bounds chosen)."""
    if gate.name in (*DPPO_GATES, "m2po"):
        masked = (gate_value == 0).to(mask.dtype)
        return {f"{gate.name}/masked_fraction": (masked * mask).sum() / mask.sum().clamp(min=1.0)}
    if gate.name == "bapo":
        c_low, c_high = bapo_bounds(ratio, advantages, mask, inputs)
        return {"bapo/c_low": c_low, "bapo/c_high": c_high}
    return {}
