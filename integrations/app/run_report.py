"""What a training run reports: the per-step metrics it collects, the table it prints while training, and the
``metrics.csv`` / ``metrics.png`` / summary lines it leaves behind.

The table is the progress display: one line per logged step with ``step/max_steps``, elapsed time and the estimated
time left, printed as ordinary lines (nothing is redrawn in place, so library warnings cannot overwrite it and a log
file reads like the terminal).

EUR is reported for the off-policy updates only (:func:`fused_gates.plots.off_policy_eur`): on the first update of
a freshly generated batch every ratio is exactly 1 and EUR is 1 for every gate, so a mixed curve zig-zags between 1
and the informative value. The figure draws the on-policy EUR separately where the trainer logs it.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fused_gates.plots import metric_points, metric_series, off_policy_eur, read_metrics_csv

__all__ = [
    "ANSWER_REWARD",
    "FORMAT_REWARD",
    "MetricsFile",
    "StepMetricsCallback",
    "TableCallback",
    "WindowMeans",
    "mean_off_policy_eur",
    "read_metrics_csv",
    "window_means",
    "write_metrics_csv",
    "write_metrics_plot",
]

FORMAT_REWARD = "rewards/format_reward/mean"  # TRL names each reward's mean after its function
ANSWER_REWARD = "rewards/answer_reward/mean"
TAU_KEYS = ("gate/tau_pos", "gate/tau_neg")
# Leading columns of metrics.csv (those logged), then every other metric in name order.
CSV_LEADING = ("step", "reward", FORMAT_REWARD, ANSWER_REWARD, "eur", "eur/off_policy", "eur/on_policy", "entropy",
               "gate/mean", *TAU_KEYS)


class StepMetricsCallback(TrainerCallback):
    """Collects the metrics the trainer logs at each training step (one dict per logging step, with ``step``).

    With ``num_iterations`` > 1 a batch is generated (and its rewards logged) only every ``num_iterations`` steps;
    the steps in between reuse it and log the loss-side metrics (ratio, gate, EUR, entropy) alone.
    """

    def __init__(self, rows: Sequence[dict[str, float]] = (), file: MetricsFile | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows)  # a resumed run starts with the rows logged before
        self.file = file  # the main process's metrics.csv, written as the run goes

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training-step logs carry the loss; the end-of-training summary (train_runtime, ...) is left out.
        if logs and "loss" in logs and "train_runtime" not in logs:
            row = {"step": state.global_step}
            row.update({key: value for key, value in logs.items()
                        if isinstance(value, int | float) and not isinstance(value, bool)})
            self.rows.append(row)
            if self.file is not None:
                self.file.append(row)


class MetricsFile:
    """``metrics.csv`` written as the run goes: each logged row is appended and flushed at once, so an interrupted or
    crashed run keeps every logged step. A row with a metric the header lacks rewrites the file with the wider header
    (the first steps only: rewards appear with the first generated batch)."""

    def __init__(self, path: str | Path, rows: Sequence[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.rows = list(rows)
        self.columns: list[str] = []
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if set(row) - set(self.columns):
            self._rewrite()
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, restval="").writerow(_cells(row))
            handle.flush()

    def _rewrite(self) -> None:
        self.columns = metrics_columns(self.rows)
        temporary = self.path.with_name(self.path.name + ".tmp")
        write_metrics_csv(self.rows, temporary)
        temporary.replace(self.path)  # atomic: a reader (or a crash) sees the old file or the new one


# ----------------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Column:
    title: str
    key: str  # logged key, or "off_policy_eur"
    width: int = 8


TABLE_COLUMNS = (
    Column("reward", "reward"),
    Column("format", FORMAT_REWARD),
    Column("answer", ANSWER_REWARD),
    Column("EUR off", "off_policy_eur"),
    Column("entropy", "entropy"),
    Column("gate mean", "gate/mean", 9),
)
TAU_COLUMNS = (Column("tau+", "gate/tau_pos"), Column("tau-", "gate/tau_neg"))


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class TableCallback(TrainerCallback):
    """Prints one table line per logged step, with the run's progress in its first three columns."""

    def __init__(self, collector: StepMetricsCallback, *, adaptive: bool = False) -> None:
        self.collector = collector
        self.columns = TABLE_COLUMNS + (TAU_COLUMNS if adaptive else ())
        self.printed = len(collector.rows)  # a resumed run's earlier rows were printed by the run that logged them
        self.start = 0.0
        self.max_steps = 0
        self.active = False

    def header(self) -> str:
        progress = f"{'step':>{self._step_width()}}  {'elapsed':>7}  {'left':>6}"
        return "  ".join([progress, *(column.title.rjust(column.width) for column in self.columns)])

    def _step_width(self) -> int:
        return max(4, 2 * len(str(self.max_steps)) + 1)

    def line(self, row: dict[str, Any], elapsed: float) -> str:
        step = int(row["step"])
        left = elapsed / step * (self.max_steps - step) if step else math.nan
        cells = [f"{step}/{self.max_steps}".rjust(self._step_width()), _clock(elapsed).rjust(7),
                 (_clock(left) if math.isfinite(left) else "-").rjust(6)]
        for column in self.columns:
            value = off_policy_eur(row) if column.key == "off_policy_eur" else row.get(column.key)
            cells.append(("-" if value is None else f"{value:.4f}").rjust(column.width))
        return "  ".join(cells)

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = state.is_world_process_zero
        self.start = time.perf_counter()
        self.max_steps = state.max_steps
        if self.active:
            print(self.header(), flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Runs after the collector (callbacks run in the order they were added).
        if not self.active:
            return
        elapsed = time.perf_counter() - self.start
        for row in self.collector.rows[self.printed :]:
            print(self.line(row, elapsed), flush=True)
        self.printed = len(self.collector.rows)


# ----------------------------------------------------------------------------------------------------------------------
# metrics.csv and metrics.png


def metrics_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The leading columns (those logged) first, then every other metric in name order."""
    present = {key for row in rows for key in row}
    leading = [key for key in CSV_LEADING if key in present or key in ("step", "reward")]
    return leading + sorted(present - set(leading))


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if not (isinstance(value, float) and math.isnan(value))}


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per logged step, in the columns of :func:`metrics_columns`."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=metrics_columns(rows), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(_cells(row))
    return path


def write_metrics_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                       eur_target: float | None = None) -> Path:
    """Rewards, EUR (off-policy, and on-policy where logged), entropy, and the gate temperatures (adaptive runs) or
    the ratio range, against the step."""
    from fused_gates.plots import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    rewards, eur, entropy, last = axes.flat
    marker = "." if len(rows) < 80 else None
    for label, key in (("reward", "reward"), ("format", FORMAT_REWARD), ("answer", ANSWER_REWARD)):
        steps, values = metric_series(rows, key)
        if steps:
            rewards.plot(steps, values, marker=marker, label=label)
    rewards.set_title("reward (format + answer)")
    rewards.legend(fontsize=8)

    steps, values = metric_series(rows, "eur")
    if steps:
        eur.plot(steps, values, marker=marker, label="off-policy updates")
    steps, values = metric_series(rows, "eur/on_policy")
    if steps:
        eur.plot(steps, values, color="grey", linewidth=0.8, label="on-policy updates")
    if eur_target is not None:
        eur.axhline(eur_target, color="black", linestyle="--", linewidth=0.8, label=f"target {eur_target:g}")
    eur.set_title("EUR")
    eur.legend(fontsize=8)

    steps, values = metric_series(rows, "entropy")
    entropy.plot(steps, values, marker=marker)
    entropy.set_title("entropy (nats)")

    if any(TAU_KEYS[0] in row for row in rows):
        for label, key in (("tau+", TAU_KEYS[0]), ("tau-", TAU_KEYS[1])):
            steps, values = metric_series(rows, key)
            last.plot(steps, values, label=label)
        last.set_yscale("log")
        last.set_title("gate temperatures (adapted)")
    else:
        for label, key in (("ratio max", "ratio/max"), ("ratio min", "ratio/min")):
            steps, values = metric_series(rows, key)
            if steps:
                last.plot(steps, values, label=label, marker=marker)
        last.set_title("importance ratio range")
    if last.lines:
        last.legend(fontsize=8)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path, 110)


# ----------------------------------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class WindowMeans:
    """Means of a logged metric over its first and last ``window`` logged values."""

    key: str
    first: float
    last: float
    first_count: int
    last_count: int

    def describe(self, name: str) -> str:
        if not self.first_count:
            return f"{name}: not logged"
        return (f"{name}: first {self.first_count} logged steps {self.first:.3f}, "
                f"last {self.last_count} {self.last:.3f}")


def window_means(rows: Sequence[dict[str, Any]], key: str, window: int = 10) -> WindowMeans:
    """Mean of ``key`` over the first and the last ``window`` steps that logged it."""
    _, values = metric_series(rows, key)
    if not values:
        return WindowMeans(key, math.nan, math.nan, 0, 0)
    first, last = values[:window], values[-window:]
    return WindowMeans(key, statistics.fmean(first), statistics.fmean(last), len(first), len(last))


def mean_off_policy_eur(rows: Sequence[dict[str, Any]], from_fraction: float = 0.0) -> float:
    """Mean off-policy EUR over the steps after ``from_fraction`` of the run (2/3: its last third); NaN if none."""
    if not rows:
        return math.nan
    last_step = max(row["step"] for row in rows)
    values = [value for step, value in metric_points(rows, "eur") if step > from_fraction * last_step]
    return statistics.fmean(values) if values else math.nan
