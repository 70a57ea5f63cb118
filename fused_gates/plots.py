"""The paper's figures: the gates and their derivatives (Figure 1) and training curves of runs (Figures 2-5).

Each figure is built in two steps, so that what is drawn can be checked without reading pixels: a function returns
the plotted data (:func:`gate_curves`, :func:`run_curves`), and a renderer draws it (:func:`render_gates`,
:func:`render_runs`). matplotlib is imported by the renderers only.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .gates import INPUT_GATES, PAPER_GATES, GateParameters, available_gates, get_gate

__all__ = [
    "RUN_METRICS",
    "Curve",
    "GateCurve",
    "RunLog",
    "gate_curves",
    "is_on_policy",
    "load_run",
    "metric_points",
    "metric_series",
    "moving_average",
    "off_policy_eur",
    "pyplot",
    "read_metrics_csv",
    "render_gates",
    "render_runs",
    "run_curves",
    "run_label",
    "save_figure",
]

DEFAULT_TAUS: tuple[float, ...] = (1.0, 5.0, 10.0)  # Figure 1's temperatures

# ----------------------------------------------------------------------------------------------------------------------
# Figure 1: gates and derivatives


@dataclass(frozen=True)
class GateCurve:
    """One line of Figure 1: ``f(r)`` and ``f'(r)`` of ``gate`` on the ratio grid ``ratio``."""

    gate: str
    label: str  # the legend entry: "tau = 5", or the advantage's sign for clip
    ratio: list[float]
    value: list[float]
    derivative: list[float]

    def at(self, r: float) -> tuple[float, float]:
        """``(f(r), f'(r))`` at a grid point."""
        index = self.ratio.index(r)
        return self.value[index], self.derivative[index]


def ratio_grid(r_max: float = 3.0, points: int = 600) -> torch.Tensor:
    """``points`` evenly spaced ratios on ``(0, r_max]``, with ``r = 1`` always on the grid (the peak of ``f'``)."""
    grid = torch.linspace(0.0, r_max, points + 1, dtype=torch.float64)[1:]
    return torch.unique(torch.cat([grid, torch.ones(1, dtype=torch.float64)]))


def gate_curves(
    gates: Sequence[str] | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    *,
    epsilon: float = 0.2,
    r_max: float = 3.0,
    points: int = 600,
) -> dict[str, list[GateCurve]]:
    """Figure 1's data: for each gate (default: every registered gate), one curve per temperature.

    Soft gates are drawn for a positive advantage with ``tau_pos = tau_neg = tau``. Clip has no temperature: it gets
    one curve per sign of the advantage (``min(r, 1 + eps)`` for ``A > 0``, ``max(r, 1 - eps)`` for ``A < 0``).
    Values come from the registered gate itself (:meth:`Gate.evaluate`), so the figure shows what the loss uses.
    """
    ratio = ratio_grid(r_max, points)
    names = list(gates) if gates is not None else _paper_order(available_gates())
    curves: dict[str, list[GateCurve]] = {}
    for name in names:
        gate = get_gate(name)
        if gate.is_clip:
            params = GateParameters(epsilon_low=epsilon, epsilon_high=epsilon)
            settings = [(f"A > 0 (eps {epsilon:g})", 1.0, params), (f"A < 0 (eps {epsilon:g})", -1.0, params)]
        else:
            settings = [(f"tau = {tau:g}", 1.0, GateParameters(tau_pos=tau, tau_neg=tau)) for tau in taus]
        curves[name] = [_gate_curve(gate, label, ratio, sign, params) for label, sign, params in settings]
    return curves


def _paper_order(names: Sequence[str]) -> list[str]:
    # The built-in gates in the paper's order, then registered ones by name.
    return [name for name in PAPER_GATES if name in names] + sorted(set(names) - set(PAPER_GATES))


def _gate_curve(gate, label: str, ratio: torch.Tensor, sign: float, params: GateParameters) -> GateCurve:
    with torch.no_grad():
        value, derivative = gate.evaluate(ratio, torch.full_like(ratio, sign), params)
    return GateCurve(gate.name, label, ratio.tolist(), value.tolist(), derivative.tolist())


def render_gates(curves: dict[str, list[GateCurve]], path: str | Path, *, dpi: int = 110) -> Path:
    """Top row ``f(r)``, bottom row ``f'(r)``, one column per gate, one line per temperature."""
    plt = pyplot()
    columns = len(curves)
    figure, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6), sharex=True, squeeze=False)
    for column, (name, lines) in enumerate(curves.items()):
        top, bottom = axes[0][column], axes[1][column]
        for curve in lines:
            top.plot(curve.ratio, curve.value, label=curve.label)
            bottom.plot(curve.ratio, curve.derivative, label=curve.label)
        top.set_title(name)
        bottom.set_xlabel("r")
        for axis in (top, bottom):
            axis.axvline(1.0, color="grey", linewidth=0.6, linestyle=":")
            axis.grid(alpha=0.3)
        top.legend(fontsize=8)
    axes[0][0].set_ylabel("f(r)")
    axes[1][0].set_ylabel("f'(r)")
    figure.tight_layout()
    return save_figure(figure, path, dpi)


# ----------------------------------------------------------------------------------------------------------------------
# Figures 2-5: training runs

# (panel title, logged key) of the run figure
RUN_METRICS: tuple[tuple[str, str], ...] = (("reward", "reward"), ("entropy", "entropy"), ("EUR", "eur"))
TAU_METRIC = ("gate tau_pos (adaptive)", "gate/tau_pos")  # drawn when a run logged it
RUN_CONFIG_FILES = ("run_config.json",)


@dataclass(frozen=True)
class RunLog:
    """The per-step logs of one training run and the label it gets in a legend."""

    path: Path
    label: str
    rows: list[dict[str, float]]


@dataclass(frozen=True)
class Curve:
    """One line of a run figure: the smoothed ``y`` against ``step``."""

    label: str
    step: list[float]
    y: list[float]


def load_run(folder: str | Path) -> RunLog:
    """A run's per-step logs: the training script's ``metrics.csv``, else TRL's ``trainer_state.json``.

    ``trainer_state.json`` is looked for in the folder and in its newest ``checkpoint-*`` sub-folder.
    """
    folder = Path(folder)
    if (folder / "metrics.csv").is_file():
        rows = read_metrics_csv(folder / "metrics.csv")
    elif (state := _trainer_state(folder)) is not None:
        rows = _read_trainer_state(state)
    else:
        raise FileNotFoundError(f"{folder}: neither metrics.csv nor trainer_state.json found")
    return RunLog(folder, run_label(folder), rows)


def read_metrics_csv(path: str | Path, *, up_to_step: float | None = None) -> list[dict[str, float]]:
    """The rows of a training run's ``metrics.csv`` (numbers as written: integers stay ints), only those up to
    ``up_to_step`` when given. Empty cells are metrics not logged at that step (rewards on steps that reuse a batch)."""
    with Path(path).open(newline="") as handle:
        rows = [{key: _number(text) for key, text in row.items() if text not in ("", None)}
                for row in csv.DictReader(handle)]
    return [row for row in rows if up_to_step is None or row["step"] <= up_to_step]


def _number(text: str) -> float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _trainer_state(folder: Path) -> Path | None:
    if (folder / "trainer_state.json").is_file():
        return folder / "trainer_state.json"
    checkpoints = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def _read_trainer_state(path: Path) -> list[dict[str, float]]:
    history = json.loads(path.read_text())["log_history"]
    # Training-step entries carry the loss; the final summary (train_runtime, ...) and eval entries are left out.
    return [{key: float(value) for key, value in entry.items() if isinstance(value, int | float)}
            for entry in history if "loss" in entry and "train_runtime" not in entry]


def run_label(folder: str | Path) -> str:
    """Gate and temperatures (or clip's epsilon) from the run's ``run_config.json``; the folder's name otherwise.

    ``run_config.json`` is the training script's resolved configuration (``--dry-run``'s JSON, whose
    ``settings`` hold ``gate``, ``tau_pos``, ``tau_neg``, ``epsilon``) or a flat dict with those keys.
    """
    folder = Path(folder)
    for name in RUN_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            return describe_gate(config.get("settings", config)) or folder.name
    return folder.name


def describe_gate(settings: dict[str, Any]) -> str | None:
    """``"erf (tau+ 10, tau- 12)"``, ``"clip (eps 0.2)"``, ``"erf (tau+ 10, tau- 12, adapted to EUR 0.8)"`` (starting
    temperatures), ``"clip (eps 0.2) in ESTR (tau 0.04)"`` (the entropy-scaled trust region); ``None`` when
    ``settings`` names no gate."""
    label = _describe_gate(settings)
    threshold = settings.get("estr_threshold")
    if label is None or threshold is None:
        return label
    epsilon = settings.get("estr_epsilon")
    return f"{label} in ESTR (tau {threshold:g}{'' if epsilon is None else f', eps {epsilon:g}'})"


def _describe_gate(settings: dict[str, Any]) -> str | None:
    gate = settings.get("gate")
    if not gate:
        return None
    if gate == "clip":
        epsilon = settings.get("epsilon", 0.2)
        high = settings.get("epsilon_high")
        return f"clip (eps {epsilon:g})" if high in (None, epsilon) else f"clip (eps {epsilon:g} / {high:g})"
    if gate in INPUT_GATES:  # no temperature: the options given (None: the paper's defaults)
        given = [f"{name} {settings[name]:g}" for name in ("dppo_delta", "m2po_threshold", "bapo_rho",
                                                           "aspo_dual_clip", "gmpo_epsilon")
                 if settings.get(name) is not None]
        return f"{gate} ({', '.join(given) if given else 'paper defaults'})"
    label = f"{gate} (tau+ {settings.get('tau_pos', 1.0):g}, tau- {settings.get('tau_neg', 1.05):g}"
    if settings.get("eur_target") is not None:
        label += f", adapted to EUR {settings['eur_target']:g}"
    return label + ")"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: point ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    The first ``window - 1`` points average the fewer values available, so the curve starts at the first step.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    smoothed, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        smoothed.append(total / min(index + 1, window))
    return smoothed


def is_on_policy(row: dict[str, float]) -> bool:
    """Whether every ratio of the step was exactly 1 (the first update on a fresh batch).

    EUR is 1 there for every gate by construction, so EUR curves leave such steps out: with two updates per batch
    they would otherwise alternate between 1 and the informative value.
    """
    return row.get("ratio/min") == 1.0 and row.get("ratio/max") == 1.0


def off_policy_eur(row: dict[str, Any]) -> float | None:
    """The EUR of a logged step's off-policy updates; ``None`` when the step had none.

    ``eur/off_policy`` when the trainer logs it (the token-weighted EUR of the step's off-policy micro-batches; a
    step that logs ``eur/on_policy`` but no off-policy value had none). Otherwise the step's ``eur``, unless every
    ratio of the step was exactly 1 (:func:`is_on_policy`).
    """
    value = row.get("eur/off_policy")
    if value is not None:
        return float(value) if math.isfinite(value) else None
    if "eur/on_policy" in row:
        return None
    value = row.get("eur")
    if value is None or not math.isfinite(value) or is_on_policy(row):
        return None
    return float(value)


def metric_points(rows: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of the logged rows that hold a finite number under ``key``, in row order; ``"eur"`` is the
    off-policy EUR (:func:`off_policy_eur`). The one reading of a series from logged rows (figures, run reports,
    the toy study's tables)."""
    points = []
    for row in rows:
        value = off_policy_eur(row) if key == "eur" else row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points.append((float(row["step"]), float(value)))
    return points


def metric_series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """:func:`metric_points` as ``(steps, values)``."""
    points = metric_points(rows, key)
    return [step for step, _ in points], [value for _, value in points]


def run_curves(runs: Sequence[RunLog], window: int = 1,
               metrics: Sequence[tuple[str, str]] | None = None) -> dict[str, list[Curve]]:
    """For each metric title, one smoothed curve per run (moving average over ``window`` logged values).

    ``metrics`` defaults to :data:`RUN_METRICS`, plus the adaptive temperature when any run logged it."""
    if metrics is None:
        adaptive = any(TAU_METRIC[1] in row for run in runs for row in run.rows)
        metrics = (*RUN_METRICS, TAU_METRIC) if adaptive else RUN_METRICS
    labels = _unique_labels(runs)
    curves: dict[str, list[Curve]] = {}
    for title, key in metrics:
        curves[title] = []
        for run, label in zip(runs, labels, strict=True):
            steps, values = metric_series(run.rows, key)
            if steps:
                curves[title].append(Curve(label, steps, moving_average(values, window)))
    return curves


def _unique_labels(runs: Sequence[RunLog]) -> list[str]:
    # Runs of the same gate (seeds) would share a legend entry; their folder names tell them apart.
    labels = [run.label for run in runs]
    return [f"{label} [{run.path.name}]" if labels.count(label) > 1 and label != run.path.name else label
            for run, label in zip(runs, labels, strict=True)]


def render_runs(curves: dict[str, list[Curve]], path: str | Path, *, window: int = 1, dpi: int = 110) -> Path:
    """One panel per metric against the step; the smoothing window is stated in the title."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], curves.items(), strict=True):
        for curve in lines:
            axis.plot(curve.step, curve.y, label=curve.label)
        axis.set_title(title + (" (off-policy steps)" if title == "EUR" else ""))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    smoothing = "no smoothing" if window == 1 else f"moving average over {window} logged values"
    figure.suptitle(f"training runs ({smoothing})")
    figure.tight_layout()
    return save_figure(figure, path, dpi)


# ----------------------------------------------------------------------------------------------------------------------
# matplotlib


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
