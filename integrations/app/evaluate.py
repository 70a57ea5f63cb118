"""Benchmark accuracy of a trained policy (paper section 5.1, Table 1): GSM8K (test), MATH500 and AIME, and the
offline training task (``synthetic``, from the ``synthetic-eval.jsonl`` a training run writes).

Each problem is asked as in training (the system prompt with the ``<think>``/``<answer>`` template for models with a
chat template, the bare question otherwise), ``--num-samples`` completions are sampled at temperature 0.7, and the
answer is the text inside the last ``<answer>`` ... ``</answer>`` pair, compared to the reference with the training
reward's equivalence check (``rewards.extract_answer`` and ``rewards.answers_match``). Accuracy is the fraction of
correct completions: the mean over problems of each problem's fraction of correct samples.

Generation uses vLLM when it is installed (and ``--backend auto``), transformers' ``generate`` otherwise.

Outputs in ``--out``: ``<benchmark>.jsonl`` (one line per problem: problem, reference, completions, extracted
answers, correct flags; written as the problems are answered, each line flushed, so an interrupted evaluation keeps
what it finished; ``<benchmark>-<label>.jsonl`` with ``--label``), ``summary.json`` (accuracy per model and
benchmark, merged across invocations) and ``summary.md`` (the layout of Table 1: one row per model, one column per
benchmark, accuracy in %; the synthetic task adds its own column). ``--max-new-tokens`` defaults to 512 (the
paper's completion length) and to 16 for the synthetic task.

An existing results file is refused unless ``--resume`` (keep its lines, answer only the problems it lacks) or
``--overwrite`` (start over) says what to do with it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fused_gates.validation import number_argument

from .rewards import answers_match, extract_answer, ground_truth_answer

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Problem",
    "ProblemResult",
    "TransformersGenerator",
    "build_parser",
    "evaluate",
    "load_problems",
    "main",
    "score_problem",
    "summary_table",
]

PAPER_TEMPERATURE = 0.7  # section 5.1
# The paper gives no evaluation length; its training completions are at most 512 tokens (Table 2).
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the Hub and which columns hold the question and the reference answer."""

    name: str  # the column title of Table 1
    dataset: str
    config: str | None
    split: str
    question: str
    answer: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the default generation length


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("GSM8K", "openai/gsm8k", "main", "test", "question", "answer"),  # answer: "... #### 72"
    "math500": Benchmark("MATH500", "HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    # AIME 2022-2024 (90 problems); pass --hub-dataset HuggingFaceH4/aime_2024 for AIME 2024 alone (30 problems).
    "aime": Benchmark("AIME", "AI-MO/aimo-validation-aime", None, "train", "problem", "answer"),
    # The offline training task, from the file the training script writes (data.write_synthetic_jsonl): every
    # distinct problem once. Not on the Hub: --dataset-file is required.
    "synthetic": Benchmark("Synthetic", "", None, "test", "question", "answer", max_new_tokens=16),
}
PAPER_BENCHMARKS = ("gsm8k", "math500", "aime")  # Table 1's columns, always shown


@dataclass(frozen=True)
class Problem:
    index: int
    question: str
    reference: str  # the final answer


@dataclass(frozen=True)
class ProblemResult:
    index: int
    problem: str
    reference: str
    completions: list[str]
    extracted: list[str | None]
    correct: list[bool]
    accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accuracy", statistics.fmean(self.correct) if self.correct else 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Problems


def _rows_to_problems(rows: Sequence[dict[str, Any]], benchmark: Benchmark) -> list[Problem]:
    # GSM8K's references are worked solutions ending in "#### <answer>"; the others are bare answers.
    return [Problem(index, str(row[benchmark.question]), ground_truth_answer(str(row[benchmark.answer])))
            for index, row in enumerate(rows)]


def load_problems(benchmark: Benchmark, *, dataset_file: str | Path | None = None, hub_dataset: str | None = None,
                  split: str | None = None, limit: int | None = None) -> list[Problem]:
    """The benchmark's problems from a local JSONL file (the Hub dataset's columns, one row a line) or the Hub."""
    if dataset_file is not None:
        with Path(dataset_file).open() as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    elif not benchmark.dataset:
        raise ValueError(f"benchmark {benchmark.name} is not on the Hub: pass dataset_file (--dataset-file; the "
                         "training script writes synthetic-eval.jsonl next to its final model)")
    else:
        from datasets import load_dataset

        rows = list(load_dataset(hub_dataset or benchmark.dataset, None if hub_dataset else benchmark.config,
                                 split=split or benchmark.split))
    return _rows_to_problems(rows[:limit] if limit is not None else rows, benchmark)


# ----------------------------------------------------------------------------------------------------------------------
# Generation


class Generator(Protocol):
    def __call__(self, questions: Sequence[str], num_samples: int) -> list[list[str]]:
        """``num_samples`` completions (generated text only) for each question."""
        ...


def make_prompts(questions: Sequence[str], conversational: bool) -> list[Any]:
    from .data import make_prompt  # the training prompt, system prompt included

    return [make_prompt(question, conversational=conversational) for question in questions]


@dataclass
class TransformersGenerator:
    """Sampling with ``model.generate`` in batches of ``batch_size`` prompts (left padding)."""

    model: Any
    tokenizer: Any
    temperature: float = PAPER_TEMPERATURE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 8
    seed: int = 0
    _seeded: bool = field(default=False, init=False, repr=False)

    def __call__(self, questions: Sequence[str], num_samples: int) -> list[list[str]]:
        import torch

        if not self._seeded:  # once: the problems asked in several calls get the samples of one call
            torch.manual_seed(self.seed)
            self._seeded = True
        conversational = getattr(self.tokenizer, "chat_template", None) is not None
        prompts = make_prompts(questions, conversational)
        results: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            results.extend(self._batch(prompts[start : start + self.batch_size], num_samples, conversational))
        return results

    def _batch(self, prompts: list[Any], num_samples: int, conversational: bool) -> list[list[str]]:
        import torch

        if conversational:
            prompts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                       for p in prompts]
        self.tokenizer.padding_side = "left"  # generation appends on the right of every prompt
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not conversational)
        inputs = inputs.to(self.model.device)
        # Plain temperature sampling: the model's own generation config (Qwen2.5's top_k 20, top_p 0.8, repetition
        # penalty 1.05) is overridden, since the paper states only the temperature.
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0,
                    "repetition_penalty": 1.0}
        if self.temperature == 0:
            sampling = {"do_sample": False}
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_return_sequences=num_samples,
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


@dataclass
class VLLMGenerator:
    """Sampling with vLLM (``n`` samples per prompt in one request)."""

    model_path: str
    temperature: float = PAPER_TEMPERATURE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0

    def __call__(self, questions: Sequence[str], num_samples: int) -> list[list[str]]:
        from vllm import LLM, SamplingParams

        llm = LLM(model=self.model_path, seed=self.seed)
        params = SamplingParams(n=num_samples, temperature=self.temperature, top_p=1.0,
                                max_tokens=self.max_new_tokens, seed=self.seed)
        conversational = llm.get_tokenizer().chat_template is not None
        prompts = make_prompts(questions, conversational)
        outputs = llm.chat(prompts, params) if conversational else llm.generate(prompts, params)
        return [[choice.text for choice in output.outputs] for output in outputs]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_generator(model: str, *, backend: str = "auto", temperature: float = PAPER_TEMPERATURE,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8, seed: int = 0) -> Generator:
    """vLLM when installed (``backend="auto"``), else transformers; the tiny local model always uses transformers."""
    from .tiny_model import is_tiny_folder

    if backend == "vllm" or (backend == "auto" and vllm_available() and not is_tiny_folder(model)):
        return VLLMGenerator(model, temperature, max_new_tokens, seed)
    model_obj, tokenizer = _load_transformers(model)
    return TransformersGenerator(model_obj, tokenizer, temperature, max_new_tokens, batch_size, seed)


def _load_transformers(model: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny_model import is_tiny_folder, load_tiny

    if is_tiny_folder(model):
        loaded, tokenizer = load_tiny(model)
    else:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return loaded.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def score_problem(problem: Problem, completions: Sequence[str]) -> ProblemResult:
    """Extracts each completion's answer and checks it against the reference, exactly as the answer reward does."""
    extracted = [extract_answer(text) for text in completions]
    correct = [answer is not None and answers_match(answer, problem.reference) for answer in extracted]
    return ProblemResult(problem.index, problem.question, problem.reference, list(completions), extracted, correct)


def evaluate(problems: Sequence[Problem], generate: Callable[[Sequence[str], int], list[list[str]]],
             num_samples: int = 1) -> tuple[float, list[ProblemResult]]:
    """``(accuracy, per-problem results)``: accuracy is the mean over problems of the fraction of correct samples."""
    completions = generate([problem.question for problem in problems], num_samples)
    results = [score_problem(problem, texts) for problem, texts in zip(problems, completions, strict=True)]
    accuracy = statistics.fmean(result.accuracy for result in results) if results else 0.0
    return accuracy, results


# ----------------------------------------------------------------------------------------------------------------------
# Reports


def update_summary(path: str | Path, model: str, benchmark: str, accuracy: float, details: dict[str, Any]) -> dict:
    """Adds one accuracy to ``summary.json`` (``{model: {benchmark: {...}}}``), keeping the other entries."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.setdefault(model, {})[benchmark] = {"accuracy": accuracy, **details}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summary_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Table 1's layout: ``| Model | GSM8K | MATH500 | AIME |`` with accuracy in %, ``-`` where not evaluated; one
    more column for each other benchmark evaluated (the synthetic task). Rows in the order models were added."""
    evaluated = {key for scores in summary.values() for key in scores}
    keys = [*PAPER_BENCHMARKS, *(key for key in BENCHMARKS if key not in PAPER_BENCHMARKS and key in evaluated)]
    lines = ["| Model | " + " | ".join(BENCHMARKS[key].name for key in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for model, scores in summary.items():
        cells = [f"{100 * scores[key]['accuracy']:.1f}" if key in scores else "-" for key in keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_path(out: str | Path, benchmark: str, label: str | None) -> Path:
    """``<out>/<benchmark>.jsonl``, or ``<out>/<benchmark>-<label>.jsonl`` (the label's letters, digits, ``.-_``), so
    that several models evaluated into one folder keep their own results."""
    if not label:
        return Path(out) / f"{benchmark}.jsonl"
    return Path(out) / f"{benchmark}-{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_') or 'model'}.jsonl"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a results file (a line cut off by an interruption is left out)."""
    results = []
    with Path(path).open() as handle:
        for line in handle:
            try:
                results.append(json.loads(line))
            except ValueError:
                break  # the last line of an interrupted write
    return results


def run(args: Any, generate: Callable[[Sequence[str], int], list[list[str]]] | None = None) -> float:
    """The ``fused-gates-evaluate`` command (``generate`` replaces the model, for tests): problems are answered in
    batches of ``--batch-size`` (vLLM: all at once) and each one's line is appended to the results file at once."""
    from .run_folder import FolderError, clear_folder, refuse_reuse

    benchmark = BENCHMARKS[args.benchmark]
    problems = load_problems(benchmark, dataset_file=args.dataset_file, hub_dataset=args.hub_dataset,
                             split=args.split, limit=args.limit)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else benchmark.max_new_tokens
    out = Path(args.out)
    path = results_path(out, args.benchmark, args.label)
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    refuse_reuse(path, f"results of {args.label or args.model} on {args.benchmark}", resume=resume,
                 overwrite=overwrite)
    if overwrite:
        clear_folder(path, [path.name])
    done = read_results(path) if resume and path.is_file() else []
    questions = {problem.index: problem.question for problem in problems}
    if any(questions.get(line.get("index")) != line.get("problem") for line in done):
        raise FolderError(f"--resume: {path} holds other problems than --benchmark {args.benchmark} with these "
                          "options; pass --overwrite to start over")
    finished = {line["index"] for line in done}
    pending = [problem for problem in problems if problem.index not in finished]
    if pending and generate is None:
        generate = make_generator(args.model, backend=args.backend, temperature=args.temperature,
                                  max_new_tokens=max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        # the finished lines first (rewritten whole: drops a line cut off by an interruption), then each new one
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in done)
        # vLLM schedules every prompt itself (and loads the model per call): one call
        size = max(len(pending), 1) if isinstance(generate, VLLMGenerator) else args.batch_size
        for start in range(0, len(pending), size):
            _, results = evaluate(pending[start : start + size], generate, args.num_samples)
            for result in results:
                handle.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
                done.append(asdict(result))
            handle.flush()
    accuracy = statistics.fmean(fmean_or_zero(line["correct"]) for line in done) if done else 0.0
    source = str(args.dataset_file) if args.dataset_file else (args.hub_dataset or benchmark.dataset)
    details = {"problems": len(done), "num_samples": args.num_samples, "temperature": args.temperature,
               "max_new_tokens": max_new_tokens, "dataset": source, "results": str(path)}
    table = summary_table(update_summary(out / "summary.json", args.label or args.model, args.benchmark, accuracy,
                                         details))
    (out / "summary.md").write_text(table)
    print(f"{benchmark.name}: {100 * accuracy:.1f}% over {len(done)} problems x {args.num_samples} samples "
          f"(temperature {args.temperature:g}); wrote {path} and {out / 'summary.md'}")
    print(table)
    return accuracy


def fmean_or_zero(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Command line

_positive_int = number_argument(int, lambda v: v > 0, "an integer > 0")
_non_negative_float = number_argument(float, lambda v: v >= 0, "finite and >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-gates-evaluate",
                                     description="Benchmark accuracy with answers taken from the <answer> tags.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="model id or folder (the tiny local model's folder works)")
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS),
                        help="synthetic: the offline training task (with --dataset-file)")
    parser.add_argument("--dataset-file", help="local JSONL with the Hub dataset's columns instead of the Hub")
    parser.add_argument("--hub-dataset", help="a Hub dataset with the same columns, e.g. HuggingFaceH4/aime_2024")
    parser.add_argument("--split", help="dataset split (default: the benchmark's)")
    parser.add_argument("--limit", type=_positive_int, help="first N problems only")
    parser.add_argument("--num-samples", type=_positive_int, default=1, help="completions per problem")
    parser.add_argument("--temperature", type=_non_negative_float, default=PAPER_TEMPERATURE,
                        help="sampling temperature (paper: 0.7; 0: greedy)")
    parser.add_argument("--max-new-tokens", type=_positive_int, help="default: 512 (synthetic: 16)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call (transformers)")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                        help="auto: vLLM when installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", help="the model's row name in the table (default: --model)")
    parser.add_argument("--out", default="eval")
    folder = parser.add_mutually_exclusive_group()
    folder.add_argument("--resume", action="store_true",
                        help="keep the results file's problems and answer only the others")
    folder.add_argument("--overwrite", action="store_true", help="start the results file over")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark == "synthetic" and args.dataset_file is None:
        parser.error("argument --dataset-file: required with --benchmark synthetic (the training run writes "
                     "synthetic-eval.jsonl in its output folder)")
    return args


def main(argv: Sequence[str] | None = None,
         generate: Callable[[Sequence[str], int], list[list[str]]] | None = None) -> int:
    from .run_folder import FolderError

    args = parse_arguments(argv)
    try:
        run(args, generate)
    except FolderError as error:
        print(f"fused-gates-evaluate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        path = results_path(args.out, args.benchmark, args.label)
        print(f"interrupted: the problems answered so far are in {path}; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
