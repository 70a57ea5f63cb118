"""``GatedGRPOConfig``: TRL 1.16's ``GRPOConfig`` plus the gate, and its translation into the fused loss's terms.

Without ``gate`` the configuration trains exactly TRL's objective for ``loss_type``:

==========================================  ==================  ======================================
TRL ``loss_type``                           fused-loss ``gate``  aggregation (fused-loss ``loss_type``)
==========================================  ==================  ======================================
grpo, bnpo, dr_grpo, dapo (TRL's default),  clip (+ ``delta``)  the same name
luspo
sapo                                        sigmoid             grpo
cispo                                       cispo               dapo
vespo                                       vespo               dapo
==========================================  ==================  ======================================

``gate`` replaces the ratio function ``f(r)`` of the objective and keeps the aggregation of ``loss_type``: any gate
(``clip``, ``sigmoid``, ``erf``, ``arctan``, ``softsign``, ``cispo``, ``vespo`` or one given to
:func:`fused_gates.register_gate`) with grpo, bnpo, dr_grpo, dapo, luspo or sapo (whose aggregation is grpo). The
temperatures of a tempered gate are ``gate_tau_pos`` / ``gate_tau_neg``, by default TRL's ``sapo_temperature_pos`` /
``sapo_temperature_neg``. Refused when the trainer is built, before any model is loaded, because they have no
meaning: a ``gate`` other than ``loss_type`` itself with ``loss_type`` cispo or vespo (their objective is a detached
weight times the log-probability, not a ratio function to replace: use ``loss_type="dapo"`` for the same
aggregation), ``delta`` with a gate other than clip (it caps the clipped objective's unclipped term), gate
temperatures for a gate without one (clip, cispo, vespo), and the adaptive temperature's settings without
``gate_eur_target``.

The trust-region objectives that read more than the ratio (``gate="dppo"``, ``"dppo_kl"``, ``"m2po"``, ``"bapo"``,
``"aspo"``, ``"gmpo"``: :mod:`fused_gates.gate_inputs`) take their hyperparameters as ``gate_dppo_delta``,
``gate_m2po_threshold``, ``gate_bapo_rho``, ``gate_bapo_bounds``, ``gate_bapo_steps``, ``gate_aspo_dual_clip``,
``gate_gmpo_epsilon`` (None: the paper's default), each refused with another gate; they are refused with
``importance_sampling_level="sequence"`` (each defines its own ratio) and gmpo with ``use_bias_correction_kl``. ASPO's
clip takes TRL's ``epsilon`` / ``epsilon_high``. M2PO's and BAPO's batch statistic is that of the micro-batch one
process computes the loss on (as verl computes them).

The entropy-scaled trust region (``gate_estr_threshold``, ``gate_estr_epsilon``: :mod:`fused_gates.entropy_trust`)
applies to the gates of one token's ratio (clip, the soft gates, registered gates, cispo) at token level. Its log-ratio
is the objective's, ``logp - old_per_token_logps``; its entropy is the old policy's from TRL's old-policy pass
(computed there, no extra pass), or the current policy's when TRL runs none (then the ratio is 1 and nothing is
dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from fused_gates import BACKENDS, NONFINITE_POLICIES, POLICY_OBJECTIVES, get_gate
from fused_gates.entropy_trust import ESTR_EPSILON
from fused_gates.gate_inputs import DEFAULTS as D
from fused_gates.gate_inputs import GATE_OPTIONS, resolve_input_parameters
from fused_gates.options import LossOptions
from fused_gates.validation import check_number

from .sampler_support import sampler_truncation

LOGPROB_SUPPORTS = ("full", "sampler")
"""``logprob_support``: log-probs over the whole vocabulary (TRL's numbers) or over the sampler's support
(:mod:`.sampler_support`)."""

TRL_OBJECTIVES: dict[str, tuple[str, str]] = {
    "grpo": ("clip", "grpo"),
    "bnpo": ("clip", "bnpo"),
    "dr_grpo": ("clip", "dr_grpo"),
    "dapo": ("clip", "dapo"),
    "luspo": ("clip", "luspo"),
    "sapo": ("sigmoid", "grpo"),
    "cispo": ("cispo", "dapo"),
    "vespo": ("vespo", "dapo"),
}
"""TRL 1.16 ``loss_type`` -> (gate, aggregation) of :func:`fused_gates.gated_policy_loss`."""

DETACHED_WEIGHT_OBJECTIVES = POLICY_OBJECTIVES  # a detached weight times the log-probability: no ratio function


@dataclass
class GatedGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the gate (see the module docstring for how ``gate`` combines with ``loss_type``)."""

    gate: str | None = field(
        default=None,
        metadata={"help": "Ratio function of the objective: clip, sigmoid (SAPO), erf, arctan, softsign, cispo, vespo "
                          "or a registered gate. None: TRL's objective of loss_type."},
    )
    gate_tau_pos: float | None = field(
        default=None,
        metadata={"help": "Gate temperature where the advantage is positive (default: sapo_temperature_pos)."},
    )
    gate_tau_neg: float | None = field(
        default=None,
        metadata={"help": "Gate temperature where the advantage is <= 0 (default: sapo_temperature_neg)."},
    )
    gate_backend: str = field(default="auto", metadata={"help": "fused_gates backend: auto, torch or triton."})
    gate_memory_budget_mb: float | None = field(
        default=None, metadata={"help": "Working-buffer budget of the fused loss (MiB); default by device."}
    )
    gate_on_nonfinite: str = field(
        default="raise",
        metadata={"help": "What a non-finite hidden state at a valid token does: raise, zero (the token is "
                          "dropped and counted in nonfinite_tokens) or propagate."},
    )
    gate_eur_target: float | None = field(
        default=None,
        metadata={"help": "Adapt the gate temperatures after each optimiser step so that the off-policy Effective "
                          "Update Ratio approaches this target. None: fixed temperatures."},
    )
    gate_eur_rate: float | None = field(
        default=None, metadata={"help": "Step size of the adaptive temperature (default: the controller's)."}
    )
    gate_tau_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the adaptive temperature (default: the controller's)."}
    )
    gate_tau_max: float | None = field(
        default=None, metadata={"help": "Upper bound of the adaptive temperature (default: the controller's)."}
    )
    logprob_support: str = field(
        default="full",
        metadata={"help": "full: log-probs over the whole vocabulary (TRL's); sampler: over the support that "
                          "top_k / top_p / min_p sampling kept (replayed as vLLM's sampler truncates), so that the "
                          "importance-sampling correction compares like with like."},
    )
    sampler_kept_bound: int = field(
        default=1024,
        metadata={"help": "logprob_support='sampler': the most kept tokens per position carried from the old-policy "
                          "pass to later iterations (a larger support raises)."},
    )

    gate_dppo_delta: float | None = field(
        default=None,
        metadata={"help": f"gate='dppo': bound on |p - p_old| (default {D.dppo_delta_high:g}); gate='dppo_kl': bound "
                          f"on the binary KL (default {D.dppo_kl_delta_high:g})."},
    )
    gate_m2po_threshold: float | None = field(
        default=None,
        metadata={"help": f"gate='m2po': bound tau_M2 on the second moment of log r (default {D.m2po_threshold:g})."},
    )
    gate_bapo_rho: float | None = field(
        default=None,
        metadata={"help": f"gate='bapo': target share rho_0 of positive tokens in the loss ({D.bapo_rho:g})."},
    )
    gate_bapo_bounds: list[float] | None = field(
        default=None, metadata={"help": f"gate='bapo': ranges (a-, b-, a+, b+) of c_low, c_high {D.bapo_bounds}."}
    )
    gate_bapo_steps: list[float] | None = field(
        default=None, metadata={"help": f"gate='bapo': steps (delta_1, delta_2) of c_high, c_low {D.bapo_steps}."}
    )
    gate_aspo_dual_clip: float | None = field(
        default=None,
        metadata={"help": f"gate='aspo': soft dual clip c of the importance weight (default {D.aspo_dual_clip:g})."},
    )
    gate_gmpo_epsilon: float | None = field(
        default=None,
        metadata={"help": f"gate='gmpo': log-space clip range of the token ratios (default {D.gmpo_epsilon_high:g})."},
    )
    gate_estr_threshold: float | None = field(
        default=None,
        metadata={"help": "The entropy-scaled trust region (ESTR) on a gate of the token's ratio: a token's policy "
                          "term is kept where (log r)^2 <= threshold * (H_old + gate_estr_epsilon), H_old the old "
                          "policy's entropy from TRL's old-policy pass (the current policy's when TRL runs none). "
                          "None: off."},
    )
    gate_estr_epsilon: float | None = field(
        default=None,
        metadata={"help": f"gate_estr_threshold: the entropy floor eps (default {ESTR_EPSILON:g})."},
    )

    def __post_init__(self):
        super().__post_init__()
        objective = resolve_objective(self)
        if objective.tempered:  # the effective temperatures, for whoever reads the configuration
            self.gate_tau_pos, self.gate_tau_neg = objective.tau_pos, objective.tau_neg


@dataclass(frozen=True)
class GateObjective:
    """What the fused loss computes for a configuration."""

    gate: str
    aggregation: str  # the fused loss's loss_type
    tau_pos: float | None  # None for a gate without temperature
    tau_neg: float | None
    input_options: tuple[tuple[str, object], ...] = ()  # the given options of the gate's trust region

    @property
    def tempered(self) -> bool:
        return self.tau_pos is not None

    @property
    def divided_by_accumulation(self) -> bool:
        """Whether the trainer divides the loss by the gradient-accumulation steps (TRL: all but the
        ``num_items_in_batch``-normalised dapo aggregation)."""
        return self.aggregation != "dapo"


def _number_problem(name: str, value: object, **bounds: object) -> list[str]:
    """``[]`` when ``value`` passes :func:`fused_gates.validation.check_number`, else its message."""
    try:
        check_number(name, value, **bounds)
    except (TypeError, ValueError) as error:
        return [str(error)]
    return []


def resolve_objective(args: GatedGRPOConfig) -> GateObjective:
    """The fused loss's objective for ``args``; raises ``ValueError`` listing every meaningless setting."""
    problems: list[str] = []
    if args.loss_type not in TRL_OBJECTIVES:
        raise ValueError(f"loss_type={args.loss_type!r} is not a TRL 1.16 loss type; choose one of "
                         f"{', '.join(TRL_OBJECTIVES)}")
    default_gate, aggregation = TRL_OBJECTIVES[args.loss_type]
    gate = default_gate if args.gate is None else args.gate
    if args.gate is not None:
        try:
            get_gate(args.gate)
        except (ValueError, TypeError) as error:
            problems.append(f"gate: {error}")
        if args.loss_type in DETACHED_WEIGHT_OBJECTIVES and args.gate != args.loss_type:
            problems.append(f"gate={args.gate!r} with loss_type={args.loss_type!r}: that objective is a detached "
                            "weight times the log-probability, not a ratio function to replace; use "
                            f"loss_type='dapo' for the same aggregation with gate={args.gate!r}")
    if args.delta is not None and gate != "clip":
        problems.append(f"delta caps the unclipped term of the clipped objective; gate={gate!r} has none")
    tempered = _has_temperature(gate)
    tau_pos = args.sapo_temperature_pos if args.gate_tau_pos is None else args.gate_tau_pos
    tau_neg = args.sapo_temperature_neg if args.gate_tau_neg is None else args.gate_tau_neg
    if tempered:
        for name, given, value in (("gate_tau_pos", args.gate_tau_pos, tau_pos),
                                   ("gate_tau_neg", args.gate_tau_neg, tau_neg)):
            problems += _number_problem(name if given is not None else name.replace("gate_tau", "sapo_temperature"),
                                        value)
    else:
        for name in ("gate_tau_pos", "gate_tau_neg"):
            if getattr(args, name) is not None:
                problems.append(f"{name}: gate {gate!r} has no temperature")
    if args.gate_backend not in BACKENDS:
        problems.append(f"gate_backend={args.gate_backend!r}; choose one of {', '.join(BACKENDS)}")
    if args.gate_memory_budget_mb is not None:
        problems += _number_problem("gate_memory_budget_mb", args.gate_memory_budget_mb)
    if args.gate_on_nonfinite not in NONFINITE_POLICIES:
        problems.append(f"gate_on_nonfinite={args.gate_on_nonfinite!r}; choose one of "
                        f"{', '.join(NONFINITE_POLICIES)}")
    problems += _adaptive_problems(args)
    input_options = {name: _as_tuple(getattr(args, f"gate_{name}")) for name in (*GATE_OPTIONS, *ESTR_OPTIONS)}
    problems += _input_gate_problems(args, gate, {name: input_options[name] for name in GATE_OPTIONS})
    problems += _estr_problems(args, gate)
    problems += _support_problems(args)
    if problems:
        raise ValueError("GatedGRPOConfig: this configuration has no meaning:\n- " + "\n- ".join(problems))
    given = tuple((name, value) for name, value in input_options.items() if value is not None)
    return GateObjective(gate, aggregation, tau_pos if tempered else None, tau_neg if tempered else None, given)


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _input_gate_problems(args: GatedGRPOConfig, gate: str, options: dict[str, object]) -> list[str]:
    """The options of the gates that read more than r, checked by the core (names prefixed ``gate_``)."""
    try:
        resolved = get_gate(gate)
    except (ValueError, TypeError):  # an unknown gate: refused above
        return []
    problems = []
    try:
        resolve_input_parameters(resolved, options)
    except (TypeError, ValueError) as error:
        problems.append(f"gate_{error}")
    if resolved.reads_inputs and args.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r}: gate={gate!r} defines its "
                        "own ratio; only 'token' applies")
    if resolved.whole_rows and args.use_bias_correction_kl and args.beta != 0:
        problems.append(f"use_bias_correction_kl: gate={gate!r} has no token ratio to correct the KL with")
    return problems


ESTR_OPTIONS = ("estr_threshold", "estr_epsilon")
"""The entropy-scaled trust region's options (``gate_`` prefixed here), checked by the core."""


def _estr_problems(args: GatedGRPOConfig, gate: str) -> list[str]:
    try:
        resolved = get_gate(gate)
    except (ValueError, TypeError):  # an unknown gate: refused above
        return []
    options = LossOptions(gate=resolved, estr_threshold=args.gate_estr_threshold,
                          estr_epsilon=args.gate_estr_epsilon,
                          importance_sampling_level=args.importance_sampling_level)
    try:
        options.check_estr(resolved)
    except (TypeError, ValueError) as error:
        return [f"gate_{error}"]
    return []


def _has_temperature(gate: str) -> bool:
    try:
        return get_gate(gate).has_temperature
    except (ValueError, TypeError):  # an unknown gate: refused above
        return False


def _adaptive_problems(args: GatedGRPOConfig) -> list[str]:
    settings = {name: getattr(args, name) for name in ("gate_eur_rate", "gate_tau_min", "gate_tau_max")}
    if args.gate_eur_target is None:
        return [f"{name} is set without gate_eur_target" for name, value in settings.items() if value is not None]
    problems = _number_problem("gate_eur_target", args.gate_eur_target, maximum=1.0)
    for name, value in settings.items():
        if value is not None:
            problems += _number_problem(name, value)
    if not problems and None not in (args.gate_tau_min, args.gate_tau_max) and args.gate_tau_min >= args.gate_tau_max:
        problems.append(f"gate_tau_min ({args.gate_tau_min}) must be < gate_tau_max ({args.gate_tau_max})")
    return problems



def _support_problems(args: GatedGRPOConfig) -> list[str]:
    if args.logprob_support not in LOGPROB_SUPPORTS:
        return [f"logprob_support={args.logprob_support!r}; choose one of {', '.join(LOGPROB_SUPPORTS)}"]
    if args.logprob_support == "full":
        return []
    problems = []
    if not sampler_truncation(args):
        problems.append("logprob_support='sampler' needs truncated sampling (top_k > 0, top_p < 1 or min_p > 0): "
                        "without it the support is the whole vocabulary")
    if isinstance(args.sampler_kept_bound, bool) or not isinstance(args.sampler_kept_bound, int) \
            or args.sampler_kept_bound <= 0:
        problems.append(f"sampler_kept_bound: must be a positive int, got {args.sampler_kept_bound!r}")
    return problems
