"""The training script's settings: the two presets, the command line that overrides them, and the trainer arguments
they resolve to, all derived from one table (:data:`SETTINGS`: one :class:`Setting` per option).

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

``--gate`` takes the paper's gates, the gates that read more than r (``dppo``, ``m2po``, ``bapo``, ``aspo``,
``gmpo``: ``fused_gates.gate_inputs``; their scalar options as ``--dppo-delta`` ... ``--gmpo-epsilon``, BAPO's bounds
and steps at the paper's values) and registered gates; a flag the gate does not use is refused.

``--eur-target E`` adapts both gate temperatures after every optimiser step so that the off-policy EUR approaches E
(``adaptive_gate.py``); ``--dry-run`` prints the resolved configuration as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fused_gates import BACKENDS, INPUT_GATES, PAPER_GATES, available_gates, get_gate
from fused_gates.entropy_trust import ESTR_EPSILON
from fused_gates.gate_inputs import DEFAULTS as D
from fused_gates.gate_inputs import resolve_input_parameters
from fused_gates.options import LossOptions
from fused_gates.validation import number_argument

__all__ = [
    "OFFLINE",
    "PAPER",
    "PAPER_MODEL",
    "PRESETS",
    "SETTINGS",
    "RunControl",
    "RunSettings",
    "Setting",
    "build_parser",
    "describe",
    "gate_has_temperature",
    "parse_command_line",
    "resolve_settings",
    "trainer_arguments",
]

PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
SWITCH = argparse.BooleanOptionalAction
_SAME = object()  # a preset's value: the common one

# ----------------------------------------------------------------------------------------------------------------------
# Value types: a bad value is an argparse error naming the flag (exit code 2)

positive_int = number_argument(int, lambda v: v > 0, "> 0")
non_negative_int = number_argument(int, lambda v: v >= 0, ">= 0")
positive_float = number_argument(float, lambda v: v > 0, "> 0")
non_negative_float = number_argument(float, lambda v: v >= 0, ">= 0")
unit_interval = number_argument(float, lambda v: 0 < v < 1, "in (0, 1)")
rate_interval = number_argument(float, lambda v: 0 < v <= 1, "in (0, 1]")
beta_interval = number_argument(float, lambda v: 0 <= v < 1, "in [0, 1)")


def gate_has_temperature(gate: str) -> bool:
    return get_gate(gate).has_temperature


TrainerField = str | Callable[[Any, "RunSettings"], dict[str, Any]] | None


@dataclass(frozen=True)
class Setting:
    """One option of the training script: its field of :class:`RunSettings`, its preset values, its flag and the
    ``GatedGRPOConfig`` argument it becomes.

    ``default`` is the value of both presets unless ``paper`` / ``offline`` say otherwise; ``trainer`` is the
    config field (same value), a function ``(value, settings) -> {field: value}``, or None (the script's own).
    ``field=False``: a flag only (not a setting)."""

    name: str
    default: Any = None
    paper: Any = _SAME
    offline: Any = _SAME
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    action: Any = None
    nargs: str | None = None
    const: Any = None
    metavar: str | None = None
    help: str | None = None
    group: str | None = None
    aliases: tuple[str, ...] = ()
    trainer: TrainerField = None
    field: bool = True
    annotation: str = "Any"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def preset_value(self, preset: str) -> Any:
        value = getattr(self, preset)
        return self.default if value is _SAME else value


def _temperature(name: str) -> Callable[[Any, RunSettings], dict[str, Any]]:
    # the trainer refuses temperatures for a gate without one (clip)
    return lambda value, settings: {name: value} if gate_has_temperature(settings.gate) else {}


def _adaptive(name: str) -> Callable[[Any, RunSettings], dict[str, Any]]:
    # only with a target, so that fixed-temperature runs need nothing of the adaptive trainer options
    return lambda value, settings: ({name: value} if settings.eur_target is not None and value is not None else {})


def _input_option(name: str) -> Callable[[Any, RunSettings], dict[str, Any]]:
    # a hyperparameter of the gates that read more than r; None: the paper's default (fused_gates.gate_inputs)
    return lambda value, settings: {f"gate_{name}": value} if value is not None else {}


_INPUT_OPTIONS = ("dppo_delta", "m2po_threshold", "bapo_rho", "aspo_dual_clip", "gmpo_epsilon")


def _save_steps(value: int, settings: RunSettings) -> dict[str, Any]:
    return {"save_strategy": "steps" if value > 0 else "no", "save_steps": max(value, 1)}


WARMUP, GATE, GENERATION = "supervised warm-up (tiny local model only)", "gate", "generation"
OPTIMISATION, BOOKKEEPING = "optimisation", "bookkeeping"
RUN_FOLDER = "the output folder (an existing one is never reused silently)"

SETTINGS: tuple[Setting, ...] = (
    Setting("preset", choices=("offline", "paper"), help="paper when --model is given, else offline",
            annotation="str"),
    Setting("dry_run", action="store_true", help="print the resolved configuration as JSON and exit", field=False),
    Setting("model", paper=PAPER_MODEL, help=f"model id or folder (paper: {PAPER_MODEL}; offline: the tiny local "
            "model)", annotation="str | None"),  # None: the tiny local model
    Setting("dataset", paper="paper", offline="synthetic", choices=("paper", "synthetic"),
            help="GSM8K + DeepMath mixture, or synthetic arithmetic", annotation="str"),
    Setting("dataset_size", paper=None, offline=4096, type=positive_int,
            help="rows per source (paper) or in total (synthetic)", annotation="int | None"),
    # Operands 0-4 (40 problems) offline: with the 155 problems of operands 0-9 the tiny model's RL gains within this
    # budget are small and seed-dependent (RL updates each problem's answer only when a sampled completion gets it
    # right).
    Setting("max_operand", 9, offline=4, type=number_argument(int, lambda v: 1 <= v <= 9, "in [1, 9]"),
            help="synthetic task: operands in [0, N] (single digits: the tiny tokenizer's numbers)", annotation="int"),
    Setting("output_dir", help="default out/<gate>-<timestamp>", trainer="output_dir", annotation="str"),
    Setting("seed", 0, type=non_negative_int, trainer="seed", annotation="int"),
    # 100 warm-up steps of 64 examples with the right answers: format reward ~0.95, answer reward ~0.25 (warmup.py).
    Setting("sft_steps", 0, offline=100, type=non_negative_int, group=WARMUP,
            help="format warm-up steps before RL (0: none)", annotation="int"),
    Setting("sft_learning_rate", 3e-3, type=positive_float, group=WARMUP, annotation="float"),
    Setting("sft_answers", "true", choices=("true", "shuffled"), group=WARMUP,
            help="true: the right answers; shuffled: another prompt's answer (format only, a control)",
            annotation="str"),
    Setting("gate", "erf", group=GATE, help=f"{', '.join((*PAPER_GATES, *INPUT_GATES))} or a name given to "
            "fused_gates.register_gate", trainer="gate", annotation="str"),
    Setting("gate_module", action="append", group=GATE, help="module to import first (it may register gates)",
            field=False),
    Setting("tau_pos", 10.0, type=positive_float, group=GATE,
            help="gate temperature for positive advantages (paper: 10)", trainer=_temperature("gate_tau_pos"),
            annotation="float"),
    Setting("tau_neg", 12.0, type=positive_float, group=GATE,
            help="gate temperature for other advantages (paper: 12)", trainer=_temperature("gate_tau_neg"),
            annotation="float"),
    Setting("eur_target", None, type=unit_interval, group=GATE,  # None: fixed temperatures
            help="adapt both temperatures (ratio kept) so that the off-policy EUR approaches this value",
            trainer=_adaptive("gate_eur_target"), annotation="float | None"),
    Setting("eur_rate", None, type=rate_interval, group=GATE,  # None: the controller's default
            help="controller rate for --eur-target (default: 0.25)", trainer=_adaptive("gate_eur_rate"),
            annotation="float | None"),
    Setting("epsilon", 0.2, type=unit_interval, group=GATE, help="clip range of --gate clip (GRPO) and aspo",
            trainer="epsilon", annotation="float"),
    Setting("epsilon_high", None, type=positive_float, group=GATE,
            help="upper clip range of --gate clip (default: --epsilon)", trainer="epsilon_high",
            annotation="float | None"),
    # the gates that read more than r (fused_gates.gate_inputs); the vector options (bapo's bounds and steps) keep the
    # paper's defaults here
    *(Setting(name, None, type=kind, group=GATE, help=f"--gate {what}", trainer=_input_option(name),
              annotation="float | None")
      for name, kind, what in (
          ("dppo_delta", positive_float, f"dppo: bound on |p - p_old| ({D.dppo_delta_high:g}); --gate dppo_kl: bound "
           f"on the binary KL ({D.dppo_kl_delta_high:g})"),
          ("m2po_threshold", positive_float, f"m2po: bound on the second moment of log r ({D.m2po_threshold:g})"),
          ("bapo_rho", unit_interval, f"bapo: target share of positive tokens in the loss ({D.bapo_rho:g})"),
          ("aspo_dual_clip", positive_float, f"aspo: soft dual clip of the importance weight ({D.aspo_dual_clip:g})"),
          ("gmpo_epsilon", positive_float, f"gmpo: log-space clip range of the token ratios ({D.gmpo_epsilon_high:g})"),
      )),

    # the entropy-scaled trust region (fused_gates.entropy_trust) on a gate of the token's ratio
    Setting("estr_threshold", None, type=positive_float, group=GATE,
            help="keep a token's policy term where (log r)^2 <= threshold * (H_old + --estr-epsilon) (off)",
            trainer="gate_estr_threshold", annotation="float | None"),
    Setting("estr_epsilon", None, type=positive_float, group=GATE,
            help=f"entropy floor of --estr-threshold ({ESTR_EPSILON:g})", trainer="gate_estr_epsilon",
            annotation="float | None"),
    Setting("gate_backend", "auto", choices=BACKENDS, group=GATE, trainer="gate_backend", annotation="str"),
    Setting("gate_memory_budget_mb", None, type=positive_float, group=GATE, trainer="gate_memory_budget_mb",
            annotation="float | None"),
    # TRL's aggregations of the paper's objectives (luspo is left to the library)
    Setting("loss_type", "grpo", choices=("grpo", "bnpo", "dr_grpo", "dapo"), group=GATE, trainer="loss_type",
            annotation="str"),
    # 0: cold start without a reference model, as in the paper
    Setting("beta", 0.0, type=non_negative_float, group=GATE, help="KL coefficient (0: no reference model)",
            trainer="beta", annotation="float"),
    # offline: 16 prompts x 8 generations per step
    Setting("num_generations", 8, type=number_argument(int, lambda v: v >= 2, ">= 2"), group=GENERATION,
            trainer="num_generations", annotation="int"),
    Setting("max_prompt_length", paper=1536, offline=32, type=positive_int, group=GENERATION,
            help="longer prompts are dropped", annotation="int"),
    # offline: the template "<think></think><answer>8</answer>" + end token is 6; room to stray
    Setting("max_completion_length", paper=512, offline=12, type=positive_int, group=GENERATION,
            trainer="max_completion_length", annotation="int"),
    Setting("temperature", 1.0, type=positive_float, group=GENERATION, trainer="temperature", annotation="float"),
    Setting("use_vllm", False, action=SWITCH, group=GENERATION, trainer="use_vllm", annotation="bool"),
    Setting("vllm_mode", "colocate", choices=("colocate", "server"), group=GENERATION, trainer="vllm_mode",
            annotation="str"),
    # offline: one process, no accumulation
    Setting("per_device_batch_size", paper=1, offline=128, type=positive_int, group=OPTIMISATION,
            help="completions per device and micro-step", trainer="per_device_train_batch_size", annotation="int"),
    Setting("gradient_accumulation_steps", paper=16, offline=1, type=positive_int, group=OPTIMISATION,
            trainer="gradient_accumulation_steps", annotation="int"),
    # Two updates per batch as in the paper, so that the gate sees ratios != 1.
    Setting("num_iterations", 2, type=positive_int, group=OPTIMISATION, help="updates per generated batch",
            trainer="num_iterations", annotation="int"),
    # offline 5e-4: at 2e-3 the policy collapses onto one answer per prompt within ~100 steps and the answer reward
    # stalls
    Setting("learning_rate", paper=1e-6, offline=5e-4, type=positive_float, group=OPTIMISATION, aliases=("--lr",),
            trainer="learning_rate", annotation="float"),
    # offline constant: a short run; a decaying rate would also drift EUR towards 1 (ratios -> 1)
    Setting("lr_scheduler", "linear", offline="constant", group=OPTIMISATION, help="transformers scheduler name",
            trainer="lr_scheduler_type", annotation="str"),
    Setting("warmup_steps", 0, type=non_negative_int, group=OPTIMISATION, help="learning-rate warm-up steps of RL",
            trainer="warmup_steps", annotation="int"),
    Setting("adam_beta1", 0.9, type=beta_interval, group=OPTIMISATION, trainer="adam_beta1", annotation="float"),
    Setting("adam_beta2", 0.999, type=beta_interval, group=OPTIMISATION, trainer="adam_beta2", annotation="float"),
    Setting("adam_epsilon", 1e-8, type=positive_float, group=OPTIMISATION, trainer="adam_epsilon",
            annotation="float"),
    Setting("weight_decay", 0.0, type=non_negative_float, group=OPTIMISATION, trainer="weight_decay",
            annotation="float"),
    Setting("max_steps", paper=5000, offline=400, type=positive_int, group=OPTIMISATION, trainer="max_steps",
            annotation="int"),
    Setting("bf16", paper=True, offline=False, action=SWITCH, group=OPTIMISATION, trainer="bf16", annotation="bool"),
    # fp32 master weights: an lr-1e-6 AdamW step is far below bf16's resolution; bf16 runs the maths (autocast or
    # DeepSpeed's bf16 mode, which keeps its own fp32 copy).
    Setting("model_dtype", "float32", choices=("float32", "bfloat16", "auto"), group=OPTIMISATION,
            help="dtype to load weights", annotation="str"),
    Setting("gradient_checkpointing", paper=True, offline=False, action=SWITCH, group=OPTIMISATION,
            trainer="gradient_checkpointing", annotation="bool"),
    Setting("liger", paper=True, offline=False, action=SWITCH, group=OPTIMISATION,
            help="Liger-Kernel RMSNorm/RoPE/SwiGLU (CUDA only; --no-liger to disable)", annotation="bool"),
    Setting("logging_steps", 1, type=positive_int, group=BOOKKEEPING, trainer="logging_steps", annotation="int"),
    Setting("save_steps", paper=500, offline=0, type=non_negative_int, group=BOOKKEEPING,
            help="checkpoint interval (0: none; the final model is saved in any case)", trainer=_save_steps,
            annotation="int"),
    Setting("report_to", "none", group=BOOKKEEPING, help="none, wandb, tensorboard, ...", trainer="report_to",
            annotation="str"),
    Setting("resume", nargs="?", const=True, metavar="CHECKPOINT", group=RUN_FOLDER, field=False,
            help="continue the run in --output-dir from its latest checkpoint-* (or from CHECKPOINT): model, "
                 "optimiser, scheduler, RNG, adaptive temperature, data order and metrics.csv"),
    Setting("overwrite", action="store_true", group=RUN_FOLDER, field=False,
            help="delete the run already in --output-dir and start over"),
)
FIELDS = tuple(setting for setting in SETTINGS if setting.field)
TRAINER_CONSTANTS = {"optim": "adamw_torch"}


def _uses_tiny_model(self: RunSettings) -> bool:
    from .tiny_model import is_tiny_folder

    return self.model is None or is_tiny_folder(self.model)


RunSettings = dataclasses.make_dataclass(
    "RunSettings", [(setting.name, setting.annotation) for setting in FIELDS], frozen=True,
    namespace={"uses_tiny_model": property(_uses_tiny_model), "__module__": __name__,
               "__doc__": "Everything a run needs, after the preset and the command-line overrides are merged (one "
                          "field per entry of SETTINGS)."},
)


def _preset(name: str) -> dict[str, Any]:
    return {setting.name: setting.preset_value(name) for setting in FIELDS
            if setting.name not in ("preset", "output_dir")}


PAPER: dict[str, Any] = _preset("paper")
OFFLINE: dict[str, Any] = _preset("offline")
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
    groups: dict[str | None, Any] = {None: parser}
    for setting in SETTINGS:
        if setting.group not in groups:
            groups[setting.group] = parser.add_argument_group(setting.group)
        options = {key: value for key, value in (("type", setting.type), ("choices", setting.choices),
                                                 ("action", setting.action), ("nargs", setting.nargs),
                                                 ("const", setting.const), ("metavar", setting.metavar),
                                                 ("help", setting.help)) if value is not None}
        if "choices" in options:
            options["choices"] = list(options["choices"])
        if setting.aliases:
            options["dest"] = setting.name
        groups[setting.group].add_argument(setting.flag, *setting.aliases, **options)
    return parser


@dataclass(frozen=True)
class RunControl:
    """What the command line asks of the run besides its settings."""

    dry_run: bool = False
    resume: bool | str = False  # True: the latest checkpoint of the output folder; a path: that checkpoint
    overwrite: bool = False


def resolve_settings(argv: Sequence[str] | None = None) -> RunSettings:
    """The preset chosen by the rule in the module docstring, overridden by the flags given."""
    return parse_command_line(argv)[0]


def parse_command_line(argv: Sequence[str] | None) -> tuple[RunSettings, RunControl]:
    """``(settings, control)``; combinations that cannot run end in an argparse error naming the flags."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    control = RunControl(given.pop("dry_run", False), given.pop("resume", False), given.pop("overwrite", False))
    if control.resume and control.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the run, or start over")
    for module in given.pop("gate_module", None) or []:
        importlib.import_module(module)
    preset = given.pop("preset", "paper" if given.get("model") else "offline")
    values = {**PRESETS[preset], **given, "preset": preset}
    values.setdefault("output_dir", f"out/{values['gate']}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = RunSettings(**values)
    _check_combinations(parser, settings, set(given))
    return settings, control


def _check_combinations(parser: argparse.ArgumentParser, settings: RunSettings, given: set[str]) -> None:
    if settings.gate not in available_gates() and settings.gate not in INPUT_GATES:
        known = sorted((*available_gates(), *INPUT_GATES))
        parser.error(f"unknown gate {settings.gate!r}; available: {', '.join(known)}")
    # An option the gate does not use is refused rather than ignored.
    if gate_has_temperature(settings.gate):
        names, reason = ("epsilon", "epsilon_high"), "the clip range of --gate clip"
    else:
        names, reason = ("tau_pos", "tau_neg"), f"{settings.gate!r} has no temperature"
    unused = [name for name in names if name in given]
    if settings.gate in INPUT_GATES and settings.gate != "aspo":  # of these, only ASPO's clip takes the epsilons
        unused += [name for name in ("epsilon", "epsilon_high") if name in given]
        reason = f"{settings.gate!r} has neither temperature nor clip range"
    if unused:
        flags = " and ".join("--" + name.replace("_", "-") for name in unused)
        parser.error(f"{flags}: not used by --gate {settings.gate} ({reason})")
    options = {name: getattr(settings, name) for name in _INPUT_OPTIONS}
    try:
        resolve_input_parameters(get_gate(settings.gate), options)
    except (TypeError, ValueError) as error:
        name, _, message = str(error).partition(": ")
        parser.error(f"--{name.replace('_', '-')}: {message}")
    try:  # the entropy-scaled trust region, on the gates of one token's ratio
        LossOptions(estr_threshold=settings.estr_threshold, estr_epsilon=settings.estr_epsilon).check_estr(
            get_gate(settings.gate))
    except (TypeError, ValueError) as error:
        name, _, message = str(error).partition(": ")
        parser.error(f"--{name.replace('_', '-')}: {message}")
    if settings.sft_steps > 0 and not (settings.uses_tiny_model and settings.dataset == "synthetic"):
        parser.error("--sft-steps (the format warm-up) works with the tiny local model on --dataset synthetic only; "
                     "pass --sft-steps 0 for other models")
    if settings.eur_target is not None:
        from ..trl.adaptive_gate import check_can_adapt

        try:
            check_can_adapt(settings.gate, has_off_policy_updates=settings.num_iterations > 1)
        except ValueError as error:
            parser.error(f"--eur-target: {error}")
    elif settings.eur_rate is not None:
        parser.error("--eur-rate needs --eur-target")


def trainer_arguments(settings: RunSettings) -> dict[str, Any]:
    """The keyword arguments of ``GatedGRPOConfig`` for these settings."""
    arguments: dict[str, Any] = dict(TRAINER_CONSTANTS)
    for setting in FIELDS:
        value = getattr(settings, setting.name)
        if isinstance(setting.trainer, str):
            arguments[setting.trainer] = value
        elif setting.trainer is not None:
            arguments.update(setting.trainer(value, settings))
    return arguments


def describe(settings: RunSettings) -> dict[str, Any]:
    """What ``--dry-run`` prints (and ``run_config.json`` holds)."""
    return {
        "settings": dataclasses.asdict(settings),
        "max_prompt_length": settings.max_prompt_length,
        "trainer_args": trainer_arguments(settings),
        "rewards": ["format_reward", "answer_reward"],
    }
