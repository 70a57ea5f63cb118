"""The gates f(r) and f'(r) as Triton device functions, selected by a constexpr id, and the check of a custom
gate's Triton pair against its torch pair.

Same maths and the same overflow-safe forms as :mod:`fused_gates.gates` (``u = r - 1``, ``x = tau u``):

    sigmoid   f = sigmoid(x) 4 / tau                       f' = 4 sigmoid(x) sigmoid(-x)
    erf       f = 1 + c erf(x / sqrt 2)                    f' = exp(-x^2 / 2),   c = sqrt(pi / 2) / tau
    arctan    f = 1 + atan(x) / tau                        f' = 1 / (1 + x^2)
    softsign  f = 1 + (x / hypot(1, x)) / tau              f' = hypot(1, x)^-3
    clip      f = min(r, 1 + eps_high, delta) if A > 0 else clamp(r, 1 - eps_low, max(1 + eps_high, delta))
              f' = 1 where f = r (unclipped), else 0; 1 if A = 0    (delta = inf: TRL's plain clip)
    cispo     f = min(r, eps_high) (TRL's detached weight of -A logp)   f' = f / r (relative to plain IS)

Temperatures and epsilons are runtime arguments (a new value must not recompile the kernels); only the gate id
and a custom gate's pair of ``@triton.jit`` functions ``(ratio, tau) -> tensor`` are compile-time constants. The gates
that read more than r and have a kernel form (dppo, dppo_kl, aspo, and gates registered with
``register_input_gate`` and a Triton pair of ``(ratio, tau, advantage, logprob, old_logprob, entropy)``) are in
:mod:`fused_gates.kernels.input_gates`, called by the token-level row kernel's epilogue instead of this function.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..gates import BUILTIN_KERNEL_IDS, CUSTOM_INPUT_KERNEL_ID, CUSTOM_KERNEL_ID, Gate, GateParameters
from .input_gates import validate_input_gate

CLIP = tl.constexpr(BUILTIN_KERNEL_IDS["clip"])
SIGMOID = tl.constexpr(BUILTIN_KERNEL_IDS["sigmoid"])
ERF = tl.constexpr(BUILTIN_KERNEL_IDS["erf"])
ARCTAN = tl.constexpr(BUILTIN_KERNEL_IDS["arctan"])
SOFTSIGN = tl.constexpr(BUILTIN_KERNEL_IDS["softsign"])
CISPO = tl.constexpr(BUILTIN_KERNEL_IDS["cispo"])
CUSTOM = tl.constexpr(CUSTOM_KERNEL_ID)

_SQRT_HALF_PI = tl.constexpr(math.sqrt(math.pi / 2))
_INV_SQRT2 = tl.constexpr(1 / math.sqrt(2))
_HALF_PI = tl.constexpr(math.pi / 2)
_QUARTER_PI = tl.constexpr(math.pi / 4)
_TAN_3PI_8 = tl.constexpr(math.tan(3 * math.pi / 8))
_TAN_PI_8 = tl.constexpr(math.tan(math.pi / 8))


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)): exp overflows to inf for x << 0 and the quotient is then exactly 0, never NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _hypot_one(x):
    """hypot(1, x) = max(1, |x|) sqrt(1 + (min(1, |x|) / max(1, |x|))^2): x^2 is never formed."""
    a = tl.abs(x)
    big = tl.maximum(a, 1.0)
    q = tl.minimum(a, 1.0) / big
    return big * tl.sqrt(1.0 + q * q)


@triton.jit
def atan(x):
    """float32 arctangent: reduce |x| to [0, tan(pi/8)] with atan(a) = pi/2 - atan(1/a) (a > tan(3pi/8)) or
    pi/4 + atan((a-1)/(a+1)) (a > tan(pi/8)), then the odd minimax polynomial of degree 9 (Cephes ``atanf``
    coefficients, about 1 ulp). Not every Triton release maps an arctangent in the interpreter and on GPU alike;
    custom gates may call it too."""
    a = tl.abs(x)
    big = a > _TAN_3PI_8
    mid = a > _TAN_PI_8
    t = tl.where(big, -1.0 / tl.maximum(a, 1.0), tl.where(mid, (a - 1.0) / (a + 1.0), a))
    offset = tl.where(big, _HALF_PI, tl.where(mid, _QUARTER_PI, 0.0))
    z = t * t
    poly = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    y = offset + poly
    return tl.where(x < 0, -y, y)


@triton.jit
def gate_value_and_derivative(
    ratio,
    advantage,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    delta,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
):
    """``(f(r), f'(r))`` elementwise; ``tau = tau_pos`` where ``A > 0``, else ``tau_neg`` (``A = 0`` included)."""
    if GATE == CLIP:
        lower = 1.0 - epsilon_low
        upper_positive = tl.minimum(1.0 + epsilon_high, delta)  # -min(min(r, delta) A, clip(r) A) for A > 0
        upper_negative = tl.maximum(1.0 + epsilon_high, delta)  # and for A < 0
        positive = advantage > 0
        value = tl.where(
            positive, tl.minimum(ratio, upper_positive), tl.minimum(tl.maximum(ratio, lower), upper_negative)
        )
        # At A = 0 the loss and its gradient vanish whatever f' is; f' = 1 keeps EUR = 1 - clip ratio (TRL counts
        # only A != 0 tokens as clipped).
        unclipped = tl.where(
            positive, ratio <= upper_positive, ((ratio >= lower) & (ratio <= upper_negative)) | (advantage == 0)
        )
        derivative = unclipped.to(tl.float32)
    elif GATE == CISPO:
        value = tl.minimum(ratio, epsilon_high)
        derivative = value / ratio
    else:
        tau = tl.where(advantage > 0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        if GATE == SIGMOID:
            value = _sigmoid(x) * (4.0 / tau)
            derivative = 4.0 * _sigmoid(x) * _sigmoid(-x)  # not s (1 - s), which cancels for x >> 0
        elif GATE == ERF:
            # the paper's c (1 + erf) + 1 - c without the cancellation of c - c at small tau
            value = 1.0 + (_SQRT_HALF_PI / tau) * tl.math.erf(x * _INV_SQRT2)
            derivative = tl.exp(-0.5 * x * x)
        elif GATE == ARCTAN:
            value = 1.0 + atan(x) / tau
            derivative = 1.0 / (1.0 + x * x)
        elif GATE == SOFTSIGN:
            norm = _hypot_one(x)
            value = 1.0 + (x / norm) / tau
            inv = 1.0 / norm
            derivative = inv * inv * inv
        else:
            tl.static_assert(GATE == CUSTOM, "unknown gate id")
            value = CUSTOM_VALUE(ratio, tau)
            derivative = CUSTOM_DERIVATIVE(ratio, tau)
    return value, derivative


@triton.jit
def _gate_grid_kernel(
    p_ratio,
    p_advantage,
    p_value,
    p_derivative,
    n,
    tau_pos,
    tau_neg,
    epsilon_low,
    epsilon_high,
    delta,
    GATE: tl.constexpr,
    CUSTOM_VALUE: tl.constexpr,
    CUSTOM_DERIVATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    b_r = tl.load(p_ratio + o_i, mask=m_i, other=1.0)
    b_a = tl.load(p_advantage + o_i, mask=m_i, other=0.0)
    b_f, b_df = gate_value_and_derivative(
        b_r, b_a, tau_pos, tau_neg, epsilon_low, epsilon_high, delta, GATE, CUSTOM_VALUE, CUSTOM_DERIVATIVE
    )
    tl.store(p_value + o_i, b_f, mask=m_i)
    tl.store(p_derivative + o_i, b_df, mask=m_i)


def kernel_gate(gate: Gate) -> tuple[int, object | None, object | None]:
    """``(GATE id, custom value fn, custom derivative fn)`` to pass to a kernel; validates a custom pair once."""
    if gate.kernel_id == CUSTOM_INPUT_KERNEL_ID:  # a registered input gate's pair (fused_gates.kernels.input_gates)
        validate_input_gate(gate)
        return CUSTOM_INPUT_KERNEL_ID, gate.triton_value, gate.triton_derivative
    if gate.kernel_id != CUSTOM_KERNEL_ID:
        return gate.kernel_id, None, None
    if gate.triton_value is None or gate.triton_derivative is None:
        raise ValueError(
            f"gate {gate.name!r} has no Triton functions: pass triton_value/triton_derivative (@triton.jit functions "
            "of (ratio, tau)) to register_gate, or use backend='torch'"
        )
    _validate_custom_gate(gate)
    return CUSTOM_KERNEL_ID, gate.triton_value, gate.triton_derivative


def evaluate_gate(gate: Gate, ratio: torch.Tensor, advantages: torch.Tensor, params: GateParameters):
    """``(f(r), f'(r))`` of float32 ``ratio`` and ``advantages`` (1-D, same device) from the Triton device functions."""
    gate_id, value_fn, derivative_fn = kernel_gate(gate)
    return _launch_gate_grid(gate_id, value_fn, derivative_fn, ratio, advantages, params)


def _launch_gate_grid(gate_id, value_fn, derivative_fn, ratio, advantages, params):
    ratio = ratio.to(torch.float32).contiguous()
    advantages = advantages.to(torch.float32).contiguous()
    value, derivative = torch.empty_like(ratio), torch.empty_like(ratio)
    block = 256
    _gate_grid_kernel[(triton.cdiv(ratio.numel(), block),)](
        ratio,
        advantages,
        value,
        derivative,
        ratio.numel(),
        params.tau_pos,
        params.tau_neg,
        params.epsilon_low,
        params.epsilon_high,
        params.delta,
        GATE=gate_id,
        CUSTOM_VALUE=value_fn,
        CUSTOM_DERIVATIVE=derivative_fn,
        BLOCK=block,
    )
    return value, derivative


_VALIDATED: dict[tuple[str, int, int], bool] = {}
_CHECK_RATIOS = (1e-3, 0.1, 0.5, 0.8, 0.95, 1.0, 1.05, 1.2, 1.5, 2.0, 3.0, 10.0, 1e3, 1e6)
_CHECK_TAUS = (0.5, 1.0, 2.0, 10.0)


def _validate_custom_gate(gate: Gate) -> None:
    """Compare the Triton pair with the gate's torch pair (float32) on a grid of ratios and temperatures, once per
    pair; raises ValueError naming the function and the point where they disagree."""
    key = (gate.name, id(gate.triton_value), id(gate.triton_derivative))
    if key in _VALIDATED:
        return
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ratio = torch.tensor(_CHECK_RATIOS, dtype=torch.float32).repeat(len(_CHECK_TAUS))
    tau = torch.tensor(_CHECK_TAUS, dtype=torch.float32).repeat_interleave(len(_CHECK_RATIOS))
    # tau_pos is taken where A > 0: one launch per temperature would also do, a unit advantage keeps it to one.
    value = torch.empty_like(ratio)
    derivative = torch.empty_like(ratio)
    for t in _CHECK_TAUS:
        rows = tau == t
        params = GateParameters(tau_pos=t, tau_neg=t)
        v, d = _launch_gate_grid(
            CUSTOM_KERNEL_ID,
            gate.triton_value,
            gate.triton_derivative,
            ratio[rows].to(device),
            torch.ones(int(rows.sum()), device=device),
            params,
        )
        value[rows], derivative[rows] = v.cpu(), d.cpu()
    with torch.no_grad():
        expected_value = gate.value(ratio, tau).to(torch.float32)
        expected_derivative = gate.derivative(ratio, tau).to(torch.float32)
    for what, got, expected in (
        ("triton_value (f)", value, expected_value),
        ("triton_derivative (f')", derivative, expected_derivative),
    ):
        close = torch.isclose(got, expected, rtol=1e-4, atol=1e-5) | (got.isnan() & expected.isnan())
        if not close.all():
            i = int((~close).nonzero()[0])
            raise ValueError(
                f"gate {gate.name!r}: {what} disagrees with its torch form at r={ratio[i].item():g}, "
                f"tau={tau[i].item():g}: {got[i].item():.7g} (Triton) vs {expected[i].item():.7g} (torch)"
            )
    _VALIDATED[key] = True
