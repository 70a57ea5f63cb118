"""The toy gate study: the training script's offline default for GRPO's clip, the four soft gates, erf with an
adaptive temperature and the gates that read more than the ratio, several seeds each, summarised per gate and paired
against clip.

    python -m fused_gates.integrations.app.toy_study --seeds 5 --out docs/toy-study [--resume]

For each seed k it warms the tiny model up once (``<runs-dir>/initial-seed<k>``, the offline default's warm-up; every
gate of seed k starts RL from this same model, data and sampling seed), then trains, one after the other:

* ``clip`` with epsilon 0.2 (GRPO);
* ``sigmoid`` (SAPO), ``erf``, ``arctan``, ``softsign`` with tau_pos 10, tau_neg 12 (the paper's pair);
* ``erf-adaptive``: erf starting from 10 / 12 with ``--eur-target 0.8`` (``adaptive_gate.py``);
* ``dppo``, ``dppo_kl``, ``m2po``, ``bapo``, ``aspo``, ``gmpo``: the gates that read more than r
  (``fused_gates.gate_inputs``), each with its paper's defaults;
* ``clip-estr``, ``sigmoid-estr``: clip and sigmoid (as above) inside the entropy-scaled trust region
  (``--estr-threshold 0.04``, ``fused_gates.entropy_trust``).

``--gates`` runs some of them only; with ``--append`` the rows of ``<out>/runs.csv`` of the other gates and seeds
are kept (a seed's warm-up is deterministic, so runs added later stay paired with the earlier ones of their seed).

Runs go to ``<runs-dir>/<gate>-seed<k>`` (default ``out/toy-study``, not committed). The study is resumable: with
``--resume`` a run that finished is not rerun and an interrupted one is started over, so an interrupted study
continues where it stopped; an existing ``--runs-dir`` is refused without ``--resume`` or ``--overwrite`` (start
over). SIGINT / SIGTERM stop the current run cleanly and end the study. Then it writes to
``--out``: ``runs.csv`` (every run's per-step metrics, a few columns), ``summary.md`` (the tables below),
``curves.png`` (mean over seeds against the step) and ``paired.png`` (each seed's final answer reward per gate).

Per gate, mean +- sample standard deviation over seeds (one value per seed first):

* final answer reward -- mean of the last ``--final-window`` logged answer rewards (logged once per generated batch);
* steps to answer reward ``--threshold`` -- first step at which the trailing moving average (``--smooth`` logged
  values) of the answer reward reaches the threshold; seeds that never do are counted and left out of the mean;
* off-policy EUR -- mean over the off-policy updates (``fused_gates.plots.off_policy_eur``), whole run and last third;
* final entropy -- mean of the last ``--final-window`` logged entropies.

Paired against clip (same seed = same initial model, data and sampling seed): the per-seed differences of the final
answer reward and of the steps to the threshold, their mean +- std, and how many seeds are ahead / behind.
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

from fused_gates import INPUT_GATES
from fused_gates.plots import describe_gate, load_run, metric_points, moving_average, off_policy_eur

from .run_folder import FolderError, SignalFlag, clear_folder, refuse_reuse, stop_on_signals

__all__ = ["STUDY_GATES", "GateSummary", "PairedComparison", "StudyGate", "format_summary", "main", "merge_rows",
           "paired_with", "summarise"]

Row = dict[str, float | str]


@dataclass(frozen=True)
class StudyGate:
    name: str
    flags: tuple[str, ...]  # the training script's flags for this gate


SOFT = ("--tau-pos", "10", "--tau-neg", "12")
ESTR_STUDY_THRESHOLD = "0.04"
STUDY_GATES: tuple[StudyGate, ...] = (
    StudyGate("clip", ("--gate", "clip", "--epsilon", "0.2")),
    StudyGate("sigmoid", ("--gate", "sigmoid", *SOFT)),
    StudyGate("erf", ("--gate", "erf", *SOFT)),
    StudyGate("arctan", ("--gate", "arctan", *SOFT)),
    StudyGate("softsign", ("--gate", "softsign", *SOFT)),
    StudyGate("erf-adaptive", ("--gate", "erf", *SOFT, "--eur-target", "0.8")),
    # the gates that read more than r (fused_gates.gate_inputs), each with its paper's defaults
    *(StudyGate(name, ("--gate", name)) for name in INPUT_GATES),
    # the entropy-scaled trust region on clip (ESTR) and on SAPO's sigmoid; its paper's tau is not published with a
    # default: 0.04 bounds the squared log-ratio per unit of entropy as M2PO bounds the batch's second moment
    StudyGate("clip-estr", ("--gate", "clip", "--epsilon", "0.2", "--estr-threshold", ESTR_STUDY_THRESHOLD)),
    StudyGate("sigmoid-estr", ("--gate", "sigmoid", *SOFT, "--estr-threshold", ESTR_STUDY_THRESHOLD)),
)
BASELINE = "clip"

# Columns of runs.csv: (column, logged key); "eur_off_policy" comes from fused_gates.plots.off_policy_eur.
RUN_COLUMNS = (
    ("reward", "reward"),
    ("format_reward", "rewards/format_reward/mean"),
    ("answer_reward", "rewards/answer_reward/mean"),
    ("eur_off_policy", None),
    ("entropy", "entropy"),
    ("tau_pos", "gate/tau_pos"),
    ("tau_neg", "gate/tau_neg"),
    ("estr_masked_fraction", "estr/masked_fraction"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Running


RUNS_MARKERS = ("*-seed*", "initial-seed*")  # what --overwrite may delete: a folder holding the study's runs


def initial_model(seed: int, runs_dir: Path) -> Path:
    """The offline default's warmed-up tiny model for ``seed``, built once and shared by every gate of the seed."""
    from .settings import resolve_settings
    from .train import prepare_tiny_policy

    settings = resolve_settings(["--seed", str(seed), "--output-dir", str(runs_dir / f"initial-seed{seed}")])
    return prepare_tiny_policy(settings, runs_dir / f"initial-seed{seed}")


def run_one(gate: StudyGate, seed: int, runs_dir: Path, flag: SignalFlag | None = None) -> Path | None:
    """Trains one run with the offline preset (skipped when it finished before; an interrupted one starts over);
    returns its folder, or None when a signal stopped it."""
    from . import train
    from .settings import RunControl, resolve_settings

    folder = runs_dir / f"{gate.name}-seed{seed}"
    if train.run_finished(folder):
        return folder
    start = initial_model(seed, runs_dir)
    settings = resolve_settings(["--preset", "offline", "--model", str(start), "--sft-steps", "0", *gate.flags,
                                 "--seed", str(seed), "--output-dir", str(folder)])
    began = time.perf_counter()
    result = train.train(settings, RunControl(overwrite=folder.exists()), flag=flag)
    if result.interrupted is not None:
        return None
    print(f"[toy study] {folder.name}: {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def collect_rows(folders: Sequence[tuple[str, int, Path]]) -> list[Row]:
    """The long table of runs.csv: one row per (gate, seed, step) with the study's columns (NaN: not logged)."""
    rows: list[Row] = []
    for gate, seed, folder in folders:
        for logged in load_run(folder).rows:
            row: Row = {"gate": gate, "seed": seed, "step": int(logged["step"])}
            for column, key in RUN_COLUMNS:
                value = off_policy_eur(logged) if key is None else logged.get(key)
                row[column] = math.nan if value is None else float(value)
            rows.append(row)
    return rows


def write_rows(rows: Sequence[Row], path: Path) -> Path:
    columns = ["gate", "seed", "step", *(column for column, _ in RUN_COLUMNS)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(row.get(key, math.nan), key) for key in columns})
    return path


def _csv_cell(value: float | str, column: str) -> str:
    if isinstance(value, float):
        # Rewards are means of 128 values in {0, 0.25, 0.5, 1}: written exactly, so that --summarise-only finds the
        # same threshold crossings; the rest to 6 digits.
        return "" if math.isnan(value) else f"{value:.10g}" if "reward" in column else f"{value:.6g}"
    return str(value)


def read_rows(path: str | Path) -> list[Row]:
    """runs.csv back as rows (empty cells as NaN)."""
    with Path(path).open(newline="") as handle:
        return [{key: value if key == "gate" else (float(value) if value else math.nan) for key, value in row.items()}
                for row in csv.DictReader(handle)]


def merge_rows(kept: Sequence[Row], new: Sequence[Row]) -> list[Row]:
    """``kept`` without the (gate, seed) runs that ``new`` holds, then ``new``: a study extended by some gates (or a
    run redone) keeps the other runs' rows."""
    redone = {(str(row["gate"]), float(row["seed"])) for row in new}
    return [row for row in kept if (str(row["gate"]), float(row["seed"])) not in redone] + list(new)


# ----------------------------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = [value for value in values if not math.isnan(value)]
        if not values:
            return cls(math.nan, math.nan)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan)

    def format(self, digits: int = 3, signed: bool = False) -> str:
        if math.isnan(self.mean):
            return "-"
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f}" + ("" if math.isnan(self.std) else f" ± {self.std:.{digits}f}")


@dataclass(frozen=True)
class SeedResult:
    """One run's numbers (NaN where not available; ``steps_to_threshold`` NaN when never reached)."""

    seed: float
    final_answer: float
    steps_to_threshold: float
    eur: float
    eur_last_third: float
    final_entropy: float


@dataclass(frozen=True)
class GateSummary:
    gate: str
    seeds: int
    final_answer: Stat
    steps_to_threshold: Stat
    reached: int  # seeds whose smoothed answer reward reached the threshold
    eur: Stat
    eur_last_third: Stat
    final_entropy: Stat
    per_seed: tuple[SeedResult, ...]


def _series(rows: Sequence[Row], column: str) -> list[tuple[float, float]]:
    return sorted(metric_points(rows, column))


def _tail_mean(rows: Sequence[Row], column: str, window: int) -> float:
    values = [value for _, value in _series(rows, column)][-window:]
    return statistics.fmean(values) if values else math.nan


def _mean_after(rows: Sequence[Row], column: str, fraction: float) -> float:
    points = _series(rows, column)
    if not points:
        return math.nan
    last_step = max(float(row["step"]) for row in rows)
    values = [value for step, value in points if step > fraction * last_step]
    return statistics.fmean(values) if values else math.nan


def steps_to_threshold(points: Sequence[tuple[float, float]], threshold: float, window: int) -> float | None:
    """First step whose trailing moving average (over ``window`` logged values) reaches ``threshold``."""
    smoothed = moving_average([value for _, value in points], window)
    for (step, _), value in zip(points, smoothed, strict=True):
        if value >= threshold:
            return step
    return None


def _seed_result(seed: float, run: Sequence[Row], final_window: int, threshold: float, smooth: int) -> SeedResult:
    reached = steps_to_threshold(_series(run, "answer_reward"), threshold, smooth)
    return SeedResult(
        seed=seed,
        final_answer=_tail_mean(run, "answer_reward", final_window),
        steps_to_threshold=math.nan if reached is None else reached,
        eur=_mean_after(run, "eur_off_policy", 0.0),
        eur_last_third=_mean_after(run, "eur_off_policy", 2 / 3),
        final_entropy=_tail_mean(run, "entropy", final_window),
    )


def summarise(rows: Sequence[Row], *, final_window: int = 10, threshold: float = 0.5,
              smooth: int = 5) -> list[GateSummary]:
    """Per gate (in order of first appearance): the statistics over seeds (see the module docstring)."""
    summaries = []
    for gate in dict.fromkeys(str(row["gate"]) for row in rows):
        per_seed: dict[float, list[Row]] = {}
        for row in rows:
            if row["gate"] == gate:
                per_seed.setdefault(float(row["seed"]), []).append(row)
        results = tuple(_seed_result(seed, run, final_window, threshold, smooth)
                        for seed, run in sorted(per_seed.items()))
        summaries.append(GateSummary(
            gate=gate,
            seeds=len(results),
            final_answer=Stat.of([result.final_answer for result in results]),
            steps_to_threshold=Stat.of([result.steps_to_threshold for result in results]),
            reached=sum(not math.isnan(result.steps_to_threshold) for result in results),
            eur=Stat.of([result.eur for result in results]),
            eur_last_third=Stat.of([result.eur_last_third for result in results]),
            final_entropy=Stat.of([result.final_entropy for result in results]),
            per_seed=results,
        ))
    return summaries


@dataclass(frozen=True)
class PairedComparison:
    """Per-seed differences ``gate - baseline`` (seeds both ran; steps: seeds where both reached the threshold)."""

    gate: str
    seeds: tuple[float, ...]
    answer_differences: tuple[float, ...]
    answer_ahead: int  # seeds with a higher final answer reward than the baseline
    answer_behind: int
    step_differences: tuple[float, ...]
    faster: int  # seeds reaching the threshold in fewer steps (or reaching it where the baseline does not)
    slower: int

    @property
    def answer(self) -> Stat:
        return Stat.of(list(self.answer_differences))

    @property
    def steps(self) -> Stat:
        return Stat.of(list(self.step_differences))


def paired_with(baseline: GateSummary, other: GateSummary) -> PairedComparison:
    """``other`` against ``baseline``, seed by seed."""
    base = {result.seed: result for result in baseline.per_seed}
    pairs = [(base[result.seed], result) for result in other.per_seed if result.seed in base]
    answers = tuple(mine.final_answer - theirs.final_answer for theirs, mine in pairs)
    steps, faster, slower = [], 0, 0
    for theirs, mine in pairs:
        mine_reached = not math.isnan(mine.steps_to_threshold)
        theirs_reached = not math.isnan(theirs.steps_to_threshold)
        if mine_reached and theirs_reached:
            steps.append(mine.steps_to_threshold - theirs.steps_to_threshold)
            faster += mine.steps_to_threshold < theirs.steps_to_threshold
            slower += mine.steps_to_threshold > theirs.steps_to_threshold
        else:
            faster += mine_reached and not theirs_reached
            slower += theirs_reached and not mine_reached
    return PairedComparison(other.gate, tuple(theirs.seed for theirs, _ in pairs), answers,
                            sum(value > 0 for value in answers), sum(value < 0 for value in answers),
                            tuple(steps), faster, slower)


def format_summary(summaries: Sequence[GateSummary], *, final_window: int = 10, threshold: float = 0.5,
                   smooth: int = 5, baseline: str = BASELINE) -> str:
    """The markdown tables of summary.md: per gate, then paired against ``baseline`` (when it was run)."""
    lines = [
        f"| gate | seeds | final answer reward (last {final_window} logged) | steps to answer reward {threshold:g} "
        f"(MA {smooth}) | seeds reaching it | off-policy EUR, whole run | off-policy EUR, last third "
        f"| final entropy (last {final_window} logged) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        lines.append(f"| {summary.gate} | {summary.seeds} | {summary.final_answer.format()} "
                     f"| {summary.steps_to_threshold.format(1)} | {summary.reached}/{summary.seeds} "
                     f"| {summary.eur.format()} | {summary.eur_last_third.format()} "
                     f"| {summary.final_entropy.format()} |")
    reference = next((summary for summary in summaries if summary.gate == baseline), None)
    if reference is not None and len(summaries) > 1:
        lines += [
            "",
            f"Paired against {baseline} (gate minus {baseline}, seed by seed):",
            "",
            f"| gate | final answer reward: per seed | mean ± std | seeds ahead / behind "
            f"| steps to {threshold:g}: mean ± std | seeds faster / slower |",
            "|---|---|---|---|---|---|",
        ]
        for summary in summaries:
            if summary.gate == baseline:
                continue
            paired = paired_with(reference, summary)
            per_seed = " ".join(f"{value:+.2f}" for value in paired.answer_differences)
            lines.append(f"| {summary.gate} | {per_seed} | {paired.answer.format(signed=True)} "
                         f"| {paired.answer_ahead} / {paired.answer_behind} | {paired.steps.format(1, signed=True)} "
                         f"| {paired.faster} / {paired.slower} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def mean_over_seeds(rows: Sequence[Row], gate: str, column: str) -> tuple[list[float], list[float]]:
    """``(steps, mean over the seeds that logged the step)`` of one gate's column."""
    by_step: dict[float, list[float]] = {}
    for row in rows:
        if row["gate"] == gate and not math.isnan(float(row[column])):
            by_step.setdefault(float(row["step"]), []).append(float(row[column]))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def write_curves(rows: Sequence[Row], path: Path, *, smooth: int, labels: dict[str, str],
                 eur_target: float | None = 0.8) -> Path:
    """Answer reward, off-policy EUR, entropy and (adaptive runs) tau_pos against the step, mean over seeds."""
    from fused_gates.plots import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    panels = (("answer_reward", "answer reward"), ("eur_off_policy", "EUR of the off-policy updates"),
              ("entropy", "entropy (nats)"), ("tau_pos", "tau_pos (adaptive runs; the others keep 10)"))
    gates = list(dict.fromkeys(str(row["gate"]) for row in rows))
    # one colour per gate in every panel (the default cycle has 10)
    colours = [f"C{index}" for index in range(len(gates))] if len(gates) <= 10 else [
        plt.get_cmap("tab20")(index % 20) for index in range(len(gates))]
    for axis, (column, title) in zip(axes.flat, panels, strict=True):
        for gate, colour in zip(gates, colours, strict=True):
            steps, values = mean_over_seeds(rows, gate, column)
            if steps:
                axis.plot(steps, moving_average(values, smooth), label=labels.get(gate, gate), color=colour)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    if eur_target is not None:
        axes[0][1].axhline(eur_target, color="black", linestyle="--", linewidth=0.8)
    axes[0][0].legend(fontsize=8)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    seeds = len({row["seed"] for row in rows})
    figure.suptitle(f"toy study: mean over {seeds} seeds, moving average over {smooth} logged values")
    figure.tight_layout()
    return save_figure(figure, path, 100)


def write_paired(summaries: Sequence[GateSummary], path: Path) -> Path:
    """Each seed's final answer reward per gate, one line per seed (the pairing the comparison uses)."""
    from fused_gates.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(9, 0.9 * len(summaries)), 4.5))
    gates = [summary.gate for summary in summaries]
    seeds = sorted({result.seed for summary in summaries for result in summary.per_seed})
    for seed in seeds:
        values = [next((r.final_answer for r in summary.per_seed if r.seed == seed), math.nan)
                  for summary in summaries]
        axis.plot(range(len(gates)), values, marker="o", alpha=0.7, label=f"seed {seed:g}")
    axis.plot(range(len(gates)), [summary.final_answer.mean for summary in summaries], color="black", linewidth=2.5,
              label="mean")
    axis.set_xticks(range(len(gates)), gates, rotation=30 if len(gates) > 6 else 0)
    axis.set_ylabel("final answer reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.suptitle("final answer reward per seed (same seed = same initial model and data)")
    figure.tight_layout()
    return save_figure(figure, path, 100)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per gate")
    parser.add_argument("--gates", nargs="+", default=[gate.name for gate in STUDY_GATES],
                        choices=[gate.name for gate in STUDY_GATES])
    parser.add_argument("--out", default="docs/toy-study", help="where runs.csv, summary.md and the figures go")
    parser.add_argument("--runs-dir", default="out/toy-study", help="training output folders (not committed)")
    parser.add_argument("--final-window", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.5, help="answer reward for 'steps to threshold'")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window, in logged values")
    parser.add_argument("--summarise-only", action="store_true", help="only summarise the runs already in --out")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of runs.csv in --out of the gates and seeds not run now (paired seeds: "
                             "the warm-up of a seed is deterministic)")
    folder = parser.add_mutually_exclusive_group()
    folder.add_argument("--resume", action="store_true",
                        help="continue the study in --runs-dir: finished runs are kept, interrupted ones rerun")
    folder.add_argument("--overwrite", action="store_true", help="delete the runs in --runs-dir and start over")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("seeds", "final_window", "smooth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gates = [gate for gate in STUDY_GATES if gate.name in args.gates]
    if args.append and args.summarise_only:
        parser.error("--append adds runs to runs.csv; --summarise-only runs none")
    if args.append and not (out / "runs.csv").is_file():
        parser.error(f"--append: no {out / 'runs.csv'} to add the runs to")
    if args.summarise_only:
        rows = read_rows(out / "runs.csv")
    else:
        runs_dir = Path(args.runs_dir)
        try:
            refuse_reuse(runs_dir, "a toy study's runs", resume=args.resume, overwrite=args.overwrite)
            if args.overwrite:
                clear_folder(runs_dir, RUNS_MARKERS)
        except FolderError as error:
            parser.error(str(error))
        began = time.perf_counter()
        flag = SignalFlag()
        folders = []
        with stop_on_signals(flag, "stopping the study after the current run's step"):
            for seed in range(args.seeds):
                for gate in gates:
                    folder = run_one(gate, seed, runs_dir, flag)
                    if folder is None:
                        print(f"[toy study] stopped by {flag.name}; continue with --resume", flush=True)
                        return 128 + int(flag.signum)
                    folders.append((gate.name, seed, folder))
        print(f"[toy study] {len(folders)} runs in {(time.perf_counter() - began) / 60:.1f} min "
              "(finished runs already present were reused)", flush=True)
        rows = collect_rows(folders)
        if args.append:
            rows = merge_rows(read_rows(out / "runs.csv"), rows)
        write_rows(rows, out / "runs.csv")
    options = {"final_window": args.final_window, "threshold": args.threshold, "smooth": args.smooth}
    summaries = summarise(rows, **options)
    table = format_summary(summaries, **options)
    (out / "summary.md").write_text(table)
    labels = {gate.name: _label(gate) for gate in STUDY_GATES}
    write_curves(rows, out / "curves.png", smooth=args.smooth, labels=labels)
    write_paired(summaries, out / "paired.png")
    print(table)
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.md'}, {out / 'curves.png'} and {out / 'paired.png'}")
    return 0


def _label(gate: StudyGate) -> str:
    pairs = dict(zip(gate.flags[::2], gate.flags[1::2], strict=True))
    settings: dict[str, float | str | None] = {"gate": pairs["--gate"]}
    for flag, key in (("--tau-pos", "tau_pos"), ("--tau-neg", "tau_neg"), ("--epsilon", "epsilon"),
                      ("--eur-target", "eur_target")):
        if flag in pairs:
            settings[key] = float(pairs[flag])
    return describe_gate(settings) or gate.name


if __name__ == "__main__":
    sys.exit(main())
