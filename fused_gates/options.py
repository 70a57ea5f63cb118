"""The options of the loss, with their defaults: written once, here.

:class:`LossOptions` holds every keyword option of :func:`fused_gates.gated_policy_loss` that shapes the objective,
:class:`HeadOptions` those that shape how the lm_head is evaluated (shared with :func:`fused_gates.token_logprobs`).
The public functions keep explicit keyword signatures (for users and IDEs) whose defaults are read from these classes,
and collect their arguments into them with :meth:`LossOptions.collect`; the TRL integration and the benchmarks build
the same objects. :meth:`LossOptions.check_scalars` validates everything that needs no tensor and resolves the
:class:`~fused_gates.objective.ObjectiveConfig` (tensor options are checked against the batch by
:mod:`fused_gates.arguments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor

from .entropy_trust import ESTR_EPSILON
from .gate_inputs import DPPO_GATES, GATE_OPTIONS, resolve_input_parameters
from .gates import Gate, GateParameters, get_gate
from .objective import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, ObjectiveConfig
from .validation import check_choice, check_number, fail

NONFINITE_POLICIES = ("raise", "zero", "propagate")
"""What a token with a non-finite hidden state does (see :func:`fused_gates.gated_policy_loss`)."""

_GATE_DEFAULTS = GateParameters()


class _Collect:
    @classmethod
    def collect(cls, values: dict[str, Any]):
        """The options among a function's arguments (``locals()``), by field name."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class HeadOptions(_Collect):
    temperature: float = 1.0
    logit_softcap: float | None = None
    bias: Tensor | None = None
    on_nonfinite: str = "raise"
    process_group: object | None = None
    backend: str = "auto"
    memory_budget_mb: float | None = None
    statistics_method: str = "auto"
    sequence_group: object | None = None


@dataclass(frozen=True)
class SupportOptions(_Collect):
    """The sampler's support (:mod:`fused_gates.support`): kept sets given, or replayed; None: the whole vocabulary
    (``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are no-ops too)."""

    kept_token_ids: Tensor | None = None
    top_k: int | Tensor | None = None
    top_p: float | Tensor | None = None
    min_p: float | Tensor | None = None
    return_kept_ids: int | None = None


@dataclass(frozen=True)
class LossOptions(_Collect):
    gate: str | Gate = "sigmoid"
    tau_pos: float = _GATE_DEFAULTS.tau_pos
    tau_neg: float = _GATE_DEFAULTS.tau_neg
    epsilon_low: float = _GATE_DEFAULTS.epsilon_low
    epsilon_high: float | None = None  # None: epsilon_low
    delta: float | None = None
    vespo_k: tuple[float, float] | None = None  # None: GateParameters' (vespo_k_pos, vespo_k_neg)
    vespo_lambda: tuple[float, float] | None = None
    loss_type: str = "grpo"
    max_completion_length: int | None = None
    num_items_in_batch: int | float | Tensor | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    entropy_coef: float = 0.0
    sampling_ratio: Tensor | None = None
    entropy_mask: Tensor | None = None
    off_policy_mask_threshold: float | None = None
    sampling_logprobs: Tensor | None = None
    group_size: int | None = None
    group_ids: Tensor | None = None
    sequence_ids: Tensor | None = None
    # the gates that read more than r (fused_gates.gate_inputs; None: the paper's default)
    dppo_delta: float | tuple[float, float] | None = None
    m2po_threshold: float | None = None
    bapo_rho: float | None = None
    bapo_bounds: tuple[float, float, float, float] | None = None
    bapo_steps: tuple[float, float] | None = None
    aspo_dual_clip: float | None = None
    gmpo_epsilon: float | tuple[float, float] | None = None
    # the entropy-scaled trust region (fused_gates.entropy_trust); off while estr_threshold is None
    estr_threshold: float | None = None
    estr_epsilon: float | None = None  # None: ESTR_EPSILON
    old_entropy: Tensor | None = None
    # DPPO's Top-K divergence (fused_gates.topk_divergence): the behaviour policy's top-K ids and log-probs
    old_topk_ids: Tensor | None = None
    old_topk_logprobs: Tensor | None = None

    def check_scalars(self) -> ObjectiveConfig:
        """Every check that needs no tensor (each error names the option), and the objective they configure."""
        gate = get_gate(self.gate)
        _only_with("delta", self.delta, gate.is_clip, "to gate='clip' (TRL's two-sided clipping)")
        _only_with("vespo_k", self.vespo_k, gate.is_vespo, "to gate='vespo'")
        _only_with("vespo_lambda", self.vespo_lambda, gate.is_vespo, "to gate='vespo'")
        _only_with("sampling_logprobs", self.sampling_logprobs, self.off_policy_mask_threshold is not None,
                   "with off_policy_mask_threshold")
        delta = math.inf if self.delta is None else check_number("delta", self.delta)
        vespo_k = ((_GATE_DEFAULTS.vespo_k_pos, _GATE_DEFAULTS.vespo_k_neg) if self.vespo_k is None
                   else _check_pair("vespo_k", self.vespo_k))
        vespo_lambda = ((_GATE_DEFAULTS.vespo_lambda_pos, _GATE_DEFAULTS.vespo_lambda_neg)
                        if self.vespo_lambda is None else _check_pair("vespo_lambda", self.vespo_lambda))
        threshold = self.off_policy_mask_threshold
        if threshold is not None:
            threshold = check_number("off_policy_mask_threshold", threshold, minimum=None)
        tau_pos = check_number("tau_pos", self.tau_pos)
        tau_neg = check_number("tau_neg", self.tau_neg)
        epsilon_low = check_number("epsilon_low", self.epsilon_low, allow_minimum=True, maximum=1.0)
        epsilon_high = epsilon_low if self.epsilon_high is None else check_number(
            "epsilon_high", self.epsilon_high, allow_minimum=True)
        check_choice("loss_type", self.loss_type, LOSS_TYPES, "loss_type")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise fail("max_completion_length", "is required for loss_type='dr_grpo'")
            check_number("max_completion_length", self.max_completion_length, integer=True)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "level")
        beta = check_number("beta", self.beta, allow_minimum=True)
        entropy_coef = check_number("entropy_coef", self.entropy_coef, minimum=None)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise fail("group_size", f"must be a positive int, got {self.group_size!r}")
        if self.group_ids is not None and self.group_size is not None:
            raise fail("group_ids", "give group_size or group_ids, not both")
        input_params = resolve_input_parameters(gate, {name: getattr(self, name) for name in GATE_OPTIONS})
        if (self.old_topk_ids is None) != (self.old_topk_logprobs is None):
            given, missing = (("old_topk_ids", "old_topk_logprobs") if self.old_topk_logprobs is None
                              else ("old_topk_logprobs", "old_topk_ids"))
            raise fail(missing, f"is required with {given} (the behaviour policy's top-K ids and their log-probs)")
        if self.old_topk_ids is not None:
            if gate.name not in DPPO_GATES:
                raise fail("old_topk_ids", f"DPPO's Top-K divergence applies to gate='dppo' / gate='dppo_kl'; it would "
                           f"be ignored with gate={gate.name!r}")
            input_params = replace(input_params, dppo_topk=True)
        if gate.reads_inputs and self.importance_sampling_level != "token":
            raise fail("importance_sampling_level", f"gate={gate.name!r} defines its own ratio; only 'token' applies")
        if gate.whole_rows and self.use_bias_correction_kl and self.beta != 0:
            raise fail("use_bias_correction_kl", f"gate={gate.name!r} has no token ratio to correct the KL with")
        estr_threshold, estr_epsilon = self.check_estr(gate)
        items = self.num_items_in_batch
        if items is not None and self.loss_type == "dapo" and not isinstance(items, Tensor):
            # 0 is a batch without a token (the normaliser is clamped to 1); a tensor is checked with the values
            check_number("num_items_in_batch", items, allow_minimum=True)
        return ObjectiveConfig(
            gate=gate,
            params=GateParameters(tau_pos, tau_neg, epsilon_low, epsilon_high, delta, vespo_k[0], vespo_lambda[0],
                                  vespo_k[1], vespo_lambda[1]),
            sequence_level=self.importance_sampling_level == "sequence",
            beta=beta,
            use_bias_correction_kl=bool(self.use_bias_correction_kl),
            has_entropy_bonus=entropy_coef != 0,
            off_policy_mask_threshold=threshold,
            input_params=input_params,
            estr_threshold=estr_threshold,
            estr_epsilon=estr_epsilon,
        )

    def check_estr(self, gate: Gate) -> tuple[float | None, float]:
        """The entropy-scaled trust region's ``(tau, eps)``: a mask on a token's own log-ratio, so on the gates of
        one token's ratio only (the paper's, registered ones, cispo)."""
        threshold = self.estr_threshold
        _only_with("estr_epsilon", self.estr_epsilon, threshold is not None, "with estr_threshold")
        _only_with("old_entropy", self.old_entropy, threshold is not None, "with estr_threshold")
        epsilon = ESTR_EPSILON if self.estr_epsilon is None else check_number("estr_epsilon", self.estr_epsilon,
                                                                               allow_minimum=True)
        if threshold is None:
            return None, epsilon
        threshold = check_number("estr_threshold", threshold)
        if gate.is_vespo or gate.reads_inputs:
            raise fail("estr_threshold", f"gate={gate.name!r} has its own trust region over more than the token's "
                       "ratio; the entropy-scaled mask applies to the paper's gates, registered gates of (r, tau) and "
                       "cispo")
        if self.importance_sampling_level != "token":
            raise fail("estr_threshold", "the entropy-scaled region bounds each token's own log-ratio; it needs "
                       "importance_sampling_level='token'")
        return threshold, epsilon


def _check_pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(name, f"expected a (positive, negative) pair of numbers, got {value!r}", TypeError)
    return check_number(f"{name}[0]", value[0], minimum=None), check_number(f"{name}[1]", value[1], minimum=None)


def _only_with(name: str, value: object, condition: bool, requirement: str) -> None:
    """Refuse an option that would be ignored."""
    if value is not None and not condition:
        raise fail(name, f"only applies {requirement}; it would be ignored here")
