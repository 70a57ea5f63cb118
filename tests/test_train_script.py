"""The training script: resolved presets (--dry-run), data, the tiny model, reports, and a short offline run."""

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

from fused_gates.integrations import train_grpo
from fused_gates.integrations.data import (
    SYSTEM_PROMPT,
    filter_long_prompts,
    load_paper_mixture,
    synthetic_arithmetic,
)
from fused_gates.integrations.tiny_model import (
    TAG_TOKENS,
    build_tiny_model,
    build_tiny_tokenizer,
    is_tiny_folder,
    load_tiny,
    save_tiny,
)


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
        "--tau-pos", "1", "--tau-neg", "1.05", "--gradient-accumulation-steps", "2", "--save-steps", "0",
    )
    settings, trainer = resolved["settings"], resolved["trainer_args"]
    assert (trainer["gate"], trainer["epsilon"], trainer["learning_rate"]) == ("clip", 0.28, 5e-7)
    assert (trainer["max_steps"], trainer["num_generations"], trainer["bf16"]) == (10, 4, False)
    assert (trainer["use_vllm"], trainer["output_dir"], trainer["save_strategy"]) == (True, "somewhere", "no")
    assert (trainer["gate_tau_pos"], trainer["gate_tau_neg"], trainer["gradient_accumulation_steps"]) == (1.0, 1.05, 2)
    assert settings["liger"] is False


@pytest.mark.parametrize("gate", ["clip", "sigmoid", "erf", "arctan", "softsign"])
def test_builtin_gates_are_accepted(capsys: pytest.CaptureFixture[str], gate: str) -> None:
    assert dry_run(capsys, "--gate", gate)["trainer_args"]["gate"] == gate


def test_an_unknown_gate_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_grpo.main(["--gate", "tanh", "--dry-run"])
    assert "unknown gate 'tanh'" in capsys.readouterr().err


def test_liger_is_never_applied_without_cuda() -> None:
    settings = train_grpo.resolve_settings(["--preset", "paper", "--liger"])
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
# Reports


def test_csv_and_plot_writers(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "reward": 0.1, "rewards/format_reward/mean": 0.1, "eur": 1.0, "entropy": 3.0, "loss": 0.0},
        {"step": 2, "eur": 0.8, "entropy": 2.9, "loss": 0.1},  # a reuse step: no rewards logged
    ]
    csv_path = train_grpo.write_metrics_csv(rows, tmp_path / "metrics.csv")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert [row["step"] for row in read] == ["1", "2"]
    assert read[1]["reward"] == ""
    png = train_grpo.write_metrics_plot(rows, tmp_path / "metrics.png", title="erf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.100" in train_grpo.summarize_rewards(rows)
    assert train_grpo.format_table_row(rows[1]).split()[:3] == ["2", "-", "-"]


# ----------------------------------------------------------------------------------------------------------------------
# End to end


def test_offline_run_writes_metrics(tmp_path: Path) -> None:
    pytest.importorskip("fused_gates.integrations.trl")
    output = tmp_path / "run"
    assert train_grpo.main(["--max-steps", "2", "--dataset-size", "64", "--output-dir", str(output)]) == 0
    with (output / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(float(row["eur"])) and 0.0 <= float(row["eur"]) <= 1.0
        assert math.isfinite(float(row["entropy"])) and float(row["entropy"]) > 0.0
    assert math.isfinite(float(rows[0]["reward"]))
    assert (output / "metrics.png").stat().st_size > 0
    assert is_tiny_folder(output / "tiny-model")
