"""Train a policy with the gated GRPO/SAPO loss: the run itself (``fused-gates-train``,
``python -m fused_gates.integrations.app.train``).

The presets and flags live in ``settings.py`` (``--help`` lists them; ``--dry-run`` prints the resolved
configuration), the table, ``metrics.csv`` and ``metrics.png`` in ``run_report.py``. A run:

1. builds the policy: the Hub model or folder given by ``--model``, or the tiny local model, which is first warmed
   up on the answer format (``warmup.py``) and saved as ``<output-dir>/initial-model``, the policy RL starts from;
2. trains it with ``GatedGRPOTrainer`` (reward = format + answer, paper eq. 9), printing one table line per step;
3. saves the trained policy to ``<output-dir>/final-model`` (always, whatever ``--save-steps`` is) and writes
   ``metrics.png``; for the synthetic task also ``synthetic-eval.jsonl`` (every problem once) for
   ``fused-gates-evaluate``, whose command line it prints.

Nothing is lost on the way: ``run_config.json`` (the resolved configuration, the model RL started from and the
SHA-256 of its weights) is written before training, and ``metrics.csv`` gets each logged step as it is logged.
SIGINT (Ctrl-C) or SIGTERM stops the run after the current step -- with checkpoints on (``--save-steps N``) at the
end of the current generation batch, saving a checkpoint there, so that a resume continues exactly -- and prints
where everything is. ``--resume`` continues from the latest ``checkpoint-*`` (or ``--resume PATH``): model,
optimiser, scheduler, RNG, the adaptive temperature, the data order and ``metrics.csv`` (rows logged after the
checkpoint are dropped). An existing output folder is refused unless ``--resume`` or ``--overwrite`` says what to
do with it.

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

from transformers import TrainerCallback

from .run_folder import (
    FolderError,
    SignalFlag,
    check_overwritable,
    checkpoint_step,
    clear_folder,
    latest_checkpoint,
    refuse_reuse,
    stop_on_signals,
    weights_sha256,
)
from .run_report import (
    ANSWER_REWARD,
    FORMAT_REWARD,
    MetricsFile,
    StepMetricsCallback,
    TableCallback,
    mean_off_policy_eur,
    read_metrics_csv,
    window_means,
    write_metrics_csv,
    write_metrics_plot,
)
from .settings import RunControl, RunSettings, describe, parse_command_line, trainer_arguments

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
RUN_CONFIG = "run_config.json"
METRICS = "metrics.csv"
# what a training run's folder holds: --overwrite deletes only a folder with one of these
RUN_MARKERS = (RUN_CONFIG, METRICS, INITIAL_MODEL, FINAL_MODEL, "checkpoint-*")


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    rows: list[dict[str, float]]  # one per logged step
    initial_model: Path | None  # the saved policy RL started from (None: a Hub model, unchanged)
    final_model: Path | None  # None when the run was interrupted
    interrupted: str | None = None  # the signal that stopped the run ("SIGINT", "SIGTERM")
    checkpoint: Path | None = None  # the last checkpoint saved (None: checkpoints off)


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def warmup_recipe(settings: RunSettings) -> dict[str, Any]:
    """Everything that determines the tiny model RL starts from (recorded with it; reused only when equal)."""
    from .tiny_model import VOCABULARY

    recipe = {"seed": settings.seed, "sft_steps": settings.sft_steps, "vocabulary": list(VOCABULARY),
              "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}}
    if settings.sft_steps:
        recipe.update(sft_learning_rate=settings.sft_learning_rate, sft_answers=settings.sft_answers,
                      max_operand=settings.max_operand)
    return recipe


def prepare_tiny_policy(settings: RunSettings, folder: str | Path) -> Path:
    """The tiny local model RL starts from, saved in ``folder``: built from ``settings.seed`` and warmed up for
    ``settings.sft_steps`` steps on the answer format. A folder that already holds a tiny model built by the same
    recipe (:func:`warmup_recipe`: seed, warm-up and model shape) is reused as is (the toy study shares one warm-up
    among the gates of a seed); one built otherwise is rebuilt."""
    from .data import synthetic_problems
    from .tiny_model import build_tiny_model, build_tiny_tokenizer, is_tiny_folder, save_tiny, tiny_recipe
    from .warmup import supervised_warmup

    folder = Path(folder)
    recipe = warmup_recipe(settings)
    if is_tiny_folder(folder):
        if tiny_recipe(folder) == recipe:
            return folder
        print(f"{folder} holds a tiny model of another recipe (seed, warm-up or shape); rebuilding it", flush=True)
    shape = recipe["model"]
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=settings.seed, hidden_size=shape["hidden_size"],
                             num_layers=shape["num_layers"], num_heads=shape["num_heads"])
    if settings.sft_steps:
        problems = synthetic_problems(settings.max_operand)
        result = supervised_warmup(model, tokenizer, [f"{question}=" for question, _ in problems],
                                   [answer for _, answer in problems], steps=settings.sft_steps,
                                   learning_rate=settings.sft_learning_rate, seed=settings.seed,
                                   answer_source=settings.sft_answers)
        print(f"format warm-up: {result.steps} steps ({settings.sft_answers} answers), completion loss "
              f"{result.first_loss:.3f} -> {result.last_loss:.3f}", flush=True)
    return save_tiny(model, tokenizer, folder, recipe)


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
# The output folder


def prepare_output(settings: RunSettings, control: RunControl) -> Path | None:
    """Applies the folder rules before anything is loaded; returns the checkpoint to resume from (None: a new run).
    Raises :class:`FolderError` naming ``--resume`` / ``--overwrite``."""
    output_dir = Path(settings.output_dir)
    refuse_reuse(output_dir, "a training run", resume=bool(control.resume), overwrite=control.overwrite)
    if control.overwrite:
        check_overwritable(output_dir, RUN_MARKERS)  # on every process, before the main one deletes anything
    if not control.resume:
        return None
    checkpoint = latest_checkpoint(output_dir) if control.resume is True else Path(control.resume)
    if checkpoint is None:
        raise FolderError(f"--resume: no checkpoint-* in {output_dir} to continue from (checkpoints are saved with "
                          "--save-steps N); pass --overwrite to start over")
    if not (checkpoint / "trainer_state.json").is_file():
        raise FolderError(f"--resume: {checkpoint} is not a checkpoint (no trainer_state.json)")
    saved = output_dir / RUN_CONFIG
    if saved.is_file():
        before = json.loads(saved.read_text()).get("settings", {})
        now = dataclasses.asdict(settings)
        # what may change on a resume: the length of the run and its bookkeeping
        free = {"preset", "output_dir", "max_steps", "logging_steps", "save_steps", "report_to"}
        changed = sorted(name for name in now if name not in free and before.get(name, now[name]) != now[name])
        if changed:
            raise FolderError("--resume: the run in " f"{output_dir} was started with other "
                              f"{', '.join('--' + name.replace('_', '-') for name in changed)} "
                              f"({', '.join(f'{before[name]!r}' for name in changed)}); resume it with its own "
                              "flags, or pass --overwrite to start over")
    return checkpoint


class StopOnSignal(TrainerCallback):
    """Ends training cleanly after SIGINT / SIGTERM (:class:`SignalFlag`): at the next optimiser step, or, with
    checkpoints on, at the end of the current generation batch, where a checkpoint is saved (a resume regenerates
    from there, as the uninterrupted run does). Every process stops at the same step (the flag is all-reduced)."""

    def __init__(self, flag: SignalFlag, steps_per_batch: int, checkpoints: bool) -> None:
        self.flag = flag
        self.steps_per_batch = max(steps_per_batch, 1)  # optimiser steps per generated batch
        self.checkpoints = checkpoints
        self.stopped_at: int | None = None

    def _any_process_flagged(self) -> bool:
        import torch.distributed as dist

        flagged = bool(self.flag)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            value = torch.tensor([float(flagged)], device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flagged = bool(value.item())
        return flagged

    def on_step_end(self, args, state, control, **kwargs):
        if not self._any_process_flagged():
            return control
        if self.checkpoints and state.global_step % self.steps_per_batch:
            return control  # finish the generated batch first
        control.should_training_stop = True
        control.should_log = True
        if self.checkpoints:
            control.should_save = True
        self.stopped_at = state.global_step
        return control


def _write_run_config(output_dir: Path, settings: RunSettings, initial_model: Path | None, **extra: Any) -> None:
    config = describe(settings)
    config["initial_model"] = None if initial_model is None else str(initial_model)
    config["initial_model_sha256"] = None if initial_model is None else weights_sha256(initial_model)
    config.update(extra)
    # the resolved configuration, so that `fused-gates plot-runs` can label the run by gate and temperatures
    temporary = output_dir / (RUN_CONFIG + ".tmp")
    temporary.write_text(json.dumps(config, indent=1, default=str) + "\n")
    temporary.replace(output_dir / RUN_CONFIG)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def train(settings: RunSettings, control: RunControl | None = None, *, flag: SignalFlag | None = None) -> RunResult:
    """Builds the trainer, trains, saves the final model and writes the reports (see the module docstring).

    ``control``: ``--resume`` / ``--overwrite`` (checked by :func:`prepare_output`); ``flag``: set by a signal to stop
    the run cleanly (:func:`main` installs the handlers)."""
    from accelerate import PartialState
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from fused_gates.plots import describe_gate

    from ..trl import GatedGRPOTrainer
    from .data import write_synthetic_jsonl
    from .rewards import answer_reward, format_reward
    from .tiny_model import mark_tiny_folder

    control = control or RunControl()
    flag = flag if flag is not None else SignalFlag()
    output_dir = Path(settings.output_dir)
    checkpoint = prepare_output(settings, control)
    state = PartialState()
    main_process = state.is_main_process
    if control.overwrite and main_process:
        clear_folder(output_dir, RUN_MARKERS)
    state.wait_for_everyone()
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
    earlier: list[dict[str, float]] = []
    if checkpoint is not None and (output_dir / METRICS).is_file():
        # the rows up to the checkpoint; those logged after it (before the interruption) are logged again
        earlier = read_metrics_csv(output_dir / METRICS, up_to_step=checkpoint_step(checkpoint))
    metrics_file = None
    if main_process:
        _write_run_config(output_dir, settings, initial_model, final_model=None, finished=False,
                          resumed_from=None if checkpoint is None else str(checkpoint))
        metrics_file = MetricsFile(output_dir / METRICS, earlier)
    collector = StepMetricsCallback(earlier, metrics_file)
    steps_per_batch = config.num_iterations * config.steps_per_generation // config.gradient_accumulation_steps
    stopper = StopOnSignal(flag, steps_per_batch, checkpoints=settings.save_steps > 0)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(collector)
    trainer.add_callback(TableCallback(collector, adaptive=settings.eur_target is not None))
    trainer.add_callback(stopper)
    if main_process:
        start = "" if checkpoint is None else f", resuming from {checkpoint}"
        print(f"{settings.preset} preset: model {settings.model or 'tiny local model'}, gate "
              f"{describe_gate(dataclasses.asdict(settings))}, {len(dataset)} prompts, "
              f"Liger kernels {'on' if liger else 'off'}, output {output_dir}{start}", flush=True)
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    if stopper.stopped_at is not None:
        saved = latest_checkpoint(output_dir) if settings.save_steps > 0 else None
        if main_process:
            where = (f"checkpoint {saved}; continue with --resume" if saved is not None
                     else "no checkpoint (--save-steps 0); a rerun needs --overwrite")
            print(f"{flag.name}: stopped after step {stopper.stopped_at}; metrics of every logged step in "
                  f"{output_dir / METRICS}, configuration in {output_dir / RUN_CONFIG}, {where}", flush=True)
        return RunResult(output_dir, collector.rows, initial_model, None, flag.name, saved)
    final_model = output_dir / FINAL_MODEL
    trainer.save_model(str(final_model))  # every process: under ZeRO-3 the weights are gathered for the save
    if main_process:
        if settings.uses_tiny_model:
            mark_tiny_folder(final_model, trainer.model.config)
        if settings.dataset == "synthetic":
            write_synthetic_jsonl(output_dir / SYNTHETIC_EVAL, settings.max_operand)
        _write_run_config(output_dir, settings, initial_model, final_model=str(final_model), finished=True,
                          resumed_from=None if checkpoint is None else str(checkpoint))
        _write_reports(collector.rows, output_dir, settings, initial_model, final_model)
    return RunResult(output_dir, collector.rows, initial_model, final_model)


def run_finished(folder: str | Path) -> bool:
    """Whether the training run in ``folder`` ran to its end (an interrupted one has no final model)."""
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return bool(config.get("finished", (Path(folder) / FINAL_MODEL).is_dir()))


def _write_reports(rows: list[dict[str, float]], output_dir: Path, settings: RunSettings,
                   initial_model: Path | None, final_model: Path) -> None:
    from fused_gates.plots import describe_gate

    csv_path = write_metrics_csv(rows, output_dir / METRICS)  # the same rows, in the final column order
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
    """The command line; exit status 0, 2 for a refused command line or output folder, 128 + the signal's number
    for a run stopped by SIGINT / SIGTERM."""
    import signal

    settings, control = parse_command_line(argv)
    if control.dry_run:
        print(json.dumps(describe(settings), indent=2))
        return 0
    flag = SignalFlag()
    try:
        with stop_on_signals(flag, "stopping at the next safe point (metrics are on disk)"):
            result = train(settings, control, flag=flag)
    except FolderError as error:
        print(f"fused-gates-train: error: {error}", file=sys.stderr)
        return 2
    if result.interrupted is not None:
        return 128 + int(signal.Signals[result.interrupted])
    return 0


if __name__ == "__main__":
    sys.exit(main())
