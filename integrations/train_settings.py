"""The training script's settings: the two presets, the command line that overrides them, and the trainer arguments
they resolve to.

Presets (``--preset``), every value overridable by its flag:

* ``paper`` -- Qwen/Qwen2.5-7B-Instruct on the equal GSM8K + DeepMath-103K mixture; 8 generations, prompts up to
  1,536 and completions up to 512 tokens, per-device batch 1, gradient accumulation 16, 2 iterations per batch, bf16,
  AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, linear schedule, no warm-up), 5,000 steps; the erf gate with
  tau_pos = 10, tau_neg = 12 (the paper's best); Liger-Kernel's RMSNorm/RoPE/SwiGLU on CUDA. No supervised warm-up
  (the paper starts RL from the instruct model).
* ``offline`` -- the tiny local model on synthetic ``3+4=`` prompts (additions and subtractions of operands 0-4:
  40 distinct problems): a short supervised warm-up on the answer format (``warmup.py``: 100 steps, stopped while
  the model answers about one problem in four; saved as ``<output-dir>/initial-model``), then GRPO with the erf gate
  (tau 10 / 12), 16 prompts x 8 completions of at most 12 tokens per step, 2 updates per batch, AdamW at a constant
  5e-4, 400 steps. CPU, no download, about a minute on 2 free cores.

Rule: ``--preset`` defaults to ``paper`` when ``--model`` is given and to ``offline`` otherwise, so running with no
arguments is always the local run (also on a GPU machine) and naming a model asks for the real recipe.

``--eur-target E`` adapts both gate temperatures after every optimiser step so that the off-policy EUR approaches E
(``adaptive_gate.py``); ``--dry-run`` prints the resolved configuration as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..cli import number_argument

__all__ = [
    "BUILTIN_GATES",
    "OFFLINE",
    "PAPER",
    "PAPER_MODEL",
    "PRESETS",
    "RunSettings",
    "build_parser",
    "describe",
    "parse_command_line",
    "resolve_settings",
    "trainer_arguments",
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
    max_operand: int  # synthetic task: operands in [0, max_operand]
    output_dir: str
    seed: int
    # supervised warm-up of the tiny model (0 steps: none)
    sft_steps: int
    sft_learning_rate: float
    sft_answers: str  # "shuffled" (format only) or "true"
    # gate
    gate: str
    tau_pos: float
    tau_neg: float
    eur_target: float | None  # None: fixed temperatures
    eur_rate: float | None  # None: the controller's default
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
    save_steps: int  # 0: no intermediate checkpoints (the final model is always saved)
    report_to: str

    @property
    def uses_tiny_model(self) -> bool:
        from .tiny_model import is_tiny_folder

        return self.model is None or is_tiny_folder(self.model)


_COMMON: dict[str, Any] = {
    "seed": 0,
    "max_operand": 9,
    "sft_steps": 0,
    "sft_learning_rate": 3e-3,
    "sft_answers": "true",
    "eur_target": None,
    "eur_rate": None,
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
    # Operands 0-4 (40 problems): with the 155 problems of operands 0-9 the tiny model's RL gains within this budget
    # are small and seed-dependent (RL updates each problem's answer only when a sampled completion gets it right).
    "max_operand": 4,
    # 100 warm-up steps of 64 examples with the right answers: format reward ~0.95, answer reward ~0.25 (warmup.py).
    "sft_steps": 100,
    "gate": "erf",
    "tau_pos": 10.0,
    "tau_neg": 12.0,
    "max_prompt_length": 32,
    "max_completion_length": 12,  # the template "<think></think><answer>8</answer>" + end token is 6; room to stray
    # 16 prompts x 8 generations per step; one process, no accumulation.
    "per_device_batch_size": 128,
    "gradient_accumulation_steps": 1,
    # Two updates per batch as in the paper, so that the gate sees ratios != 1.
    "num_iterations": 2,
    # 5e-4: at 2e-3 the policy collapses onto one answer per prompt within ~100 steps and the answer reward stalls.
    "learning_rate": 5e-4,
    "lr_scheduler": "constant",  # a short run; a decaying rate would also drift EUR towards 1 (ratios -> 1)
    "max_steps": 400,
    "bf16": False,
    "model_dtype": "float32",
    "gradient_checkpointing": False,
    "liger": False,
    "save_steps": 0,
}

PRESETS = {"paper": PAPER, "offline": OFFLINE}


# ----------------------------------------------------------------------------------------------------------------------
# Value types: a bad value is an argparse error naming the flag (exit code 2)


positive_int = number_argument(int, lambda v: v > 0, "> 0")
non_negative_int = number_argument(int, lambda v: v >= 0, ">= 0")
positive_float = number_argument(float, lambda v: v > 0, "> 0")
non_negative_float = number_argument(float, lambda v: v >= 0, ">= 0")
unit_interval = number_argument(float, lambda v: 0 < v < 1, "in (0, 1)")
rate_interval = number_argument(float, lambda v: 0 < v <= 1, "in (0, 1]")
beta_interval = number_argument(float, lambda v: 0 <= v < 1, "in [0, 1)")


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
    flag("--dataset-size", type=positive_int, help="rows per source (paper) or in total (synthetic)")
    flag("--max-operand", type=number_argument(int, lambda v: 1 <= v <= 9, "in [1, 9]"),
         help="synthetic task: operands in [0, N] (single digits: the tiny tokenizer's numbers)")
    flag("--output-dir", help="default out/<gate>-<timestamp>")
    flag("--seed", type=non_negative_int)

    warmup = parser.add_argument_group("supervised warm-up (tiny local model only)")
    warmup.add_argument("--sft-steps", type=non_negative_int, help="format warm-up steps before RL (0: none)")
    warmup.add_argument("--sft-learning-rate", type=positive_float)
    warmup.add_argument("--sft-answers", choices=["true", "shuffled"],
                        help="true: the right answers; shuffled: another prompt's answer (format only, a control)")

    gate = parser.add_argument_group("gate")
    gate.add_argument("--gate", help=f"{', '.join(BUILTIN_GATES)} or a name given to fused_gates.register_gate")
    gate.add_argument("--gate-module", action="append", help="module to import first (it may register gates)")
    gate.add_argument("--tau-pos", type=positive_float, help="gate temperature for positive advantages (paper: 10)")
    gate.add_argument("--tau-neg", type=positive_float, help="gate temperature for other advantages (paper: 12)")
    gate.add_argument("--eur-target", type=unit_interval,
                      help="adapt both temperatures (ratio kept) so that the off-policy EUR approaches this value")
    gate.add_argument("--eur-rate", type=rate_interval, help="controller rate for --eur-target (default: 0.25)")
    gate.add_argument("--epsilon", type=unit_interval, help="clip range of --gate clip (GRPO)")
    gate.add_argument("--epsilon-high", type=positive_float,
                      help="upper clip range of --gate clip (default: --epsilon)")
    gate.add_argument("--gate-backend", choices=["auto", "torch", "triton"])
    gate.add_argument("--gate-memory-budget-mb", type=positive_float)
    gate.add_argument("--loss-type", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    gate.add_argument("--beta", type=non_negative_float, help="KL coefficient (0: no reference model)")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--num-generations", type=number_argument(int, lambda v: v >= 2, ">= 2"))
    generation.add_argument("--max-prompt-length", type=positive_int, help="longer prompts are dropped")
    generation.add_argument("--max-completion-length", type=positive_int)
    generation.add_argument("--temperature", type=positive_float)
    generation.add_argument("--use-vllm", action=argparse.BooleanOptionalAction)
    generation.add_argument("--vllm-mode", choices=["colocate", "server"])

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--per-device-batch-size", type=positive_int,
                              help="completions per device and micro-step")
    optimisation.add_argument("--gradient-accumulation-steps", type=positive_int)
    optimisation.add_argument("--num-iterations", type=positive_int, help="updates per generated batch")
    optimisation.add_argument("--learning-rate", "--lr", dest="learning_rate", type=positive_float)
    optimisation.add_argument("--lr-scheduler", help="transformers scheduler name")
    optimisation.add_argument("--warmup-steps", type=non_negative_int, help="learning-rate warm-up steps of RL")
    optimisation.add_argument("--adam-beta1", type=beta_interval)
    optimisation.add_argument("--adam-beta2", type=beta_interval)
    optimisation.add_argument("--adam-epsilon", type=positive_float)
    optimisation.add_argument("--weight-decay", type=non_negative_float)
    optimisation.add_argument("--max-steps", type=positive_int)
    optimisation.add_argument("--bf16", action=argparse.BooleanOptionalAction)
    optimisation.add_argument("--model-dtype", choices=["float32", "bfloat16", "auto"], help="dtype to load weights")
    optimisation.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    optimisation.add_argument("--liger", action=argparse.BooleanOptionalAction,
                              help="Liger-Kernel RMSNorm/RoPE/SwiGLU (CUDA only; --no-liger to disable)")

    bookkeeping = parser.add_argument_group("bookkeeping")
    bookkeeping.add_argument("--logging-steps", type=positive_int)
    bookkeeping.add_argument("--save-steps", type=non_negative_int,
                             help="checkpoint interval (0: none; the final model is saved in any case)")
    bookkeeping.add_argument("--report-to", help="none, wandb, tensorboard, ...")
    return parser


def resolve_settings(argv: Sequence[str] | None = None) -> RunSettings:
    """The preset chosen by the rule in the module docstring, overridden by the flags given."""
    return parse_command_line(argv)[0]


def parse_command_line(argv: Sequence[str] | None) -> tuple[RunSettings, bool]:
    """``(settings, dry_run)``; combinations that cannot run end in an argparse error naming the flags."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    dry_run = given.pop("dry_run", False)
    for module in given.pop("gate_module", None) or []:
        importlib.import_module(module)
    preset = given.pop("preset", "paper" if given.get("model") else "offline")
    values = {**PRESETS[preset], **given, "preset": preset}
    values.setdefault("output_dir", f"out/{values['gate']}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = RunSettings(**values)
    _check_combinations(parser, settings, set(given))
    return settings, dry_run


def gate_has_temperature(gate: str) -> bool:
    from fused_gates import get_gate

    from .adaptive_gate import has_temperature

    return has_temperature(get_gate(gate))


def _check_combinations(parser: argparse.ArgumentParser, settings: RunSettings, given: set[str]) -> None:
    from fused_gates import available_gates

    if settings.gate not in available_gates():
        parser.error(f"unknown gate {settings.gate!r}; available: {', '.join(sorted(available_gates()))}")
    # An option the gate does not use is refused rather than ignored.
    if gate_has_temperature(settings.gate):
        names, reason = ("epsilon", "epsilon_high"), "the clip range of --gate clip"
    else:
        names, reason = ("tau_pos", "tau_neg"), f"{settings.gate!r} has no temperature"
    unused = [name for name in names if name in given]
    if unused:
        flags = " and ".join("--" + name.replace("_", "-") for name in unused)
        parser.error(f"{flags}: not used by --gate {settings.gate} ({reason})")
    if settings.sft_steps > 0 and not (settings.uses_tiny_model and settings.dataset == "synthetic"):
        parser.error("--sft-steps (the format warm-up) works with the tiny local model on --dataset synthetic only; "
                     "pass --sft-steps 0 for other models")
    if settings.eur_target is not None:
        from .adaptive_gate import check_can_adapt

        try:
            check_can_adapt(settings.gate, has_off_policy_updates=settings.num_iterations > 1)
        except ValueError as error:
            parser.error(f"--eur-target: {error}")
    elif settings.eur_rate is not None:
        parser.error("--eur-rate needs --eur-target")


def trainer_arguments(settings: RunSettings) -> dict[str, Any]:
    """The keyword arguments of ``GatedGRPOConfig`` for these settings."""
    arguments = {
        "output_dir": settings.output_dir,
        "seed": settings.seed,
        "gate": settings.gate,
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
    if gate_has_temperature(settings.gate):  # the trainer refuses temperatures for clip
        arguments["gate_tau_pos"], arguments["gate_tau_neg"] = settings.tau_pos, settings.tau_neg
    # Only with a target, so that fixed-temperature runs need nothing of the adaptive trainer options.
    if settings.eur_target is not None:
        arguments["gate_eur_target"] = settings.eur_target
        if settings.eur_rate is not None:
            arguments["gate_eur_rate"] = settings.eur_rate
    return arguments


def describe(settings: RunSettings) -> dict[str, Any]:
    """What ``--dry-run`` prints (and ``run_config.json`` holds)."""
    return {
        "settings": dataclasses.asdict(settings),
        "max_prompt_length": settings.max_prompt_length,
        "trainer_args": trainer_arguments(settings),
        "rewards": ["format_reward", "answer_reward"],
    }
