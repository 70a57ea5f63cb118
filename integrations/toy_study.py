"""A toy gate study: the training script's offline default for GRPO's clip and the four soft gates, several seeds.

    python -m fused_gates.integrations.toy_study --seeds 3 --out docs/toy-study

runs (sequentially, on CPU) clip with epsilon 0.2 and sigmoid, erf, arctan, softsign with tau_pos 10 / tau_neg 12,
each for seeds 0 .. N-1, in ``--runs-dir`` (default ``out/toy-study``; a run whose ``metrics.csv`` exists is not
rerun), then writes to ``--out``: ``runs.csv`` (the per-step metrics of every run, a few columns), ``summary.md``
(the per-gate table) and ``curves.png`` (reward and EUR against the step, mean over seeds).

Table columns, each a mean +- sample standard deviation over seeds (one value per seed first):

* final reward -- mean of the last ``--final-window`` logged rewards (one per generated batch);
* steps to format reward 0.25 -- first step at which the trailing moving average (``--smooth`` logged values) of the
  format reward reaches ``--format-threshold``; seeds that never reach it are counted and left out of the mean;
* mean EUR -- over the off-policy steps (the second update on each batch; on the first, EUR is 1 for every gate);
* final entropy -- mean of the last ``--final-window`` logged entropies.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fused_gates.plots import describe_gate, is_on_policy, load_run, moving_average

__all__ = ["STUDY_GATES", "GateSummary", "StudyGate", "format_summary", "main", "summarise"]


@dataclass(frozen=True)
class StudyGate:
    name: str
    flags: tuple[str, ...]  # the training script's flags for this gate


SOFT = ("--tau-pos", "10", "--tau-neg", "12")
STUDY_GATES: tuple[StudyGate, ...] = (
    StudyGate("clip", ("--gate", "clip", "--epsilon", "0.2")),
    StudyGate("sigmoid", ("--gate", "sigmoid", *SOFT)),
    StudyGate("erf", ("--gate", "erf", *SOFT)),
    StudyGate("arctan", ("--gate", "arctan", *SOFT)),
    StudyGate("softsign", ("--gate", "softsign", *SOFT)),
)

# Columns of runs.csv: (column, logged key)
RUN_COLUMNS = (
    ("reward", "reward"),
    ("format_reward", "rewards/format_reward/mean"),
    ("answer_reward", "rewards/answer_reward/mean"),
    ("eur", "eur"),
    ("entropy", "entropy"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Running


def run_one(gate: StudyGate, seed: int, runs_dir: Path) -> Path:
    """Trains one run with the offline preset (skipped when its ``metrics.csv`` exists); returns its folder."""
    from . import train_grpo

    folder = runs_dir / f"{gate.name}-seed{seed}"
    if (folder / "metrics.csv").is_file():
        return folder
    settings = train_grpo.resolve_settings([*gate.flags, "--seed", str(seed), "--output-dir", str(folder)])
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_grpo.train(settings)
    print(f"[toy study] {folder.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def collect_rows(folders: Sequence[tuple[str, int, Path]]) -> list[dict[str, float | str]]:
    """The long table of runs.csv: one row per (gate, seed, step) with the study's columns (empty: not logged)."""
    rows: list[dict[str, float | str]] = []
    for gate, seed, folder in folders:
        for logged in load_run(folder).rows:
            row: dict[str, float | str] = {"gate": gate, "seed": seed, "step": int(logged["step"])}
            for column, key in RUN_COLUMNS:
                value = logged.get(key, math.nan)
                # On-policy EUR is 1 for every gate; leaving it empty keeps runs.csv's EUR the informative one.
                row[column] = value if not (key == "eur" and is_on_policy(logged)) else math.nan
            rows.append(row)
    return rows


def write_rows(rows: Sequence[dict[str, float | str]], path: Path) -> Path:
    columns = ["gate", "seed", "step", *(column for column, _ in RUN_COLUMNS)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(row[key]) for key in columns})
    return path


def _csv_cell(value: float | str) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_rows(path: str | Path) -> list[dict[str, float | str]]:
    """runs.csv back as rows (empty cells as NaN)."""
    with Path(path).open(newline="") as handle:
        return [{key: value if key == "gate" else (float(value) if value else math.nan) for key, value in row.items()}
                for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls(math.nan, math.nan)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan)

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "-"
        return f"{self.mean:.{digits}f}" + ("" if math.isnan(self.std) else f" ± {self.std:.{digits}f}")


@dataclass(frozen=True)
class GateSummary:
    gate: str
    seeds: int
    final_reward: Stat
    steps_to_format: Stat
    reached_format: int  # seeds whose smoothed format reward reached the threshold
    mean_eur: Stat
    final_entropy: Stat


def _series(rows: Sequence[dict[str, float | str]], column: str) -> list[tuple[float, float]]:
    points = [(float(row["step"]), float(row[column])) for row in rows if not math.isnan(float(row[column]))]
    return sorted(points)


def _tail_mean(rows: Sequence[dict[str, float | str]], column: str, window: int) -> float:
    values = [value for _, value in _series(rows, column)][-window:]
    return statistics.fmean(values) if values else math.nan


def steps_to_threshold(points: Sequence[tuple[float, float]], threshold: float, window: int) -> float | None:
    """First step whose trailing moving average (over ``window`` logged values) reaches ``threshold``."""
    smoothed = moving_average([value for _, value in points], window)
    for (step, _), value in zip(points, smoothed, strict=True):
        if value >= threshold:
            return step
    return None


def summarise(
    rows: Sequence[dict[str, float | str]],
    *,
    final_window: int = 10,
    format_threshold: float = 0.25,
    smooth: int = 5,
) -> list[GateSummary]:
    """Per gate (in order of first appearance): the table's statistics over seeds (see the module docstring)."""
    summaries = []
    for gate in dict.fromkeys(str(row["gate"]) for row in rows):
        per_seed: dict[float, list[dict[str, float | str]]] = {}
        for row in rows:
            if row["gate"] == gate:
                per_seed.setdefault(float(row["seed"]), []).append(row)
        runs = list(per_seed.values())
        reached = [steps_to_threshold(_series(run, "format_reward"), format_threshold, smooth) for run in runs]
        summaries.append(GateSummary(
            gate=gate,
            seeds=len(runs),
            final_reward=Stat.of([_tail_mean(run, "reward", final_window) for run in runs]),
            steps_to_format=Stat.of([step for step in reached if step is not None]),
            reached_format=sum(step is not None for step in reached),
            mean_eur=Stat.of([_tail_mean(run, "eur", len(run)) for run in runs]),
            final_entropy=Stat.of([_tail_mean(run, "entropy", final_window) for run in runs]),
        ))
    return summaries


def format_summary(summaries: Sequence[GateSummary], *, final_window: int = 10, format_threshold: float = 0.25,
                   smooth: int = 5) -> str:
    """The markdown table of summary.md."""
    header = (f"| gate | seeds | final reward (last {final_window} logged) "
              f"| steps to format reward {format_threshold:g} (MA {smooth}) | seeds reaching it "
              f"| mean EUR (off-policy steps) | final entropy (last {final_window} logged) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for summary in summaries:
        steps = summary.steps_to_format.format(1)
        lines.append(f"| {summary.gate} | {summary.seeds} | {summary.final_reward.format()} | {steps} "
                     f"| {summary.reached_format}/{summary.seeds} | {summary.mean_eur.format()} "
                     f"| {summary.final_entropy.format()} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Figure


def mean_over_seeds(rows: Sequence[dict[str, float | str]], gate: str, column: str) -> tuple[list[float], list[float]]:
    """``(steps, mean over the seeds that logged the step)`` of one gate's column."""
    by_step: dict[float, list[float]] = {}
    for row in rows:
        if row["gate"] == gate and not math.isnan(float(row[column])):
            by_step.setdefault(float(row["step"]), []).append(float(row[column]))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def write_figure(rows: Sequence[dict[str, float | str]], path: Path, *, smooth: int, labels: dict[str, str]) -> Path:
    from fused_gates.plots import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("reward", "reward"), ("eur", "EUR (off-policy steps)"))
    for axis, (column, title) in zip(axes, panels, strict=True):
        for gate in dict.fromkeys(str(row["gate"]) for row in rows):
            steps, values = mean_over_seeds(rows, gate, column)
            axis.plot(steps, moving_average(values, smooth), label=labels.get(gate, gate))
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len({row["seed"] for row in rows})
    figure.suptitle(f"toy study: mean over {seeds} seeds, moving average over {smooth} logged values")
    figure.tight_layout()
    return save_figure(figure, path, 100)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per gate")
    parser.add_argument("--gates", nargs="+", default=[gate.name for gate in STUDY_GATES],
                        choices=[gate.name for gate in STUDY_GATES])
    parser.add_argument("--out", default="docs/toy-study", help="where runs.csv, summary.md and curves.png go")
    parser.add_argument("--runs-dir", default="out/toy-study", help="training output folders (not committed)")
    parser.add_argument("--final-window", type=int, default=10)
    parser.add_argument("--format-threshold", type=float, default=0.25)
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window, in logged values")
    parser.add_argument("--summarise-only", action="store_true", help="only summarise the runs already in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gates = [gate for gate in STUDY_GATES if gate.name in args.gates]
    if args.summarise_only:
        rows = read_rows(out / "runs.csv")
    else:
        folders = [(gate.name, seed, run_one(gate, seed, Path(args.runs_dir)))
                   for gate in gates for seed in range(args.seeds)]
        rows = collect_rows(folders)
        write_rows(rows, out / "runs.csv")
    options = {"final_window": args.final_window, "format_threshold": args.format_threshold, "smooth": args.smooth}
    table = format_summary(summarise(rows, **options), **options)
    (out / "summary.md").write_text(table)
    labels = {gate.name: describe_gate(_flags_to_settings(gate.flags)) or gate.name for gate in gates}
    write_figure(rows, out / "curves.png", smooth=args.smooth, labels=labels)
    print(table)
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.md'} and {out / 'curves.png'}")
    return 0


def _flags_to_settings(flags: Sequence[str]) -> dict[str, float | str]:
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    settings: dict[str, float | str] = {"gate": pairs["--gate"]}
    for flag, key in (("--tau-pos", "tau_pos"), ("--tau-neg", "tau_neg"), ("--epsilon", "epsilon")):
        if flag in pairs:
            settings[key] = float(pairs[flag])
    return settings


if __name__ == "__main__":
    sys.exit(main())
