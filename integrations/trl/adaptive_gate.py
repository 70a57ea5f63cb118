"""Adaptive gate temperature: after each optimiser step, scale both temperatures so that the off-policy EUR
approaches a target.

Why it can work. Every soft gate has the form f'(r) = phi(tau (r - 1)) with phi(0) = 1 and phi decreasing in |x|
(sigmoid 4 s(x) s(-x), erf exp(-x^2/2), arctan 1/(1+x^2), softsign (1+x^2)^(-3/2)). At fixed ratios, raising tau
therefore lowers every token's f'(r) and the Effective Update Ratio (paper eq. 12) with it; lowering tau raises it
towards 1. On-policy updates (ratio exactly 1) have EUR = 1 whatever tau is, so only the off-policy updates (the
second and later updates on a batch) tell the controller anything.

The update rule, once per optimiser step with the step's off-policy EUR ``e`` and the target ``e*``::

    s      <- clamp(s + clamp(rate * (e - e*) / (2 (1 - e*)), -max_step, max_step), s_min, s_max)
    tau_pos = tau_pos_0 exp(s),  tau_neg = tau_neg_0 exp(s)

* Both temperatures move by the same factor, so tau_neg / tau_pos stays what the user chose (the paper recommends
  tau_neg > tau_pos: negative-advantage tokens are gated more tightly).
* log tau, because tau acts only through the product tau |r - 1|: a multiplicative change means the same at
  tau = 1 as at tau = 20, and a controller in log tau keeps tau > 0 by construction.
* The gain: near r = 1 each gate is f'(r) ~ 1 - c tau^2 (r - 1)^2 (c = 1/4, 1/2, 1, 3/2 for sigmoid, erf, arctan,
  softsign), so 1 - EUR ~ c tau^2 E[(r - 1)^2] and log(1 - EUR) moves by 2 per unit of log tau. The full correction
  is d log tau = (log(1 - e*) - log(1 - e)) / 2 ~ (e - e*) / (2 (1 - e*)) near the target; ``rate`` in (0, 1] is the
  fraction of it taken per step (the per-step EUR is noisy: a small rate averages it). The error is written in EUR
  itself rather than its logarithm, so the controller's fixed point is the *arithmetic* mean EUR at the target
  (integral action on the quantity the target is set for).
* EUR above the target -> tau grows (tighter gate); below -> tau shrinks. ``max_step`` caps one step's change of
  log tau, ``[tau_min, tau_max]`` bounds both temperatures. Defaults: rate 0.25, max_step log 2, bounds [0.1, 1000]
  (on the offline default tau settles at 150-400 for a target of 0.8: its ratios stay within a few per cent of 1).

The controller is deterministic (a function of the EUR sequence) and restartable: :meth:`state_dict` /
:meth:`load_state_dict`. :class:`AdaptiveGateCallback` drives it from a ``GatedGRPOTrainer`` and saves its state in
``trainer_state.json`` with every checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from fused_gates import SOFT_GATES, get_gate
from fused_gates.validation import check_number

__all__ = [
    "DEFAULT_MAX_STEP",
    "DEFAULT_RATE",
    "DEFAULT_TAU_MAX",
    "DEFAULT_TAU_MIN",
    "AdaptiveGateCallback",
    "EURTemperatureController",
    "check_can_adapt",
]

DEFAULT_RATE = 0.25
DEFAULT_TAU_MIN = 0.1
DEFAULT_TAU_MAX = 1000.0
DEFAULT_MAX_STEP = math.log(2.0)  # at most a doubling or halving of tau per optimiser step
# EUR is a float32 mean of values in [0, 1]; allow its rounding, refuse anything else.
_EUR_SLACK = 1e-5


class EURTemperatureController:
    """Scales ``(tau_pos, tau_neg)`` by a common factor, in log space, so that the off-policy EUR approaches
    ``target`` (update rule in the module docstring).

    Args:
        target: the EUR to reach, in (0, 1).
        tau_pos, tau_neg: the starting temperatures (> 0, within the bounds); their ratio is kept.
        rate: fraction of the model-predicted full correction taken per step, in (0, 1].
        tau_min, tau_max: bounds for both temperatures, 0 < tau_min < tau_max.
        max_step: largest change of log tau in one step (> 0).
    """

    def __init__(self, target: float, tau_pos: float, tau_neg: float, *, rate: float = DEFAULT_RATE,
                 tau_min: float = DEFAULT_TAU_MIN, tau_max: float = DEFAULT_TAU_MAX,
                 max_step: float = DEFAULT_MAX_STEP) -> None:
        self.target = check_number("target", target, maximum=1.0, allow_maximum=False)  # the EUR to reach
        self.rate = check_number("rate", rate, maximum=1.0)
        self.max_step = check_number("max_step", max_step)
        self.tau_min, self.tau_max = check_number("tau_min", tau_min), check_number("tau_max", tau_max)
        if not self.tau_min < self.tau_max:
            raise ValueError(f"tau_min and tau_max must satisfy 0 < tau_min < tau_max, got {tau_min}, {tau_max}")
        self.base_tau_pos, self.base_tau_neg = check_number("tau_pos", tau_pos), check_number("tau_neg", tau_neg)
        for name, value in (("tau_pos", self.base_tau_pos), ("tau_neg", self.base_tau_neg)):
            if not self.tau_min <= value <= self.tau_max:
                raise ValueError(f"{name} = {value} lies outside [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}]")
        # s = log(tau / tau_0) is bounded so that both temperatures stay within [tau_min, tau_max].
        self._log_scale_min = math.log(self.tau_min / min(self.base_tau_pos, self.base_tau_neg))
        self._log_scale_max = math.log(self.tau_max / max(self.base_tau_pos, self.base_tau_neg))
        self.log_scale = 0.0
        self.updates = 0  # steps that carried an off-policy EUR

    @property
    def tau_pos(self) -> float:
        return self.base_tau_pos * math.exp(self.log_scale)

    @property
    def tau_neg(self) -> float:
        return self.base_tau_neg * math.exp(self.log_scale)

    def update(self, off_policy_eur: float | None) -> tuple[float, float]:
        """One optimiser step: ``off_policy_eur`` is the step's EUR over its off-policy tokens (``None``: the step had
        none, nothing changes). Returns the new ``(tau_pos, tau_neg)``."""
        if off_policy_eur is None:
            return self.tau_pos, self.tau_neg
        eur = check_number("off_policy_eur", off_policy_eur, minimum=-_EUR_SLACK, allow_minimum=True,
                           maximum=1.0 + _EUR_SLACK)
        step = self.rate * (min(max(eur, 0.0), 1.0) - self.target) / (2.0 * (1.0 - self.target))
        step = min(max(step, -self.max_step), self.max_step)
        self.log_scale = min(max(self.log_scale + step, self._log_scale_min), self._log_scale_max)
        self.updates += 1
        return self.tau_pos, self.tau_neg

    def state_dict(self) -> dict[str, float | int]:
        """What a restart needs: the current temperatures and the number of updates (JSON-serialisable)."""
        return {"tau_pos": self.tau_pos, "tau_neg": self.tau_neg, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; the saved temperatures must have this controller's ratio and bounds."""
        missing = {"tau_pos", "tau_neg", "updates"} - set(state)
        if missing:
            raise ValueError(f"controller state lacks {', '.join(sorted(missing))}")
        tau_pos = check_number("state['tau_pos']", state["tau_pos"])
        tau_neg = check_number("state['tau_neg']", state["tau_neg"])
        ratio, saved_ratio = self.base_tau_neg / self.base_tau_pos, tau_neg / tau_pos
        if not math.isclose(ratio, saved_ratio, rel_tol=1e-9):
            raise ValueError(f"saved temperatures have tau_neg / tau_pos = {saved_ratio:g}; this controller keeps "
                             f"{ratio:g} (tau_pos={self.base_tau_pos}, tau_neg={self.base_tau_neg})")
        log_scale = math.log(tau_pos / self.base_tau_pos)
        slack = 1e-12
        if not self._log_scale_min - slack <= log_scale <= self._log_scale_max + slack:
            raise ValueError(f"saved temperatures ({tau_pos:g}, {tau_neg:g}) lie outside [tau_min, tau_max] = "
                             f"[{self.tau_min}, {self.tau_max}]")
        self.log_scale = min(max(log_scale, self._log_scale_min), self._log_scale_max)
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (f"EURTemperatureController(target={self.target}, tau_pos={self.tau_pos:.4g}, "
                f"tau_neg={self.tau_neg:.4g}, rate={self.rate}, updates={self.updates})")


# ----------------------------------------------------------------------------------------------------------------------
# Where the controller can act


# Ratios on both sides of 1 and temperatures across the controller's default range: a custom gate qualifies when
# its f'(r) does not rise with tau at any of them and falls somewhere.
_PROBE_RATIOS = (0.25, 0.5, 0.8, 0.95, 0.99, 1.01, 1.05, 1.25, 2.0, 4.0)
_PROBE_TAUS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def check_can_adapt(gate: str, has_off_policy_updates: bool) -> None:
    """Raises ``ValueError`` where an EUR-driven temperature cannot act; returns ``None`` where it can.

    * ``gate="clip"`` has no temperature (its EUR is set by epsilon);
    * a custom gate qualifies only when its f'(r) falls as tau rises (checked on a grid of ratios and temperatures):
      otherwise moving tau would not move EUR the way the controller assumes;
    * without off-policy updates (a batch is trained on only before any optimiser step has changed the policy:
      ``num_iterations == 1`` and each generation batch used within one optimiser step) every ratio is exactly 1,
      EUR is 1 whatever tau is, and there is nothing to control. A sampler's importance-sampling correction does not
      change that: it weights the policy term, the gate still sees a ratio of 1.
    """
    try:
        resolved = get_gate(gate)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"adaptive gate temperature: {error}") from None
    if not resolved.has_temperature:
        raise ValueError(f"adaptive gate temperature (gate_eur_target) needs a gate with a temperature; "
                         f"gate={resolved.name!r} has none: use sigmoid, erf, arctan, softsign or a registered "
                         "soft gate")
    if resolved.reads_inputs:
        raise ValueError(f"adaptive gate temperature (gate_eur_target) adapts gates of (r, tau); gate="
                         f"{resolved.name!r} reads the token's other inputs too")
    if resolved.name not in SOFT_GATES:  # the built-in soft gates qualify by construction
        _check_derivative_falls_with_tau(resolved)
    if not has_off_policy_updates:
        raise ValueError("adaptive gate temperature (gate_eur_target) needs off-policy updates: with num_iterations=1 "
                         "and each generation batch used within one optimiser step every ratio is exactly 1, so EUR "
                         "is 1 whatever the temperature; set num_iterations >= 2")


def _check_derivative_falls_with_tau(gate: Any) -> None:
    import torch

    ratio = torch.tensor(_PROBE_RATIOS, dtype=torch.float64)
    with torch.no_grad():
        rows = [gate.derivative(ratio, torch.full_like(ratio, tau)) for tau in _PROBE_TAUS]
    derivatives = torch.stack(rows)  # [tau, ratio]
    rises = (derivatives[1:] > derivatives[:-1] + 1e-9).nonzero()
    if len(rises) or not bool(torch.isfinite(derivatives).all()) or not bool((derivatives[-1] < derivatives[0]).any()):
        where = ""
        if len(rises):
            tau_index, ratio_index = rises[0].tolist()
            where = (f" (f'({_PROBE_RATIOS[ratio_index]}) rises from tau={_PROBE_TAUS[tau_index]} to "
                     f"tau={_PROBE_TAUS[tau_index + 1]})")
        raise ValueError(f"adaptive gate temperature: gate {gate.name!r}'s derivative does not fall as tau rises"
                         f"{where}, so moving tau would not move EUR the way the controller assumes")


# ----------------------------------------------------------------------------------------------------------------------
# Trainer callback


class GateTemperatureTrainer(Protocol):
    """What :class:`AdaptiveGateCallback` needs from the trainer (``GatedGRPOTrainer`` provides it)."""

    def pop_off_policy_eur(self) -> float | None: ...

    def set_gate_temperatures(self, tau_pos: float, tau_neg: float) -> None: ...


# The controller's keyword -> the GatedGRPOConfig field that sets it (unset fields keep the controller's default).
CONFIG_FIELDS = {"rate": "gate_eur_rate", "tau_min": "gate_tau_min", "tau_max": "gate_tau_max"}


class AdaptiveGateCallback(TrainerCallback, ExportableState):
    """Drives an :class:`EURTemperatureController` from a trainer, once per optimiser step.

    ``on_step_end`` takes the step's off-policy EUR (``trainer.pop_off_policy_eur()``), records the temperatures the
    step trained with as ``gate/tau_pos`` and ``gate/tau_neg`` (logged with the step's other metrics), updates the
    controller and hands the new temperatures to ``trainer.set_gate_temperatures``.

    The controller's state is saved in ``trainer_state.json`` with each checkpoint (``ExportableState``) and restored
    on resume by ``on_train_begin`` from the resumed state, so transformers' ``restore_callback_states_from_checkpoint``
    is not needed (leave it off: it rebuilds callbacks from JSON arguments, which cannot hold the trainer).
    """

    def __init__(self, trainer: GateTemperatureTrainer | None = None, *,
                 controller: EURTemperatureController | None = None) -> None:
        self.trainer = trainer
        if controller is None and trainer is not None:
            args = trainer.args
            options = {keyword: getattr(args, field) for keyword, field in CONFIG_FIELDS.items()
                       if getattr(args, field, None) is not None}
            controller = EURTemperatureController(args.gate_eur_target, args.gate_tau_pos, args.gate_tau_neg,
                                                  **options)
        self.controller = controller

    def _attached(self) -> tuple[GateTemperatureTrainer, EURTemperatureController]:
        if self.trainer is None or self.controller is None:
            raise RuntimeError("AdaptiveGateCallback has no trainer: it was rebuilt from a checkpoint's JSON "
                               "(restore_callback_states_from_checkpoint=True); leave that option off, the callback "
                               "restores its own state on resume")
        return self.trainer, self.controller

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"controller": None if self.controller is None
                                           else self.controller.state_dict()}}

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, controller = self._attached()
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several callbacks of this class: transformers keeps a list
            saved = saved[0] if saved else None
        saved_controller = (saved or {}).get("attributes", {}).get("controller")
        if saved_controller is not None:  # on a fresh run this is the controller's own initial state
            controller.load_state_dict(saved_controller)
        trainer.set_gate_temperatures(controller.tau_pos, controller.tau_neg)

    def on_step_end(self, args, state, control, **kwargs):
        trainer, controller = self._attached()
        metrics = getattr(trainer, "_metrics", None)
        if metrics is not None:
            # the temperatures this step trained with, next to the EUR they produced
            metrics["train"]["gate/tau_pos"].append(controller.tau_pos)
            metrics["train"]["gate/tau_neg"].append(controller.tau_neg)
        tau_pos, tau_neg = controller.update(trainer.pop_off_policy_eur())
        trainer.set_gate_temperatures(tau_pos, tau_neg)
