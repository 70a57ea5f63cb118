"""The training script: presets and flags (--dry-run, refusals), the synthetic task and the warm-up, the tiny model,
the reports (table, metrics.csv, plot), and short offline runs that save their final model."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_gates import INPUT_GATES, PAPER_GATES
from fused_gates.integrations.app import settings as train_settings
from fused_gates.integrations.app import train as train_grpo
from fused_gates.integrations.app.data import (
    SYSTEM_PROMPT,
    filter_long_prompts,
    load_paper_mixture,
    synthetic_arithmetic,
    synthetic_problems,
    write_synthetic_jsonl,
)
from fused_gates.integrations.app.run_report import (
    ANSWER_REWARD,
    FORMAT_REWARD,
    StepMetricsCallback,
    TableCallback,
    mean_off_policy_eur,
    window_means,
    write_metrics_csv,
    write_metrics_plot,
)
from fused_gates.integrations.app.tiny_model import (
    TAG_TOKENS,
    build_tiny_model,
    build_tiny_tokenizer,
    is_tiny_folder,
    load_tiny,
    save_tiny,
)
from fused_gates.integrations.app.warmup import supervised_warmup, warmup_completion
from fused_gates.integrations.trl import GatedGRPOConfig


def dry_run(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    assert train_grpo.main([*flags, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------------------------------
# Presets and flags


def test_paper_preset_has_the_papers_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    resolved = dry_run(capsys, "--preset", "paper")
    settings, trainer = resolved["settings"], resolved["trainer_args"]
    assert settings["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert settings["dataset"] == "paper"
    assert resolved["max_prompt_length"] == 1536
    assert trainer["max_completion_length"] == 512
    assert trainer["num_generations"] == 8
    assert trainer["per_device_train_batch_size"] == 1
    assert trainer["gradient_accumulation_steps"] == 16
    assert trainer["num_iterations"] == 2
    assert trainer["bf16"] is True
    assert trainer["learning_rate"] == 1e-6
    assert trainer["lr_scheduler_type"] == "linear"
    assert trainer["warmup_steps"] == 0
    assert (trainer["adam_beta1"], trainer["adam_beta2"], trainer["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    assert trainer["optim"] == "adamw_torch"
    assert trainer["max_steps"] == 5000
    assert (trainer["gate"], trainer["gate_tau_pos"], trainer["gate_tau_neg"]) == ("erf", 10.0, 12.0)
    assert trainer["epsilon"] == 0.2
    assert settings["liger"] is True
    assert resolved["rewards"] == ["format_reward", "answer_reward"]


def test_no_arguments_resolve_to_the_offline_preset(capsys: pytest.CaptureFixture[str]) -> None:
    settings = dry_run(capsys)["settings"]
    assert settings["preset"] == "offline"
    assert settings["model"] is None
    assert settings["dataset"] == "synthetic"
    assert settings["bf16"] is False
    assert settings["liger"] is False
    assert settings["output_dir"].startswith(f"out/{settings['gate']}-")


def test_naming_a_model_selects_the_paper_preset(capsys: pytest.CaptureFixture[str]) -> None:
    settings = dry_run(capsys, "--model", "Qwen/Qwen2.5-0.5B-Instruct")["settings"]
    assert settings["preset"] == "paper"
    assert settings["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert settings["learning_rate"] == 1e-6


def test_every_flag_overrides_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    resolved = dry_run(
        capsys, "--preset", "paper", "--gate", "clip", "--epsilon", "0.28", "--lr", "5e-7", "--max-steps", "10",
        "--num-generations", "4", "--no-bf16", "--no-liger", "--use-vllm", "--output-dir", "somewhere",
        "--gradient-accumulation-steps", "2", "--save-steps", "0",
    )
    settings, trainer = resolved["settings"], resolved["trainer_args"]
    assert (trainer["gate"], trainer["epsilon"], trainer["learning_rate"]) == ("clip", 0.28, 5e-7)
    assert (trainer["max_steps"], trainer["num_generations"], trainer["bf16"]) == (10, 4, False)
    assert (trainer["use_vllm"], trainer["output_dir"], trainer["save_strategy"]) == (True, "somewhere", "no")
    assert trainer["gradient_accumulation_steps"] == 2
    assert "gate_tau_pos" not in trainer and "gate_tau_neg" not in trainer  # clip has no temperature
    assert settings["liger"] is False
    soft = dry_run(capsys, "--gate", "arctan", "--tau-pos", "1", "--tau-neg", "1.05", "--eur-target", "0.7",
                   "--eur-rate", "0.5")["trainer_args"]
    assert (soft["gate_tau_pos"], soft["gate_tau_neg"]) == (1.0, 1.05)
    assert (soft["gate_eur_target"], soft["gate_eur_rate"]) == (0.7, 0.5)
    assert "gate_eur_target" not in dry_run(capsys)["trainer_args"]  # fixed temperatures by default


def test_offline_preset_warms_up_then_trains_on_the_small_task(capsys: pytest.CaptureFixture[str]) -> None:
    settings = dry_run(capsys)["settings"]
    assert (settings["sft_steps"], settings["sft_answers"], settings["max_operand"]) == (100, "true", 4)
    assert (settings["gate"], settings["tau_pos"], settings["tau_neg"], settings["eur_target"]) == ("erf", 10, 12, None)
    assert settings["num_iterations"] == 2
    assert settings["per_device_batch_size"] % settings["num_generations"] == 0
    assert dry_run(capsys, "--preset", "paper")["settings"]["sft_steps"] == 0  # the paper cold-starts RL


@pytest.mark.parametrize(("flags", "named"), [
    pytest.param(["--max-steps", "0"], "argument --max-steps", id="max-steps-0"),
    pytest.param(["--learning-rate", "nan"], "argument --learning-rate", id="lr-nan"),
    pytest.param(["--num-generations", "1"], "argument --num-generations", id="one-generation"),
    pytest.param(["--eur-target", "1.5"], "argument --eur-target", id="eur-target-above-1"),
    pytest.param(["--eur-rate", "2"], "argument --eur-rate", id="eur-rate-above-1"),
    pytest.param(["--epsilon", "1.5", "--gate", "clip"], "argument --epsilon", id="epsilon-above-1"),
    pytest.param(["--max-operand", "12"], "argument --max-operand", id="two-digit-operands"),
    pytest.param(["--gate", "clip", "--eur-target", "0.8"], "--eur-target: adaptive gate temperature",
                 id="adaptive-clip"),
    pytest.param(["--num-iterations", "1", "--eur-target", "0.8"], "num_iterations=1", id="adaptive-on-policy"),
    pytest.param(["--eur-rate", "0.5"], "--eur-rate needs --eur-target", id="rate-without-target"),
    pytest.param(["--gate", "clip", "--tau-pos", "3"], "--tau-pos: not used by --gate clip", id="tau-with-clip"),
    pytest.param(["--gate", "erf", "--epsilon", "0.3"], "--epsilon: not used by --gate erf", id="epsilon-with-erf"),
    pytest.param(["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--sft-steps", "5"], "--sft-steps", id="warm-up-hub-model"),
    pytest.param(["--gate", "dppo", "--epsilon", "0.3"], "--epsilon: not used by --gate dppo", id="epsilon-with-dppo"),
    pytest.param(["--gate", "gmpo", "--tau-pos", "3"], "--tau-pos: not used by --gate gmpo", id="tau-with-gmpo"),
    pytest.param(["--gate", "clip", "--dppo-delta", "0.1"], "--dppo-delta: only applies to gate='dppo'",
                 id="dppo-delta-with-clip"),
    pytest.param(["--gate", "m2po", "--bapo-rho", "0.4"], "--bapo-rho: only applies to gate='bapo'",
                 id="bapo-rho-with-m2po"),
    pytest.param(["--gate", "bapo", "--bapo-rho", "1"], "argument --bapo-rho", id="bapo-rho-1"),
    pytest.param(["--gate", "aspo", "--aspo-dual-clip", "0.5"], "--aspo-dual-clip:", id="aspo-dual-clip-below-1"),
    pytest.param(["--gate", "dppo", "--estr-threshold", "0.5"], "--estr-threshold: gate='dppo' has its own",
                 id="estr-with-dppo"),
    pytest.param(["--estr-epsilon", "0.1"], "--estr-epsilon: only applies with estr_threshold",
                 id="estr-epsilon-without-threshold"),
])
def test_bad_flags_exit_2_naming_them(capsys: pytest.CaptureFixture[str], flags: list[str], named: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main([*flags, "--dry-run"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("gate", PAPER_GATES)
def test_builtin_gates_are_accepted(capsys: pytest.CaptureFixture[str], gate: str) -> None:
    assert dry_run(capsys, "--gate", gate)["trainer_args"]["gate"] == gate


@pytest.mark.parametrize("gate", INPUT_GATES)
def test_gates_reading_more_than_the_ratio_are_accepted_with_the_papers_defaults(
        capsys: pytest.CaptureFixture[str], gate: str) -> None:
    trainer = dry_run(capsys, "--gate", gate)["trainer_args"]
    assert trainer["gate"] == gate
    assert "gate_tau_pos" not in trainer and "gate_tau_neg" not in trainer
    assert not [name for name in trainer if name.startswith(("gate_dppo", "gate_m2po", "gate_bapo", "gate_aspo",
                                                              "gate_gmpo"))]  # None: the paper's default
    GatedGRPOConfig(**trainer)  # the trainer takes them as they are


@pytest.mark.parametrize(("gate", "flag", "value", "field"), [
    pytest.param("dppo", "--dppo-delta", "0.1", "gate_dppo_delta", id="dppo"),
    pytest.param("m2po", "--m2po-threshold", "0.02", "gate_m2po_threshold", id="m2po"),
    pytest.param("bapo", "--bapo-rho", "0.4", "gate_bapo_rho", id="bapo"),
    pytest.param("aspo", "--aspo-dual-clip", "2.5", "gate_aspo_dual_clip", id="aspo"),
    pytest.param("gmpo", "--gmpo-epsilon", "0.3", "gate_gmpo_epsilon", id="gmpo"),
    pytest.param("dppo_kl", "--dppo-delta", "0.02", "gate_dppo_delta", id="dppo_kl"),
    pytest.param("erf", "--estr-threshold", "0.5", "gate_estr_threshold", id="estr-on-erf"),
])
def test_the_option_of_a_gate_reading_more_than_the_ratio_reaches_the_trainer(
        capsys: pytest.CaptureFixture[str], gate: str, flag: str, value: str, field: str) -> None:
    trainer = dry_run(capsys, "--gate", gate, flag, value)["trainer_args"]
    assert trainer[field] == float(value)
    assert GatedGRPOConfig(**trainer).gate == gate


def test_an_unknown_gate_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_grpo.main(["--gate", "tanh", "--dry-run"])
    assert "unknown gate 'tanh'" in capsys.readouterr().err


def test_liger_is_never_applied_without_cuda() -> None:
    settings = train_settings.resolve_settings(["--preset", "paper", "--liger"])
    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    assert train_grpo.maybe_apply_liger(torch.nn.Linear(2, 2), settings) is False


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fused_gates.integrations.train_grpo", "--preset", "paper", "--dry-run"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(result.stdout)["trainer_args"]["learning_rate"] == 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# Data


def test_synthetic_arithmetic_is_correct_and_reproducible() -> None:
    dataset = synthetic_arithmetic(200, seed=3)
    assert dataset.column_names == ["prompt", "answer"]
    assert len(dataset) == 200
    for prompt, answer in zip(dataset["prompt"], dataset["answer"], strict=True):
        assert prompt.endswith("=")
        assert int(answer) == eval(prompt[:-1]) >= 0  # prompts are "a+b=" / "a-b=" with single digits
    assert synthetic_arithmetic(200, seed=3)["prompt"] == dataset["prompt"]
    assert synthetic_arithmetic(200, seed=4)["prompt"] != dataset["prompt"]


def test_synthetic_arithmetic_conversational_prompts() -> None:
    prompt = synthetic_arithmetic(1, seed=0, conversational=True)["prompt"][0]
    assert prompt[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert prompt[1]["role"] == "user"
    assert prompt[1]["content"].startswith("What is ")


def test_system_prompt_names_the_template() -> None:
    for tag in TAG_TOKENS:
        assert tag in SYSTEM_PROMPT


def _fake_hub(name: str, config: str | None = None, split: str | None = None):
    from datasets import Dataset

    assert split == "train"
    if name == "openai/gsm8k":
        assert config == "main"
        return Dataset.from_dict({
            "question": [f"gsm8k question {i}" for i in range(6)],
            "answer": [f"Step one.\nStep two.\n#### 1,00{i}" for i in range(6)],
        })
    assert name == "zwhe99/DeepMath-103K"
    return Dataset.from_dict({
        "question": [f"deepmath question {i}" for i in range(10)],
        "final_answer": [f"\\frac{{{i}}}{{7}}" for i in range(10)],
        "difficulty": [5.0] * 10,
    })


def test_paper_mixture_is_half_gsm8k_half_deepmath_interleaved() -> None:
    mixture = load_paper_mixture(seed=0, loader=_fake_hub)
    assert sorted(mixture.column_names) == ["answer", "prompt"]
    assert len(mixture) == 12  # both cut to the smaller source's 6 rows
    sources = ["gsm8k" if "gsm8k" in prompt[1]["content"] else "deepmath" for prompt in mixture["prompt"]]
    assert sources == ["gsm8k", "deepmath"] * 6
    for prompt, answer in zip(mixture["prompt"], mixture["answer"], strict=True):
        assert prompt[0]["content"] == SYSTEM_PROMPT
        expected = r"\\frac\{\d\}\{7\}" if "deepmath" in prompt[1]["content"] else r"100\d"
        assert re.fullmatch(expected, answer), answer


def test_paper_mixture_sizes_and_plain_prompts() -> None:
    mixture = load_paper_mixture(seed=1, gsm8k_size=2, deepmath_size=2, conversational=False, loader=_fake_hub)
    assert len(mixture) == 4
    assert all(isinstance(prompt, str) for prompt in mixture["prompt"])


def test_long_prompts_are_dropped() -> None:
    tokenizer = build_tiny_tokenizer()
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["1+2=", "1+2+3+4+5+6="], "answer": ["3", "21"]})
    kept = filter_long_prompts(dataset, tokenizer, max_prompt_length=5)  # <bos> 1 + 2 = is 5 tokens
    assert kept["prompt"] == ["1+2="]


# ----------------------------------------------------------------------------------------------------------------------
# Tiny model and tokenizer

TEMPLATE_TEXT = "3+4=<think>3 plus 4 is 7.</think>\n<answer>7</answer>"


def test_tiny_tokenizer_round_trips_and_keeps_tags_whole() -> None:
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(TEMPLATE_TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEMPLATE_TEXT
    for tag in TAG_TOKENS:
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(tag)]
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tiny_model_saves_loads_and_generates(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=7)
    save_tiny(model, tokenizer, tmp_path)
    assert is_tiny_folder(tmp_path)
    loaded_model, loaded_tokenizer = load_tiny(tmp_path)
    assert loaded_tokenizer(TEMPLATE_TEXT)["input_ids"] == tokenizer(TEMPLATE_TEXT)["input_ids"]
    assert loaded_tokenizer.padding_side == "left"
    for (name, original), loaded in zip(model.state_dict().items(), loaded_model.state_dict().values(), strict=True):
        assert torch.equal(original, loaded), name
    batch = loaded_tokenizer(["1+2=", "9-3="], return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the right edge
    output = loaded_model.generate(**batch, max_new_tokens=6, do_sample=True)
    assert output.shape[0] == 2
    assert 0 < output.shape[1] - batch["input_ids"].shape[1] <= 6


def test_tiny_model_is_seeded() -> None:
    tokenizer = build_tiny_tokenizer()
    first, second = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=1)
    other = build_tiny_model(tokenizer, seed=2)
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Data of the synthetic task and the warm-up


@pytest.mark.parametrize(("max_operand", "count"), [pytest.param(9, 155, id="single-digits"),
                                                    pytest.param(4, 40, id="offline-default")])
def test_synthetic_problems_are_every_distinct_problem_with_its_answer(max_operand: int, count: int) -> None:
    problems = synthetic_problems(max_operand)
    assert len(problems) == len(set(problems)) == count
    for expression, answer in problems:
        assert int(answer) == eval(expression) >= 0
    drawn = set(synthetic_arithmetic(500, seed=1, max_operand=max_operand)["prompt"])
    assert drawn <= {f"{expression}=" for expression, _ in problems}


def test_synthetic_eval_file_is_read_by_the_evaluator(tmp_path: Path) -> None:
    from fused_gates.integrations.app.evaluate import BENCHMARKS, load_problems

    path = write_synthetic_jsonl(tmp_path / "synthetic-eval.jsonl", max_operand=4)
    problems = load_problems(BENCHMARKS["synthetic"], dataset_file=path)
    assert [(problem.question, problem.reference) for problem in problems] == [
        (f"{expression}=", answer) for expression, answer in synthetic_problems(4)]


def test_warmup_template_is_fully_formatted_and_carries_the_answer() -> None:
    from fused_gates.integrations.app.rewards import extract_answer, format_score

    for filler in ([], ["I"], ["so", "think"]):
        text = warmup_completion("7", filler)
        assert format_score(text) == 1.0
        assert extract_answer(text) == "7"
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(warmup_completion("8", ["answer"]), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) + 1 <= train_settings.OFFLINE["max_completion_length"]


def _warmed(seed: int, source: str = "true"):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=seed)
    problems = synthetic_problems(4)
    result = supervised_warmup(model, tokenizer, [f"{q}=" for q, _ in problems], [a for _, a in problems], steps=12,
                               learning_rate=3e-3, seed=seed, answer_source=source, batch_size=16)
    return model, result


def test_warmup_lowers_the_completion_loss_and_is_deterministic() -> None:
    first, result = _warmed(seed=5)
    second, _ = _warmed(seed=5)
    assert result.last_loss < result.first_loss
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other, _ = _warmed(seed=6)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_warmup_trains_only_on_the_completion() -> None:
    from fused_gates.integrations.app.warmup import _batch

    tokenizer = build_tiny_tokenizer()
    completions = [warmup_completion("3", ["so"]), warmup_completion("5", ["I"])]
    input_ids, attention_mask, labels = _batch(tokenizer, ["1+2=", "9-4="], completions, tokenizer.eos_token_id)
    prompt_length = len(tokenizer("1+2=")["input_ids"])
    assert (labels[:, :prompt_length] == -100).all()
    completion = tokenizer(completions[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[0, prompt_length : prompt_length + len(completion)].tolist() == completion
    assert attention_mask.sum(1).tolist() == [len(row) for row in (input_ids[0], input_ids[1])]


def test_warmup_refuses_what_it_cannot_do() -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match="answer_source"):
        supervised_warmup(model, tokenizer, ["1+1="], ["2"], steps=1, learning_rate=1e-3, seed=0, answer_source="x")
    with pytest.raises(ValueError, match="plain-text prompts"):
        supervised_warmup(model, tokenizer, [[{"role": "user", "content": "1+1"}]], ["2"], steps=1,
                          learning_rate=1e-3, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# Reports


ROWS = [
    {"step": 1, "reward": 0.1, FORMAT_REWARD: 0.1, ANSWER_REWARD: 0.0, "eur": 1.0, "eur/on_policy": 1.0,
     "entropy": 3.0, "loss": 0.0, "gate/tau_pos": 10.0, "gate/tau_neg": 12.0},
    {"step": 2, "eur": 0.8, "eur/off_policy": 0.8, "entropy": 2.9, "loss": 0.1, "gate/tau_pos": 10.0,
     "gate/tau_neg": 12.0},  # a reuse step: no rewards logged
    {"step": 3, "reward": 0.5, FORMAT_REWARD: 0.3, ANSWER_REWARD: 0.2, "eur": 1.0, "eur/on_policy": 1.0,
     "entropy": 2.8, "loss": 0.0, "gate/tau_pos": 11.0, "gate/tau_neg": 13.2},
    {"step": 4, "eur": 0.6, "eur/off_policy": 0.6, "entropy": 2.7, "loss": 0.1, "gate/tau_pos": 11.0,
     "gate/tau_neg": 13.2},
]


def test_csv_has_the_rewards_eur_split_and_temperatures(tmp_path: Path) -> None:
    path = write_metrics_csv(ROWS, tmp_path / "metrics.csv")
    with path.open() as handle:
        reader = csv.DictReader(handle)
        read = list(reader)
    assert reader.fieldnames[:11] == ["step", "reward", FORMAT_REWARD, ANSWER_REWARD, "eur", "eur/off_policy",
                                      "eur/on_policy", "entropy", "gate/tau_pos", "gate/tau_neg", "loss"]
    assert [row["step"] for row in read] == ["1", "2", "3", "4"]
    assert (read[1]["reward"], read[1]["eur/off_policy"], read[0]["eur/off_policy"]) == ("", "0.8", "")
    assert [float(row["gate/tau_neg"]) for row in read] == [12.0, 12.0, 13.2, 13.2]


def test_summaries_of_a_run() -> None:
    answer = window_means(ROWS, ANSWER_REWARD, window=1)
    assert (answer.first, answer.last, answer.first_count) == (0.0, 0.2, 1)
    assert mean_off_policy_eur(ROWS) == pytest.approx(0.7)
    assert mean_off_policy_eur(ROWS, 2 / 3) == pytest.approx(0.6)  # steps after 2/3 of 4: step 4 only
    assert window_means(ROWS, "nothing").describe("x") == "x: not logged"


def test_plot_is_a_png(tmp_path: Path) -> None:
    png = write_metrics_plot(ROWS, tmp_path / "metrics.png", title="erf", eur_target=0.8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fixed = [{key: value for key, value in row.items() if not key.startswith("gate/")} for row in ROWS]
    assert write_metrics_plot(fixed, tmp_path / "fixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_prints_plain_lines_with_progress(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import TrainerControl, TrainerState

    collector = StepMetricsCallback()
    table = TableCallback(collector, adaptive=True)
    state = TrainerState(max_steps=4)
    table.on_train_begin(None, state, TrainerControl())
    for row in ROWS:
        state.global_step = row["step"]
        logs = {key: value for key, value in row.items() if key != "step"}
        collector.on_log(None, state, TrainerControl(), logs=logs)
        table.on_log(None, state, TrainerControl())
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # nothing redrawn in place: nothing to overwrite
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["step", "elapsed", "left"] and lines[0].split()[-2:] == ["tau+", "tau-"]
    assert len(lines) == 1 + len(ROWS)
    cells = lines[2].split()
    assert cells[0] == "2/4" and cells[3:6] == ["-", "-", "-"] and cells[6] == "0.8000"  # off-policy EUR
    assert lines[1].split()[6] == "-"  # the on-policy step has no off-policy EUR
    assert lines[3].split()[-2:] == ["11.0000", "13.2000"]


# ----------------------------------------------------------------------------------------------------------------------
# End to end


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_tiny(folder)[0].state_dict()


def test_offline_run_saves_its_final_model_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run"
    assert train_grpo.main(["--max-steps", "2", "--sft-steps", "3", "--dataset-size", "64",
                            "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    with (output / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert float(rows[0]["eur/on_policy"]) == 1.0 and 0.0 <= float(rows[1]["eur/off_policy"]) <= 1.0
    for row in rows:
        assert math.isfinite(float(row["entropy"])) and float(row["entropy"]) > 0.0
    assert math.isfinite(float(rows[0]["rewards/answer_reward/mean"]))
    assert (output / "metrics.png").stat().st_size > 0
    initial, final = output / "initial-model", output / "final-model"
    assert is_tiny_folder(initial) and is_tiny_folder(final)
    changed = [name for name, weight in _state(final).items() if not torch.equal(weight, _state(initial)[name])]
    assert changed, "the saved final model is the initial one"
    config = json.loads((output / "run_config.json").read_text())
    assert config["final_model"] == str(final) and config["initial_model"] == str(initial)
    assert f"final model: {final}" in printed
    assert f"--dataset-file {output / 'synthetic-eval.jsonl'}" in printed and "--label 'initial policy'" in printed
    assert len((output / "synthetic-eval.jsonl").read_text().splitlines()) == 40


def test_adaptive_run_logs_the_temperatures_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run"
    assert train_grpo.main(["--max-steps", "4", "--sft-steps", "3", "--dataset-size", "64", "--eur-target", "0.8",
                            "--eur-rate", "1", "--output-dir", str(output)]) == 0
    assert "off-policy EUR, mean over the last third of the run" in capsys.readouterr().out
    with (output / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    taus = [(float(row["gate/tau_pos"]), float(row["gate/tau_neg"])) for row in rows]
    assert len(taus) == 4 and taus[0] == (10.0, 12.0)
    assert all(tau_neg == pytest.approx(1.2 * tau_pos) for tau_pos, tau_neg in taus)
    assert taus[2] != taus[0]  # moved by step 2's off-policy EUR
