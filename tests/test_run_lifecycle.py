"""A training run that loses nothing: metrics.csv written as the run goes, SIGINT / SIGTERM ending it cleanly,
``--resume`` giving the uninterrupted run's metrics, existing outputs never reused silently, a warm-up model reused
only when built by the same recipe; the same folder rules for the evaluator and the toy study."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the training script needs the 'trl' extra")

from fused_gates.integrations.app import evaluate, toy_study, train
from fused_gates.integrations.app.run_folder import weights_sha256
from fused_gates.integrations.app.run_report import read_metrics_csv
from fused_gates.integrations.app.settings import resolve_settings
from fused_gates.integrations.app.tiny_model import tiny_recipe

# The offline default, short: 12 steps of 16 prompts x 8 completions, a generated batch every 2 steps.
STEPS = 12
FLAGS = ["--max-steps", str(STEPS), "--sft-steps", "3", "--dataset-size", "64", "--eur-target", "0.8"]
TIMING = ("time", "runtime", "per_second")  # wall-clock metrics differ between any two runs


def _comparable(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{key: value for key, value in row.items() if not any(word in key for word in TIMING)} for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([*FLAGS, "--save-steps", "2", "--output-dir", str(output)]) == 0
    return output


def _start(output: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fused_gates.integrations.app.train", *FLAGS, *flags,
                             "--output-dir", str(output)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _interrupt_after(process: subprocess.Popen, output: Path, rows: int, signum: int) -> str:
    """Sends ``signum`` once metrics.csv holds ``rows`` logged steps; returns the run's output."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        path = output / "metrics.csv"
        if path.is_file() and len(read_metrics_csv(path)) >= rows:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted:\n" + process.stdout.read()
    process.send_signal(signum)
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, out
    return out


def _assert_every_logged_step(output: Path) -> list[dict[str, float]]:
    rows = read_metrics_csv(output / "metrics.csv")  # parses
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["entropy"]) for row in rows)
    return rows


def test_reference_records_its_initial_model(reference: Path) -> None:
    config = json.loads((reference / "run_config.json").read_text())
    assert config["finished"] is True and config["initial_model"] == str(reference / "initial-model")
    assert config["initial_model_sha256"] == weights_sha256(reference / "initial-model")
    assert [row["step"] for row in read_metrics_csv(reference / "metrics.csv")] == list(range(1, STEPS + 1))


def test_sigint_keeps_every_step_and_resume_continues_exactly(reference: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    out = _interrupt_after(_start(output, "--save-steps", "2"), output, 2, signal.SIGINT)
    assert "SIGINT: stopped after step" in out and "continue with --resume" in out
    rows = _assert_every_logged_step(output)
    stopped = int(rows[-1]["step"])
    assert stopped < STEPS and stopped % 2 == 0  # at the end of a generated batch, where the checkpoint is
    assert (output / f"checkpoint-{stopped}").is_dir() and not (output / "final-model").exists()
    assert json.loads((output / "run_config.json").read_text())["finished"] is False

    assert train.main([*FLAGS, "--save-steps", "2", "--output-dir", str(output), "--resume"]) == 0
    resumed = read_metrics_csv(output / "metrics.csv")
    expected = read_metrics_csv(reference / "metrics.csv")
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))  # no step twice
    for mine, theirs in zip(_comparable(resumed), _comparable(expected), strict=True):
        assert mine.keys() == theirs.keys()
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6), mine["step"]


def test_sigterm_keeps_every_step_and_the_folder_is_not_reused(tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    out = _interrupt_after(_start(output, "--save-steps", "0"), output, 2, signal.SIGTERM)
    assert "SIGTERM: stopped after step" in out and "--overwrite" in out
    _assert_every_logged_step(output)

    capsys.readouterr()
    assert train.main([*FLAGS, "--output-dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert "--resume" in error and "--overwrite" in error and str(output) in error
    assert train.main([*FLAGS, "--output-dir", str(output), "--resume"]) == 2  # nothing to resume from
    assert "no checkpoint" in capsys.readouterr().err


def test_overwrite_deletes_only_a_run_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert train.main([*FLAGS, "--output-dir", str(folder), "--overwrite"]) == 2
    assert "does not look like" in capsys.readouterr().err and (folder / "notes.txt").is_file()


def test_a_warmup_model_of_another_recipe_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "initial"
    first = resolve_settings(["--sft-steps", "2", "--output-dir", str(tmp_path / "a")])
    train.prepare_tiny_policy(first, folder)
    digest = weights_sha256(folder)
    assert tiny_recipe(folder) == train.warmup_recipe(first)
    train.prepare_tiny_policy(first, folder)  # the same recipe: reused as is
    assert weights_sha256(folder) == digest
    other = resolve_settings(["--sft-steps", "2", "--seed", "1", "--output-dir", str(tmp_path / "b")])
    train.prepare_tiny_policy(other, folder)
    assert tiny_recipe(folder) == train.warmup_recipe(other) and weights_sha256(folder) != digest


# ----------------------------------------------------------------------------------------------------------------------
# The evaluator and the toy study


def test_evaluate_writes_as_it_goes_refuses_reuse_and_resumes(tmp_path: Path, capsys) -> None:
    from fused_gates.integrations.app.data import synthetic_problems, write_synthetic_jsonl

    dataset = write_synthetic_jsonl(tmp_path / "synthetic-eval.jsonl", max_operand=2)
    answers = {f"{question}=": answer for question, answer in synthetic_problems(2)}
    asked: list[str] = []

    def generate(questions, num_samples, fail_after=None):
        if fail_after is not None and len(asked) >= fail_after:
            raise KeyboardInterrupt
        asked.extend(questions)
        return [[f"<answer>{answers.get(q, answers.get(q + '='))}</answer>"] * num_samples for q in questions]

    argv = ["--model", "m", "--benchmark", "synthetic", "--dataset-file", str(dataset), "--out", str(tmp_path / "e"),
            "--batch-size", "2"]
    results = tmp_path / "e" / "synthetic.jsonl"
    assert evaluate.main(argv, lambda q, n: generate(q, n, fail_after=4)) == 130  # Ctrl-C after two batches
    assert len(evaluate.read_results(results)) == 4  # two batches, each line flushed
    assert evaluate.main(argv, generate) == 2
    assert "--resume" in capsys.readouterr().err
    asked.clear()
    assert evaluate.main([*argv, "--resume"], generate) == 0
    total = len(synthetic_problems(2))
    assert len(asked) == total - 4  # only the unfinished problems
    lines = evaluate.read_results(results)
    assert sorted(line["index"] for line in lines) == list(range(total))
    assert evaluate.main([*argv, "--overwrite"], generate) == 0 and len(evaluate.read_results(results)) == total


def test_toy_study_refuses_an_existing_runs_folder(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    (runs / "clip-seed0").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        toy_study.main(["--seeds", "1", "--gates", "clip", "--runs-dir", str(runs), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--resume" in error and "--overwrite" in error
