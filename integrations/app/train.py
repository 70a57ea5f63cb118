"""Train a policy with the gated GRPO/SAPO loss: the run itself (``fused-gates-train``,
``python -m fused_gates.integrations.app.train``).

The presets and flags live in ``settings.py`` (``--help`` lists them; ``--dry-run`` prints the resolved
configuration), the table, ``metrics.csv`` and ``metrics.png`` in ``run_report.py``. A run:

1. builds the policy: the Hub model or folder given by ``--model``, or the tiny local model, which is first warmed
   up on the answer format (``warmup.py``) and saved as ``<output-dir>/initial-model``, the policy RL starts from;
2. trains it with ``GatedGRPOTrainer`` (reward = format + answer, paper eq. 9), printing one table line per step;
3. saves the trained policy to ``<output-dir>/final-model`` (always, whatever ``--save-steps`` is) and writes
   ``run_config.json``, ``metrics.csv`` and ``metrics.png``; for the synthetic task also ``synthetic-eval.jsonl``
   (every problem once) for ``fused-gates-evaluate``, whose command line it prints.

Multi-GPU: ``accelerate launch --config_file <zero2.yaml|zero3.yaml> -m fused_gates.integrations.app.train ...``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .run_report import (
    ANSWER_REWARD,
    FORMAT_REWARD,
    StepMetricsCallback,
    TableCallback,
    mean_off_policy_eur,
    window_means,
    write_metrics_csv,
    write_metrics_plot,
)
from .settings import RunSettings, describe, parse_command_line, trainer_arguments

__all__ = [
    "RunResult",
    "load_model_and_tokenizer",
    "main",
    "maybe_apply_liger",
    "prepare_tiny_policy",
    "train",
]

INITIAL_MODEL = "initial-model"
FINAL_MODEL = "final-model"
SYNTHETIC_EVAL = "synthetic-eval.jsonl"


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    rows: list[dict[str, float]]  # one per logged step
    initial_model: Path | None  # the saved policy RL started from (None: a Hub model, unchanged)
    final_model: Path


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def prepare_tiny_policy(settings: RunSettings, folder: str | Path) -> Path:
    """The tiny local model RL starts from, saved in ``folder``: built from ``settings.seed`` and warmed up for
    ``settings.sft_steps`` steps on the answer format. A folder that already holds a tiny model is reused as is (the
    toy study shares one warm-up among the gates of a seed: it is a deterministic function of the settings)."""
    from .data import synthetic_problems
    from .tiny_model import build_tiny_model, build_tiny_tokenizer, is_tiny_folder, save_tiny
    from .warmup import supervised_warmup

    folder = Path(folder)
    if is_tiny_folder(folder):
        return folder
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=settings.seed)
    if settings.sft_steps:
        problems = synthetic_problems(settings.max_operand)
        result = supervised_warmup(model, tokenizer, [f"{question}=" for question, _ in problems],
                                   [answer for _, answer in problems], steps=settings.sft_steps,
                                   learning_rate=settings.sft_learning_rate, seed=settings.seed,
                                   answer_source=settings.sft_answers)
        print(f"format warm-up: {result.steps} steps ({settings.sft_answers} answers), completion loss "
              f"{result.first_loss:.3f} -> {result.last_loss:.3f}", flush=True)
    return save_tiny(model, tokenizer, folder)


def load_model_and_tokenizer(settings: RunSettings) -> tuple[Any, Any, Path | None]:
    """``(policy, tokenizer, initial_folder)``: the tiny local model (warmed up, saved in ``initial-model``) for
    ``model=None``, a saved tiny model, or a Hub model / folder (``initial_folder`` None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny_model import is_tiny_folder, load_tiny

    if settings.model is None:
        folder = prepare_tiny_policy(settings, Path(settings.output_dir) / INITIAL_MODEL)
        return (*load_tiny(folder), folder)
    if is_tiny_folder(settings.model):
        return (*load_tiny(settings.model), Path(settings.model))
    dtype = settings.model_dtype if settings.model_dtype == "auto" else getattr(torch, settings.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(settings.model, padding_side="left", truncation_side="left")
    return model, tokenizer, None


def maybe_apply_liger(model: Any, settings: RunSettings) -> bool:
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels on CUDA (never its loss: the gated loss replaces it)."""
    import torch

    if not settings.liger or not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        print("liger-kernel is not installed; training without its kernels (pip install liger-kernel)", file=sys.stderr)
        return False
    # The model-type-generic entry point (apply_liger_kernel_to_qwen2 for Qwen2); it ignores kwargs a type lacks.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def load_training_data(settings: RunSettings, tokenizer: Any):
    """Prompts and answers; conversational whenever the tokenizer has a chat template."""
    from .data import filter_long_prompts, load_paper_mixture, synthetic_arithmetic

    conversational = getattr(tokenizer, "chat_template", None) is not None
    if settings.dataset == "paper":
        dataset = load_paper_mixture(settings.seed, settings.dataset_size, settings.dataset_size,
                                     conversational=conversational)
    else:
        dataset = synthetic_arithmetic(settings.dataset_size or 4096, settings.seed, max_operand=settings.max_operand,
                                       conversational=conversational)
    return filter_long_prompts(dataset, tokenizer, settings.max_prompt_length)


def _gated_config(settings: RunSettings):
    from ..trl import GatedGRPOConfig

    return GatedGRPOConfig(**trainer_arguments(settings))


# ----------------------------------------------------------------------------------------------------------------------
# The run


def train(settings: RunSettings) -> RunResult:
    """Builds the trainer, trains, saves the final model and writes the reports (see the module docstring)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from fused_gates.plots import describe_gate

    from ..trl import GatedGRPOTrainer
    from .data import write_synthetic_jsonl
    from .rewards import answer_reward, format_reward
    from .tiny_model import mark_tiny_folder

    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The config comes first: under DeepSpeed ZeRO-3 it must exist before the weights are loaded (sharded loading).
    config = _gated_config(settings)
    model, tokenizer, initial_model = load_model_and_tokenizer(settings)
    liger = maybe_apply_liger(model, settings)
    dataset = load_training_data(settings, tokenizer)
    trainer = GatedGRPOTrainer(
        model=model,
        reward_funcs=[format_reward, answer_reward],  # r = r_format + r_answer (eq. 9), logged separately
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    collector = StepMetricsCallback()
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(collector)
    trainer.add_callback(TableCallback(collector, adaptive=settings.eur_target is not None))
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(f"{settings.preset} preset: model {settings.model or 'tiny local model'}, gate "
              f"{describe_gate(dataclasses.asdict(settings))}, {len(dataset)} prompts, "
              f"Liger kernels {'on' if liger else 'off'}, output {output_dir}", flush=True)
    trainer.train()
    final_model = output_dir / FINAL_MODEL
    trainer.save_model(str(final_model))  # every process: under ZeRO-3 the weights are gathered for the save
    if main_process:
        if settings.uses_tiny_model:
            mark_tiny_folder(final_model, trainer.model.config)
        if settings.dataset == "synthetic":
            write_synthetic_jsonl(output_dir / SYNTHETIC_EVAL, settings.max_operand)
        _write_reports(collector.rows, output_dir, settings, initial_model, final_model)
    return RunResult(output_dir, collector.rows, initial_model, final_model)


def _write_reports(rows: list[dict[str, float]], output_dir: Path, settings: RunSettings,
                   initial_model: Path | None, final_model: Path) -> None:
    from fused_gates.plots import describe_gate

    config = describe(settings)
    config["initial_model"] = None if initial_model is None else str(initial_model)
    config["final_model"] = str(final_model)
    # the resolved configuration, so that `fused-gates plot-runs` can label the run by gate and temperatures
    (output_dir / "run_config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    csv_path = write_metrics_csv(rows, output_dir / "metrics.csv")
    title = describe_gate(dataclasses.asdict(settings)) or settings.gate
    plot_path = write_metrics_plot(rows, output_dir / "metrics.png", title=title, eur_target=settings.eur_target)
    print(window_means(rows, ANSWER_REWARD).describe("answer reward"))
    print(window_means(rows, FORMAT_REWARD).describe("format reward"))
    print(window_means(rows, "reward").describe("reward"))
    if settings.eur_target is not None:
        print(f"off-policy EUR, mean over the last third of the run: {mean_off_policy_eur(rows, 2 / 3):.3f} "
              f"(target {settings.eur_target:g})")
    print(f"wrote {csv_path} and {plot_path}")
    print(f"final model: {final_model}")
    if settings.dataset == "synthetic":
        command = ["fused-gates-evaluate", "--benchmark", "synthetic", "--dataset-file",
                   str(output_dir / SYNTHETIC_EVAL), "--num-samples", "8", "--out", str(output_dir / "eval")]
        print("evaluate the initial and the trained policy on every problem of the task (table: eval/summary.md):")
        if initial_model is not None:
            print("  " + shlex.join([*command, "--model", str(initial_model), "--label", "initial policy"]))
        print("  " + shlex.join([*command, "--model", str(final_model), "--label", f"+ RL, {title}"]))


def main(argv: Sequence[str] | None = None) -> int:
    settings, dry_run = parse_command_line(argv)
    if dry_run:
        print(json.dumps(describe(settings), indent=2))
        return 0
    train(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
