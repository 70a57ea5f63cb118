"""Train a policy with the gated GRPO/SAPO loss: the paper's recipe (section 5.1, Appendix A) or a quick local run.

Presets (``--preset``), every value overridable by its flag:

* ``paper`` -- Qwen/Qwen2.5-7B-Instruct on the equal GSM8K + DeepMath-103K mixture; 8 generations, prompts up to
  1,536 and completions up to 512 tokens, per-device batch 1, gradient accumulation 16, 2 iterations per batch, bf16,
  AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, linear schedule, no warm-up), 5,000 steps; the erf gate with
  tau_pos = 10, tau_neg = 12 (the paper's best); Liger-Kernel's RMSNorm/RoPE/SwiGLU on CUDA.
* ``offline`` -- a tiny randomly initialised model with a local tokenizer (built in ``<output-dir>/tiny-model``) on
  synthetic ``3+4=`` prompts, 12-token completions, a high learning rate, 60 steps: under a minute on two free CPU
  cores, no download, and the format reward climbs visibly (mean reward about 0.06 over the first 10 steps,
  0.45 over the last 10).

Rule: ``--preset`` defaults to ``paper`` when ``--model`` is given and to ``offline`` otherwise, so running with no
arguments is always the local run (also on a GPU machine) and naming a model asks for the real recipe.

Each run prints a per-step table (reward, its format and answer parts, EUR, entropy, gate mean) under the progress
bar and writes ``metrics.csv`` (one row per step) and ``metrics.png`` to the output directory
(default ``out/<gate>-<timestamp>``). ``--dry-run`` prints the resolved configuration as JSON and exits.
Multi-GPU: ``accelerate launch --config_file <zero2.yaml|zero3.yaml> -m fused_gates.integrations.train_grpo ...``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

__all__ = [
    "OFFLINE",
    "PAPER",
    "PAPER_MODEL",
    "RunSettings",
    "StepMetricsCallback",
    "TableProgressCallback",
    "main",
    "resolve_settings",
    "trainer_arguments",
    "write_metrics_csv",
    "write_metrics_plot",
]

PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
BUILTIN_GATES = ("clip", "sigmoid", "erf", "arctan", "softsign")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, after the preset and the command-line overrides are merged."""

    preset: str
    model: str | None  # None: the tiny local model
    dataset: str  # "paper" (GSM8K + DeepMath) or "synthetic"
    dataset_size: int | None  # per source for "paper", total for "synthetic"
    output_dir: str
    seed: int
    # gate
    gate: str
    tau_pos: float
    tau_neg: float
    epsilon: float
    epsilon_high: float | None
    gate_backend: str
    gate_memory_budget_mb: float | None
    loss_type: str
    beta: float
    # generation
    num_generations: int
    max_prompt_length: int
    max_completion_length: int
    temperature: float
    use_vllm: bool
    vllm_mode: str
    # optimisation
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_iterations: int
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_steps: int
    bf16: bool
    model_dtype: str
    gradient_checkpointing: bool
    liger: bool
    # bookkeeping
    logging_steps: int
    save_steps: int  # 0: no checkpoints
    report_to: str


_COMMON: dict[str, Any] = {
    "seed": 0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "gate_backend": "auto",
    "gate_memory_budget_mb": None,
    "loss_type": "grpo",
    "beta": 0.0,  # cold start without a reference model, as in the paper
    "num_generations": 8,
    "temperature": 1.0,
    "use_vllm": False,
    "vllm_mode": "colocate",
    "lr_scheduler": "linear",
    "warmup_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "logging_steps": 1,
    "report_to": "none",
}

PAPER: dict[str, Any] = {
    **_COMMON,
    "model": PAPER_MODEL,
    "dataset": "paper",
    "dataset_size": None,
    "gate": "erf",
    "tau_pos": 10.0,
    "tau_neg": 12.0,
    "max_prompt_length": 1536,
    "max_completion_length": 512,
    "per_device_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "num_iterations": 2,
    "learning_rate": 1e-6,
    "max_steps": 5000,
    "bf16": True,
    # fp32 master weights: an lr-1e-6 AdamW step is far below bf16's resolution; bf16 runs the maths (autocast or
    # DeepSpeed's bf16 mode, which keeps its own fp32 copy).
    "model_dtype": "float32",
    "gradient_checkpointing": True,
    "liger": True,
    "save_steps": 500,
}

OFFLINE: dict[str, Any] = {
    **_COMMON,
    "model": None,
    "dataset": "synthetic",
    "dataset_size": 4096,
    "gate": "erf",
    "tau_pos": 10.0,
    "tau_neg": 12.0,
    "max_prompt_length": 32,
    "max_completion_length": 12,  # room for "<think>..</think><answer>7</answer>" and an end token
    # 4 prompts x 8 generations per step; one process, no accumulation.
    "per_device_batch_size": 32,
    "gradient_accumulation_steps": 1,
    # Two updates per batch as in the paper, so that the gate sees ratios != 1.
    "num_iterations": 2,
    # A random 64-wide model needs large steps to move within a minute; 1e-2 collapses onto the 0.25 format tier.
    "learning_rate": 5e-3,
    "max_steps": 60,
    "bf16": False,
    "model_dtype": "float32",
    "gradient_checkpointing": False,
    "liger": False,
    "save_steps": 0,
}

PRESETS = {"paper": PAPER, "offline": OFFLINE}


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to "not given" (suppressed), so that the preset fills what the user left out."""
    parser = argparse.ArgumentParser(
        prog="fused-gates-train",
        description="GRPO/SAPO training with the gates of 'A Systematic Study of Gate Functions in SAPO'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    flag = parser.add_argument
    flag("--preset", choices=sorted(PRESETS), help="paper when --model is given, else offline")
    flag("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
    flag("--model", help=f"model id or folder (paper: {PAPER_MODEL}; offline: the tiny local model)")
    flag("--dataset", choices=["paper", "synthetic"], help="GSM8K + DeepMath mixture, or synthetic arithmetic")
    flag("--dataset-size", type=int, help="rows per source (paper) or in total (synthetic)")
    flag("--output-dir", help="default out/<gate>-<timestamp>")
    flag("--seed", type=int)

    gate = parser.add_argument_group("gate")
    gate.add_argument("--gate", help=f"{', '.join(BUILTIN_GATES)} or a name given to fused_gates.register_gate")
    gate.add_argument("--gate-module", action="append", help="module to import first (it may register gates)")
    gate.add_argument("--tau-pos", type=float, help="gate temperature for positive advantages (paper best: 10)")
    gate.add_argument("--tau-neg", type=float, help="gate temperature for other advantages (paper best: 12)")
    gate.add_argument("--epsilon", type=float, help="clip range of --gate clip (GRPO)")
    gate.add_argument("--epsilon-high", type=float, help="upper clip range of --gate clip (default: --epsilon)")
    gate.add_argument("--gate-backend", choices=["auto", "torch", "triton"])
    gate.add_argument("--gate-memory-budget-mb", type=float)
    gate.add_argument("--loss-type", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    gate.add_argument("--beta", type=float, help="KL coefficient (0: no reference model)")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--num-generations", type=int)
    generation.add_argument("--max-prompt-length", type=int, help="longer prompts are dropped from the dataset")
    generation.add_argument("--max-completion-length", type=int)
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--use-vllm", action=argparse.BooleanOptionalAction)
    generation.add_argument("--vllm-mode", choices=["colocate", "server"])

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--per-device-batch-size", type=int, help="completions per device and micro-step")
    optimisation.add_argument("--gradient-accumulation-steps", type=int)
    optimisation.add_argument("--num-iterations", type=int, help="updates per generated batch")
    optimisation.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float)
    optimisation.add_argument("--lr-scheduler", help="transformers scheduler name")
    optimisation.add_argument("--warmup-steps", type=int)
    optimisation.add_argument("--adam-beta1", type=float)
    optimisation.add_argument("--adam-beta2", type=float)
    optimisation.add_argument("--adam-epsilon", type=float)
    optimisation.add_argument("--weight-decay", type=float)
    optimisation.add_argument("--max-steps", type=int)
    optimisation.add_argument("--bf16", action=argparse.BooleanOptionalAction)
    optimisation.add_argument("--model-dtype", choices=["float32", "bfloat16", "auto"], help="dtype to load weights")
    optimisation.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    optimisation.add_argument("--liger", action=argparse.BooleanOptionalAction,
                              help="Liger-Kernel RMSNorm/RoPE/SwiGLU (CUDA only; --no-liger to disable)")

    bookkeeping = parser.add_argument_group("bookkeeping")
    bookkeeping.add_argument("--logging-steps", type=int)
    bookkeeping.add_argument("--save-steps", type=int, help="checkpoint interval (0: none)")
    bookkeeping.add_argument("--report-to", help="none, wandb, tensorboard, ...")
    return parser


def resolve_settings(argv: Sequence[str] | None = None) -> RunSettings:
    """The preset chosen by the rule in the module docstring, overridden by the flags given."""
    return _parse_command_line(argv)[0]


def _parse_command_line(argv: Sequence[str] | None) -> tuple[RunSettings, bool]:
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    dry_run = given.pop("dry_run", False)
    for module in given.pop("gate_module", None) or []:
        importlib.import_module(module)
    preset = given.pop("preset", "paper" if given.get("model") else "offline")
    values = {**PRESETS[preset], **given, "preset": preset}
    values.setdefault("output_dir", f"out/{values['gate']}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_gate(parser, values["gate"])
    return RunSettings(**values), dry_run


def _check_gate(parser: argparse.ArgumentParser, gate: str) -> None:
    from fused_gates import available_gates

    if gate not in available_gates():
        parser.error(f"unknown gate {gate!r}; available: {', '.join(sorted(available_gates()))}")


def trainer_arguments(settings: RunSettings) -> dict[str, Any]:
    """The keyword arguments of ``GatedGRPOConfig`` for these settings."""
    return {
        "output_dir": settings.output_dir,
        "seed": settings.seed,
        "gate": settings.gate,
        "gate_tau_pos": settings.tau_pos,
        "gate_tau_neg": settings.tau_neg,
        "gate_backend": settings.gate_backend,
        "gate_memory_budget_mb": settings.gate_memory_budget_mb,
        "epsilon": settings.epsilon,
        "epsilon_high": settings.epsilon_high,
        "loss_type": settings.loss_type,
        "beta": settings.beta,
        "num_generations": settings.num_generations,
        "max_completion_length": settings.max_completion_length,
        "temperature": settings.temperature,
        "use_vllm": settings.use_vllm,
        "vllm_mode": settings.vllm_mode,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "num_iterations": settings.num_iterations,
        "optim": "adamw_torch",
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler,
        "warmup_steps": settings.warmup_steps,
        "adam_beta1": settings.adam_beta1,
        "adam_beta2": settings.adam_beta2,
        "adam_epsilon": settings.adam_epsilon,
        "weight_decay": settings.weight_decay,
        "max_steps": settings.max_steps,
        "bf16": settings.bf16,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps" if settings.save_steps > 0 else "no",
        "save_steps": max(settings.save_steps, 1),
        "report_to": settings.report_to,
    }


def describe(settings: RunSettings) -> dict[str, Any]:
    """What ``--dry-run`` prints."""
    return {
        "settings": dataclasses.asdict(settings),
        "max_prompt_length": settings.max_prompt_length,
        "trainer_args": trainer_arguments(settings),
        "rewards": ["format_reward", "answer_reward"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Per-step metrics: collection, table, CSV and plot

# (column title, logged key) of the printed table; TRL names each reward's mean after its function.
TABLE_COLUMNS = (
    ("step", "step"),
    ("reward", "reward"),
    ("format", "rewards/format_reward/mean"),
    ("answer", "rewards/answer_reward/mean"),
    ("EUR", "eur"),
    ("entropy", "entropy"),
    ("gate mean", "gate/mean"),
)


class StepMetricsCallback(TrainerCallback):
    """Collects the metrics the trainer logs at each training step (one dict per logging step, with ``step``).

    With ``num_iterations`` > 1 a batch is generated (and its rewards logged) only every ``num_iterations`` steps;
    the steps in between reuse it and log the loss-side metrics (ratio, gate, EUR, entropy) alone.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training-step logs carry the loss; the end-of-training summary (train_runtime, ...) is left out.
        if logs and "loss" in logs and "train_runtime" not in logs:
            row = {"step": state.global_step}
            row.update({key: value for key, value in logs.items() if isinstance(value, int | float)})
            self.rows.append(row)


def _format_cell(value: Any, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, int):
        return str(value).rjust(width)
    return f"{value:.4f}".rjust(width)


def format_table_header() -> str:
    return "  ".join(title.rjust(_cell_width(title)) for title, _ in TABLE_COLUMNS)


def format_table_row(row: dict[str, Any]) -> str:
    return "  ".join(_format_cell(row.get(key), _cell_width(title)) for title, key in TABLE_COLUMNS)


def _cell_width(title: str) -> int:
    return max(len(title), 5 if title == "step" else 8)


class TableProgressCallback(TrainerCallback):
    """A progress bar with one table row per logged step printed above it (instead of the raw log dicts)."""

    def __init__(self, collector: StepMetricsCallback) -> None:
        self.collector = collector
        self.bar = None
        self.printed = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc="steps", dynamic_ncols=True)
            self.bar.write(format_table_header())

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Runs after the collector (callbacks run in the order they were added).
        if self.bar is None:
            return
        for row in self.collector.rows[self.printed :]:
            self.bar.write(format_table_row(row))
        self.printed = len(self.collector.rows)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per logged step; the table's columns first, then every other metric in name order."""
    path = Path(path)
    leading = [key for _, key in TABLE_COLUMNS]
    others = sorted({key for row in rows for key in row} - set(leading))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=leading + others, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


PLOT_PANELS = (
    ("reward", "reward"),
    ("format reward", "rewards/format_reward/mean"),
    ("EUR", "eur"),
    ("entropy", "entropy"),
)


def write_metrics_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Reward, format reward, EUR and entropy against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for axis, (label, key) in zip(axes.flat, PLOT_PANELS, strict=True):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="." if len(points) < 50 else None)
        axis.set_title(label)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def summarize_rewards(rows: Sequence[dict[str, Any]], window: int = 10) -> str:
    """Mean reward over the first and the last ``window`` logged steps."""
    rewards = [row["reward"] for row in rows if math.isfinite(row.get("reward", math.nan))]
    if not rewards:
        return "no reward logged"
    first, last = rewards[:window], rewards[-window:]
    return (f"mean reward, first {len(first)} steps: {sum(first) / len(first):.3f}; "
            f"last {len(last)} steps: {sum(last) / len(last):.3f}")


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def load_model_and_tokenizer(settings: RunSettings):
    """The policy and its tokenizer: the tiny local model for ``model=None``, else from the Hub or a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny_model import build_or_load_tiny, is_tiny_folder, load_tiny

    if settings.model is None:
        folder = build_or_load_tiny(Path(settings.output_dir) / "tiny-model", seed=settings.seed)
        return load_tiny(folder)
    if is_tiny_folder(settings.model):
        return load_tiny(settings.model)
    dtype = settings.model_dtype if settings.model_dtype == "auto" else getattr(torch, settings.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(settings.model, padding_side="left", truncation_side="left")
    return model, tokenizer


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
        dataset = synthetic_arithmetic(settings.dataset_size or 4096, settings.seed, conversational=conversational)
    return filter_long_prompts(dataset, tokenizer, settings.max_prompt_length)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def train(settings: RunSettings) -> list[dict[str, float]]:
    """Builds the trainer, trains, writes ``metrics.csv`` and ``metrics.png``; returns the per-step rows."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .rewards import answer_reward, format_reward
    from .trl import GatedGRPOConfig, GatedGRPOTrainer

    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The config comes first: under DeepSpeed ZeRO-3 it must exist before the weights are loaded (sharded loading).
    config = GatedGRPOConfig(**trainer_arguments(settings))
    model, tokenizer = load_model_and_tokenizer(settings)
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
    trainer.add_callback(TableProgressCallback(collector))
    if trainer.is_world_process_zero():
        print(f"{settings.preset} preset: model {settings.model or 'tiny local model'}, gate {settings.gate}, "
              f"{len(dataset)} prompts, Liger kernels {'on' if liger else 'off'}, output {output_dir}")
    trainer.train()
    if settings.save_steps > 0:
        trainer.save_model()
    if trainer.is_world_process_zero():
        _write_reports(collector.rows, output_dir, settings)
    return collector.rows


def _write_reports(rows: list[dict[str, float]], output_dir: Path, settings: RunSettings) -> None:
    # the resolved configuration, so that `fused-gates plot-runs` can label the run by gate and temperatures
    (output_dir / "run_config.json").write_text(json.dumps(describe(settings), indent=1, default=str) + "\n")
    csv_path = write_metrics_csv(rows, output_dir / "metrics.csv")
    title = f"{settings.gate} (tau+ {settings.tau_pos:g}, tau- {settings.tau_neg:g})"
    if settings.gate == "clip":
        title = f"clip (epsilon {settings.epsilon:g})"
    plot_path = write_metrics_plot(rows, output_dir / "metrics.png", title=title)
    print(summarize_rewards(rows))
    print(f"wrote {csv_path} and {plot_path}")


def main(argv: Sequence[str] | None = None) -> int:
    settings, dry_run = _parse_command_line(argv)
    if dry_run:
        print(json.dumps(describe(settings), indent=2))
        return 0
    train(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
