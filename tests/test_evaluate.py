"""Benchmark evaluation: fixtures per benchmark, scoring with known completions, and the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fused_gates.integrations.app.evaluate import (
    BENCHMARKS,
    evaluate,
    load_problems,
    score_problem,
    summary_table,
)
from fused_gates.integrations.app.evaluate import main as evaluate_main

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(benchmark: str) -> Path:
    return FIXTURES / f"{benchmark}.jsonl"


def stub(completions: list[list[str]]):
    """A generator returning fixed completions, checking it is asked for the right number of samples."""

    def generate(questions, num_samples):
        assert len(questions) == len(completions)
        assert all(len(texts) == num_samples for texts in completions)
        return completions

    return generate


@pytest.mark.parametrize(("name", "references"), [
    pytest.param("gsm8k", ["18", "3", "70000"], id="gsm8k-final-answer-after-####"),
    pytest.param("math500", ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{5}{6}", "20"], id="math500"),
    pytest.param("aime", ["24", "24", "77"], id="aime"),
])
def test_fixture_problems_load_with_their_reference_answers(name: str, references: list[str]) -> None:
    # (not "benchmark": pytest-benchmark owns that fixture name)
    problems = load_problems(BENCHMARKS[name], dataset_file=fixture(name))
    assert [problem.reference for problem in problems] == references
    assert [problem.index for problem in problems] == [0, 1, 2]
    assert load_problems(BENCHMARKS[name], dataset_file=fixture(name), limit=2) == problems[:2]


def test_answers_come_from_the_answer_tags() -> None:
    problem = load_problems(BENCHMARKS["gsm8k"], dataset_file=fixture("gsm8k"))[0]
    result = score_problem(problem, [
        "<think>16-3-4=9, 9*2=18</think><answer>18</answer>",
        "<think>the answer is 18</think>",  # no answer block: wrong even though 18 appears
        "<answer>$18</answer>",  # currency is normalised as in the training reward
        "<think>x</think><answer>17</answer>",
    ])
    assert result.extracted == ["18", None, "$18", "17"]
    assert result.correct == [True, False, True, False]
    assert result.accuracy == 0.5


def test_accuracy_with_known_completions_is_two_thirds() -> None:
    problems = load_problems(BENCHMARKS["gsm8k"], dataset_file=fixture("gsm8k"))
    completions = [["<think>a</think><answer>18</answer>"], ["<answer>3 bolts</answer>"], ["<answer>7000</answer>"]]
    accuracy, results = evaluate(problems, stub(completions), num_samples=1)
    assert [result.correct for result in results] == [[True], [True], [False]]
    assert accuracy == pytest.approx(2 / 3)


def test_accuracy_averages_samples_within_then_across_problems() -> None:
    problems = load_problems(BENCHMARKS["math500"], dataset_file=fixture("math500"))
    completions = [
        ["<answer>(3, \\frac{\\pi}{2})</answer>", "<answer>(3, \\pi)</answer>"],  # 1/2
        ["<answer>\\dfrac{5}{6}</answer>", "<answer>5/6</answer>"],  # 2/2
        ["<answer>21</answer>", "no tags: 20"],  # 0/2
    ]
    accuracy, results = evaluate(problems, stub(completions), num_samples=2)
    assert [result.accuracy for result in results] == [0.5, 1.0, 0.0]
    assert accuracy == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_summary_table_has_table_1s_layout() -> None:
    summary = {"Qwen2.5-7B-Instruct": {"gsm8k": {"accuracy": 0.803}, "aime": {"accuracy": 1 / 30}},
               "+ SAPO (erf)": {"math500": {"accuracy": 0.562}}}
    assert summary_table(summary).splitlines() == [
        "| Model | GSM8K | MATH500 | AIME |",
        "|---|---|---|---|",
        "| Qwen2.5-7B-Instruct | 80.3 | - | 3.3 |",
        "| + SAPO (erf) | - | 56.2 | - |",
    ]


def test_evaluate_command_with_a_stub_writes_results_and_merges_summaries(tmp_path: Path, monkeypatch) -> None:
    from fused_gates.integrations.app import evaluate as module

    completions = {"gsm8k": [["<answer>18</answer>"], ["<answer>3</answer>"], ["<answer>1</answer>"]],
                   "aime": [["<answer>24</answer>"], ["<answer>0</answer>"], ["<answer>0</answer>"]]}
    for name, texts in completions.items():
        monkeypatch.setattr(module, "make_generator", lambda *args, texts=texts, **kwargs: stub(texts))
        argv = ["--model", "some/model", "--label", "stub", "--benchmark", name,
                "--dataset-file", str(fixture(name)), "--out", str(tmp_path)]
        assert evaluate_main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "gsm8k-stub.jsonl").read_text().splitlines()]
    assert [line["correct"] for line in lines] == [[True], [True], [False]]
    assert set(lines[0]) >= {"problem", "reference", "completions", "extracted", "correct"}
    assert (tmp_path / "summary.md").read_text().splitlines()[-1] == "| stub | 66.7 | - | 33.3 |"


def test_tiny_model_end_to_end(tmp_path: Path) -> None:
    from fused_gates.integrations.app.tiny_model import build_tiny_model, build_tiny_tokenizer, save_tiny

    tokenizer = build_tiny_tokenizer()
    folder = save_tiny(build_tiny_model(tokenizer), tokenizer, tmp_path / "tiny")
    argv = ["--model", str(folder), "--benchmark", "aime", "--dataset-file", str(fixture("aime")),
            "--num-samples", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "eval")]
    assert evaluate_main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "eval" / "aime.jsonl").read_text().splitlines()]
    problems = load_problems(BENCHMARKS["aime"], dataset_file=fixture("aime"))
    assert len(lines) == len(problems) == 3
    for line, problem in zip(lines, problems, strict=True):
        assert (line["problem"], line["reference"]) == (problem.question, problem.reference)
        assert len(line["completions"]) == 2
        # the recorded verdicts are the scoring of the recorded completions
        rescored = score_problem(problem, line["completions"])
        assert (line["extracted"], line["correct"]) == (rescored.extracted, rescored.correct)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    entry = summary[str(folder)]["aime"]
    assert (entry["problems"], entry["num_samples"], entry["temperature"]) == (3, 2, 0.7)
    assert (tmp_path / "eval" / "summary.md").read_text().startswith("| Model | GSM8K | MATH500 | AIME |")


def test_synthetic_task_adds_its_column_after_table_1s() -> None:
    summary = {"initial": {"synthetic": {"accuracy": 0.319}}, "trained": {"synthetic": {"accuracy": 0.766}}}
    assert summary_table(summary).splitlines() == [
        "| Model | GSM8K | MATH500 | AIME | Synthetic |",
        "|---|---|---|---|---|",
        "| initial | - | - | - | 31.9 |",
        "| trained | - | - | - | 76.6 |",
    ]


def test_evaluate_command_on_the_synthetic_task_file(tmp_path: Path, monkeypatch) -> None:
    from fused_gates.integrations.app import evaluate as module
    from fused_gates.integrations.app.data import synthetic_problems, write_synthetic_jsonl

    path = write_synthetic_jsonl(tmp_path / "synthetic-eval.jsonl", max_operand=4)
    answers = [answer for _, answer in synthetic_problems(4)]
    asked = {}

    def make_generator(model, **kwargs):
        asked.update(kwargs)
        # right on the first half of the problems, wrong on the rest
        half = len(answers) // 2
        return stub([[f"<think>so</think><answer>{answer if index < half else 'no'}</answer>"]
                     for index, answer in enumerate(answers)])

    monkeypatch.setattr(module, "make_generator", make_generator)
    argv = ["--model", "some/model", "--label", "trained", "--benchmark", "synthetic",
            "--dataset-file", str(path), "--out", str(tmp_path / "eval"), "--batch-size", "64"]
    assert evaluate_main(argv) == 0
    assert asked["max_new_tokens"] == BENCHMARKS["synthetic"].max_new_tokens == 16
    assert (tmp_path / "eval" / "summary.md").read_text().splitlines()[-1] == "| trained | - | - | - | 50.0 |"


@pytest.mark.parametrize(("argv", "named"), [
    pytest.param(["--model", "m", "--benchmark", "gsm8k", "--num-samples", "0"], "--num-samples", id="no-samples"),
    pytest.param(["--model", "m", "--benchmark", "gsm8k", "--temperature", "-1"], "--temperature",
                 id="negative-temperature"),
    pytest.param(["--model", "m", "--benchmark", "synthetic"], "--dataset-file", id="synthetic-without-file"),
])
def test_bad_argument_exits_2_naming_it(argv, named, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(argv)
    assert exit_info.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err
