"""Gate functions f(r) of the policy objective, their derivatives f'(r), and the registry of gates by name.

The objective of every supported method is ``-f(r) * A`` per token, where ``r`` is the importance ratio and
``A`` the advantage (paper eqs. 1-3). GRPO's clip and SAPO's sigmoid are two choices of ``f``; the paper adds
erf, arctan and softsign (eqs. 6-8). With ``u = r - 1`` and ``x = tau * u``:

========  ==============================================  ==========================
gate      f(r)                                            f'(r)
========  ==============================================  ==========================
sigmoid   sigmoid(x) * 4 / tau                            4 sigmoid(x) sigmoid(-x)
erf       1 + c erf(x / sqrt 2),  c = sqrt(pi/2) / tau    exp(-x^2 / 2)
arctan    1 + atan(x) / tau                               1 / (1 + x^2)
softsign  1 + u / sqrt(1 + x^2)                           (1 + x^2)^(-3/2)
clip      min(r, 1 + eps_high) if A > 0 else max(r, 1 - eps_low)   1[r <= 1 + eps_high] if A > 0,
                                                          1[r >= 1 - eps_low] if A < 0, 1 if A = 0
========  ==============================================  ==========================

The soft gates take ``tau = tau_pos`` where ``A > 0`` and ``tau = tau_neg`` otherwise (``A = 0`` included).
For clip at ``A = 0`` the loss and its gradient vanish whatever f' is; f' = 1 there so that the Effective Update
Ratio equals ``1 - clip_ratio/region_mean`` exactly as TRL counts clipped tokens (only ``A != 0`` tokens clip).
TRL's two-sided clipping (``delta``) caps the ratio of the unclipped term at ``delta``: ``f = min(r, 1 + eps_high,
delta)`` where ``A > 0`` and ``f = clamp(r, 1 - eps_low, max(1 + eps_high, delta))`` otherwise.

``cispo`` and ``vespo`` are TRL's policy objectives whose weight of ``A logp`` is detached (truncated importance
weight, gamma weight of the sequence's ratio): they are not functions f(r) of the paper's form and are evaluated by
``fused_gates.objective``; they are selectable by name but not listed by :func:`available_gates`.

Formulas are written to stay finite and accurate over the whole reachable range of ratios (``exp(+-80)``, see
:data:`MAX_LOG_RATIO`) and of temperatures: ``1 + c erf(.)`` is the paper's ``c (1 + erf(.)) + 1 - c`` without
the cancellation of ``c - c`` that loses every digit when ``c`` is large (small tau); ``x / hypot(1, x)`` instead
of ``x / sqrt(1 + x^2)`` (whose square overflows first); ``sigmoid(x) sigmoid(-x)`` instead of ``s (1 - s)``.
The Triton forms of the same formulas are in ``fused_gates.kernels.gates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .admissibility import GateFunction, check_admissible

BUILTIN_KERNEL_IDS = {"clip": 0, "sigmoid": 1, "erf": 2, "arctan": 3, "softsign": 4, "cispo": 6, "dppo": 7,
                      "dppo_kl": 8, "aspo": 9}
CUSTOM_KERNEL_ID = 5
CUSTOM_INPUT_KERNEL_ID = 10
"""Gate ids shared with the Triton kernels, which select the device function by this constexpr (vespo's weight is a
row statistic evaluated in torch: it has no kernel branch; nor have m2po and bapo, which need a batch statistic, and
gmpo, which needs whole rows). ``CUSTOM_INPUT_KERNEL_ID``: a gate of :func:`register_input_gate` with its Triton
pair."""

SOFT_GATES = ("sigmoid", "erf", "arctan", "softsign")
"""The paper's soft gates (SAPO's sigmoid and eqs. 6-8): each takes a temperature tau."""
PAPER_GATES = ("clip", *SOFT_GATES)
"""The five gates the paper compares, in its order."""
POLICY_OBJECTIVES = ("cispo", "vespo")
"""TRL's detached-weight objectives, selectable as ``gate=`` but not gates f(r) of the paper's form."""

GATE_KINDS = ("clip", "soft", "cispo", "vespo", "inputs")
"""What a gate is: GRPO's clip (epsilons), a soft gate of (r, tau) (built-in or registered), one of TRL's
detached-weight objectives, or a gate that reads more than the ratio (``fused_gates.gate_inputs``)."""
INPUT_GATES = ("dppo", "dppo_kl", "m2po", "bapo", "aspo", "gmpo")
"""The trust-region objectives that read more than r (probabilities, the advantage, a batch statistic, the row):
their formulas, parameters and citations are in ``fused_gates.gate_inputs``."""

DEFAULT_CHECK_TAUS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass(frozen=True)
class GateParameters:
    """The runtime floats of a gate: temperatures for the soft gates, epsilons (and TRL's ``delta``) for clip,
    ``epsilon_high`` for cispo, the gamma weight's shape for vespo."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float = math.inf
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass(frozen=True)
class Gate:
    """A gate: ``value(r, tau) = f(r)`` and ``derivative(r, tau) = f'(r)`` as elementwise torch functions.

    ``triton_value`` / ``triton_derivative`` are optional ``@triton.jit`` functions of ``(ratio, tau)`` with the
    same maths, which the Triton backend calls inside its kernels; without them a custom gate still runs on the
    ``torch`` backend. (For a gate of :func:`register_input_gate` they take ``(ratio, tau, advantage, logprob,
    old_logprob, entropy)``; without them it runs on the Triton backend's unfused path.)
    """

    name: str
    value: GateFunction
    derivative: GateFunction
    triton_value: object | None = field(default=None, compare=False)
    triton_derivative: object | None = field(default=None, compare=False)
    kind: str = "soft"  # one of GATE_KINDS
    kernel_id: int | None = CUSTOM_KERNEL_ID  # the kernels' branch; None: no kernel form (vespo)
    batch_statistic: bool = False  # reads a statistic of the whole batch (the chunks must see every token first)
    whole_rows: bool = False  # a token's term depends on the other tokens of its row

    @property
    def is_clip(self) -> bool:
        return self.kind == "clip"

    @property
    def is_cispo(self) -> bool:
        return self.kind == "cispo"

    @property
    def is_vespo(self) -> bool:
        return self.kind == "vespo"

    @property
    def reads_inputs(self) -> bool:
        """Whether the gate reads more than (r, tau): evaluated by ``fused_gates.gate_inputs``."""
        return self.kind == "inputs"

    @property
    def has_temperature(self) -> bool:
        """Whether the gate takes tau (``tau_pos`` / ``tau_neg``): the soft gates, built-in or registered; not clip
        (set by its epsilons) nor the detached-weight objectives."""
        return self.kind == "soft" or self.is_registered_input_gate

    @property
    def is_registered_input_gate(self) -> bool:
        """A user's gate of (r, tau) and the token's other inputs (:func:`register_input_gate`)."""
        return self.kind == "inputs" and self.name not in _INPUT_GATES

    @property
    def runs_in_kernels(self) -> bool:
        """Whether the Triton kernels can evaluate this gate (built-in, or custom with its Triton pair)."""
        if self.kind == "vespo":
            return True  # its weight is evaluated in torch between the statistics and the gradient kernels
        return self.kernel_id != CUSTOM_KERNEL_ID or (
            self.triton_value is not None and self.triton_derivative is not None
        )

    def evaluate(self, ratio: Tensor, advantages: Tensor, params: GateParameters) -> tuple[Tensor, Tensor]:
        """``(f(r), f'(r))`` per token, with the temperature chosen by the sign of the advantage."""
        tau = torch.full_like(ratio, params.tau_neg).masked_fill_(advantages > 0, params.tau_pos)
        return self.value(ratio, tau), self.derivative(ratio, tau)


@dataclass(frozen=True)
class ClipGate(Gate):
    """GRPO's hard clip (paper eq. 1); the epsilons replace the temperatures."""

    def evaluate(self, ratio: Tensor, advantages: Tensor, params: GateParameters) -> tuple[Tensor, Tensor]:
        positive = advantages > 0
        lower = 1.0 - params.epsilon_low
        upper_positive = min(1.0 + params.epsilon_high, params.delta)  # -min(min(r, delta) A, clip(r) A), A > 0
        upper_negative = max(1.0 + params.epsilon_high, params.delta)  # the same for A < 0
        value = torch.where(positive, ratio.clamp(max=upper_positive), ratio.clamp(min=lower, max=upper_negative))
        unclipped = torch.where(
            positive, ratio <= upper_positive, ((ratio >= lower) & (ratio <= upper_negative)) | (advantages == 0)
        )
        return value, unclipped.to(ratio.dtype)


def _unavailable(ratio: Tensor, tau: Tensor) -> Tensor:
    raise TypeError("this gate depends on the advantage's sign and its own parameters: use Gate.evaluate")


def _sigmoid_value(ratio: Tensor, tau: Tensor) -> Tensor:
    return torch.sigmoid(tau * (ratio - 1)) * (4 / tau)


def _sigmoid_derivative(ratio: Tensor, tau: Tensor) -> Tensor:
    x = tau * (ratio - 1)
    return 4 * torch.sigmoid(x) * torch.sigmoid(-x)


def _erf_value(ratio: Tensor, tau: Tensor) -> Tensor:
    # c (1 + erf) + 1 - c == 1 + c erf: the paper's form cancels c - c (relative error 1e-3 at tau = 1e-6 in
    # float32); this one is exact as tau -> 0, where c erf(tau u / sqrt 2) -> u.
    return 1 + (math.sqrt(math.pi / 2) / tau) * torch.erf(tau * (ratio - 1) / math.sqrt(2))


def _erf_derivative(ratio: Tensor, tau: Tensor) -> Tensor:
    x = tau * (ratio - 1)
    return torch.exp(-0.5 * x * x)


def _arctan_value(ratio: Tensor, tau: Tensor) -> Tensor:
    return 1 + torch.atan(tau * (ratio - 1)) / tau


def _arctan_derivative(ratio: Tensor, tau: Tensor) -> Tensor:
    x = tau * (ratio - 1)
    return 1 / (1 + x * x)


def _softsign_value(ratio: Tensor, tau: Tensor) -> Tensor:
    # u / sqrt(1 + tau^2 u^2) = (x / hypot(1, x)) / tau; |x| <= 1e18 (where the quotient is +-1 to float64
    # precision) keeps tau (r - 1) from overflowing to inf / inf
    x = (tau * (ratio - 1)).clamp(-1e18, 1e18)
    return 1 + x / torch.hypot(torch.ones_like(x), x) / tau


def _softsign_derivative(ratio: Tensor, tau: Tensor) -> Tensor:
    x = tau * (ratio - 1)
    return torch.hypot(torch.ones_like(x), x).reciprocal().pow(3)


_BUILTIN_GATES: dict[str, Gate] = {
    "clip": ClipGate("clip", _unavailable, _unavailable, kind="clip", kernel_id=BUILTIN_KERNEL_IDS["clip"]),
    "sigmoid": Gate("sigmoid", _sigmoid_value, _sigmoid_derivative, kernel_id=BUILTIN_KERNEL_IDS["sigmoid"]),
    "erf": Gate("erf", _erf_value, _erf_derivative, kernel_id=BUILTIN_KERNEL_IDS["erf"]),
    "arctan": Gate("arctan", _arctan_value, _arctan_derivative, kernel_id=BUILTIN_KERNEL_IDS["arctan"]),
    "softsign": Gate("softsign", _softsign_value, _softsign_derivative, kernel_id=BUILTIN_KERNEL_IDS["softsign"]),
}
assert tuple(_BUILTIN_GATES) == PAPER_GATES
_POLICY_OBJECTIVES: dict[str, Gate] = {
    "cispo": Gate("cispo", _unavailable, _unavailable, kind="cispo", kernel_id=BUILTIN_KERNEL_IDS["cispo"]),
    "vespo": Gate("vespo", _unavailable, _unavailable, kind="vespo", kernel_id=None),
}
_INPUT_GATES: dict[str, Gate] = {
    name: Gate(name, _unavailable, _unavailable, kind="inputs", kernel_id=BUILTIN_KERNEL_IDS.get(name),
               batch_statistic=name in ("m2po", "bapo"), whole_rows=name == "gmpo")
    for name in INPUT_GATES
}
_REGISTRY: dict[str, Gate] = dict(_BUILTIN_GATES)
_REGISTERED_INPUT_GATES: dict[str, Gate] = {}
"""Gates of :func:`register_input_gate`: selectable by name, not listed by :func:`available_gates` (whose gates are
functions of (r, tau) that plots and the admissibility tools evaluate)."""


def register_gate(
    name: str,
    value: GateFunction,
    derivative: GateFunction,
    *,
    triton_value: object | None = None,
    triton_derivative: object | None = None,
    check_taus: Sequence[float] = DEFAULT_CHECK_TAUS,
    overwrite: bool = False,
) -> Gate:
    """Register a user-defined gate under ``name`` after checking its admissibility.

    ``value(r, tau)`` and ``derivative(r, tau)`` are elementwise torch functions; ``tau`` is a tensor of the
    per-token temperature (``tau_pos`` where the advantage is positive, ``tau_neg`` otherwise). The pair is checked
    against the paper's properties (i)-(iv) for every tau in ``check_taus``, and for finite values over every ratio
    the loss can reach (see :func:`fused_gates.check_admissible`). ``triton_value`` / ``triton_derivative``
    (``@triton.jit`` functions of ``(ratio, tau)``) let the Triton backend fuse the gate into its kernels. Returns
    the :class:`Gate`, also usable directly as ``gate=``.
    """
    _check_new_name(name, overwrite)
    _check_pair(value, derivative, "(ratio, tau)")
    if (triton_value is None) != (triton_derivative is None):
        raise TypeError("triton_value and triton_derivative must be given together")
    if not check_taus or any(not (t > 0) for t in check_taus):
        raise ValueError(f"check_taus must be a non-empty sequence of positive temperatures, got {check_taus!r}")
    check_admissible(name, value, derivative, check_taus)
    gate = Gate(name, value, derivative, triton_value, triton_derivative, kernel_id=CUSTOM_KERNEL_ID)
    _REGISTERED_INPUT_GATES.pop(name, None)
    _REGISTRY[name] = gate
    return gate


def _check_new_name(name: object, overwrite: bool) -> None:
    """A user gate's name: not a built-in, not taken unless ``overwrite`` (by either registry)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _BUILTIN_GATES or name in _POLICY_OBJECTIVES or name in _INPUT_GATES:
        raise ValueError(f"name {name!r} is a built-in gate and cannot be replaced")
    if (name in _REGISTRY or name in _REGISTERED_INPUT_GATES) and not overwrite:
        raise ValueError(f"a gate named {name!r} is already registered; pass overwrite=True to replace it")


def _check_pair(value: object, derivative: object, arguments: str) -> None:
    if not callable(value) or not callable(derivative):
        raise TypeError(f"value and derivative must be callables {arguments} -> tensor")


@dataclass(frozen=True)
class GateInputs:
    """What a gate registered with :func:`register_input_gate` reads per token (1-D tensors, detached): the ratio,
    the temperature chosen by the advantage's sign, the advantage, the current and the behaviour policy's log-probs
    (``p = exp(logprobs)``), and the entropy of the token's distribution."""

    ratio: Tensor
    tau: Tensor
    advantages: Tensor
    logprobs: Tensor
    old_logprobs: Tensor
    entropy: Tensor


InputGateFunction = Callable[[GateInputs], Tensor]
DEFAULT_CHECK_ENTROPIES: tuple[float, ...] = (0.05, 1.0, 4.0, 11.0)
DEFAULT_CHECK_LOGPROBS: tuple[float, ...] = (-0.01, -2.0, -12.0)


def register_input_gate(
    name: str,
    value: InputGateFunction,
    derivative: InputGateFunction,
    *,
    check_taus: Sequence[float] = DEFAULT_CHECK_TAUS,
    check_entropies: Sequence[float] = DEFAULT_CHECK_ENTROPIES,
    check_logprobs: Sequence[float] = DEFAULT_CHECK_LOGPROBS,
    overwrite: bool = False,
    triton_value: object | None = None,
    triton_derivative: object | None = None,
) -> Gate:
    """Register a gate that reads more than the ratio: ``value(inputs) = f`` and ``derivative(inputs) = df/dr``
    elementwise over a :class:`GateInputs`; the policy term is ``-f A`` as for the paper's gates, and the entropy,
    advantage and log-probs enter as constants (no gradient flows through them). As a function of r with the other
    inputs fixed, the pair must satisfy the paper's properties (i)-(iv): it is checked for every tau in
    ``check_taus``, entropy in ``check_entropies``, current log-prob in ``check_logprobs`` (the old log-prob follows
    from the ratio) and advantage sign. It runs on the torch backend and, at ``importance_sampling_level="token"``,
    on the Triton backend: fused into the token-level row kernel when ``triton_value`` / ``triton_derivative`` are
    given (``@triton.jit`` functions of ``(ratio, tau, advantage, logprob, old_logprob, entropy)``, float32 scalars
    of one token, with the maths of the torch pair; checked against it on a grid at first use), otherwise on the
    unfused path (the statistics kernel, the gate in torch, the gradient kernel). Selectable as ``gate=name`` (or
    the returned :class:`Gate`); not listed by :func:`available_gates`."""
    _check_new_name(name, overwrite)
    _check_pair(value, derivative, "(GateInputs)")
    if (triton_value is None) != (triton_derivative is None):
        raise TypeError("triton_value and triton_derivative must be given together")
    for what, values in (("check_taus", check_taus), ("check_entropies", check_entropies)):
        if not values or any(not (v > 0) for v in values):
            raise ValueError(f"{what} must be a non-empty sequence of positive numbers, got {values!r}")
    if not check_logprobs or any(not (v < 0) for v in check_logprobs):
        raise ValueError(f"check_logprobs must be a non-empty sequence of negative numbers, got {check_logprobs!r}")
    for entropy in check_entropies:
        for logprob in check_logprobs:
            for sign in (1.0, -1.0):
                def at(fn: InputGateFunction, e: float = entropy, lp: float = logprob, a: float = sign):
                    def of(ratio: Tensor, tau: Tensor) -> Tensor:
                        logp = torch.full_like(ratio, lp)
                        return fn(GateInputs(ratio, tau, torch.full_like(ratio, a), logp, logp - torch.log(ratio),
                                             torch.full_like(ratio, e)))
                    return of

                label = f"{name} (entropy={entropy:g}, logp={logprob:g}, A={sign:+g})"
                check_admissible(label, at(value), at(derivative), check_taus)
    kernel_id = None if triton_value is None else CUSTOM_INPUT_KERNEL_ID
    gate = Gate(name, value, derivative, triton_value, triton_derivative, kind="inputs", kernel_id=kernel_id)
    _REGISTRY.pop(name, None)
    _REGISTERED_INPUT_GATES[name] = gate
    return gate


def unregister_gate(name: str) -> None:
    """Remove a user-defined gate from the registry."""
    if name in _BUILTIN_GATES:
        raise ValueError(f"name {name!r} is a built-in gate and cannot be removed")
    if name in _REGISTERED_INPUT_GATES:
        del _REGISTERED_INPUT_GATES[name]
        return
    if name not in _REGISTRY:
        raise KeyError(f"no gate named {name!r} is registered")
    del _REGISTRY[name]


def get_gate(gate: str | Gate) -> Gate:
    """The :class:`Gate` for a registered name, ``"cispo"`` or ``"vespo"`` (or the gate itself)."""
    if isinstance(gate, Gate):
        return gate
    if not isinstance(gate, str):
        raise TypeError(f"gate: expected a gate name or a Gate, got {type(gate).__name__}")
    found = (_REGISTRY.get(gate) or _POLICY_OBJECTIVES.get(gate) or _INPUT_GATES.get(gate)
             or _REGISTERED_INPUT_GATES.get(gate))
    if found is None:
        names = ", ".join([*sorted(_REGISTRY), *_POLICY_OBJECTIVES, *_INPUT_GATES, *sorted(_REGISTERED_INPUT_GATES)])
        raise ValueError(f"gate: unknown gate {gate!r}; registered gates: {names}")
    return found


def available_gates() -> list[str]:
    """Names of the built-in and registered gates f(r) (TRL's cispo / vespo objectives are selectable by name too,
    but are not gates of the paper's form)."""
    return sorted(_REGISTRY)
