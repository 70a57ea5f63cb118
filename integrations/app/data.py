"""Training prompts: the paper's GSM8K + DeepMath mixture (section 5.1) and a synthetic arithmetic set for local runs.

Every dataset has two columns: ``prompt`` (a conversation with :data:`SYSTEM_PROMPT`, or a plain string) and
``answer`` (the final answer as text), which TRL passes to the reward functions as ``answer=``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, interleave_datasets, load_dataset

__all__ = [
    "DEEPMATH",
    "GSM8K",
    "SYSTEM_PROMPT",
    "filter_long_prompts",
    "load_paper_mixture",
    "make_prompt",
    "synthetic_arithmetic",
    "synthetic_problems",
    "write_synthetic_jsonl",
]

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The User asks a math question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process step by step and then gives the final answer. "
    "The reasoning goes inside <think> </think> tags and the final answer inside <answer> </answer> tags, "
    "with nothing before, between or after them: <think> reasoning here </think><answer> final answer here </answer>. "
    "The answer contains only the final result (a number or a simplified expression), without units."
)

GSM8K = ("openai/gsm8k", "main", "train")
DEEPMATH = ("zwhe99/DeepMath-103K", None, "train")

DatasetLoader = Callable[..., Dataset]


def make_prompt(question: str, *, conversational: bool = True) -> str | list[dict[str, str]]:
    """A system + user conversation (chat models), or the bare question (models without a chat template)."""
    if conversational:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.strip()}]
    return question


def _gsm8k_final_answer(solution: str) -> str:
    # GSM8K solutions end with "#### <answer>"; the numbers may carry thousands separators.
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def _to_prompt_answer(dataset: Dataset, question: str, answer: Callable[[dict[str, Any]], str],
                      conversational: bool) -> Dataset:
    def convert(example: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": make_prompt(example[question], conversational=conversational), "answer": answer(example)}

    return dataset.map(convert, remove_columns=dataset.column_names)


def _sample(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    shuffled = dataset.shuffle(seed=seed)
    return shuffled if size is None else shuffled.select(range(min(size, len(shuffled))))


def load_paper_mixture(
    seed: int = 0,
    gsm8k_size: int | None = None,
    deepmath_size: int | None = None,
    *,
    conversational: bool = True,
    loader: DatasetLoader = load_dataset,
) -> Dataset:
    """The paper's training set: GSM8K (train split) and DeepMath-103K in equal parts, interleaved one by one.

    Each source is shuffled with ``seed`` and cut to its size; with sizes left ``None`` both take the size of the
    smaller source (GSM8K's 7,473), so the mixture is 50/50. ``loader`` is ``datasets.load_dataset`` (tests pass
    an in-memory stand-in).
    """
    gsm8k = loader(GSM8K[0], GSM8K[1], split=GSM8K[2])
    deepmath = loader(DEEPMATH[0], split=DEEPMATH[2])
    if gsm8k_size is None and deepmath_size is None:
        gsm8k_size = deepmath_size = min(len(gsm8k), len(deepmath))
    gsm8k = _to_prompt_answer(_sample(gsm8k, gsm8k_size, seed), "question",
                              lambda example: _gsm8k_final_answer(example["answer"]), conversational)
    deepmath = _to_prompt_answer(_sample(deepmath, deepmath_size, seed), "question",
                                 lambda example: str(example["final_answer"]).strip(), conversational)
    # Without probabilities, interleave_datasets alternates; "all_exhausted" keeps every row of unequal sizes.
    return interleave_datasets([gsm8k, deepmath], stopping_strategy="all_exhausted_without_replacement")


def filter_long_prompts(dataset: Dataset, tokenizer: Any, max_prompt_length: int) -> Dataset:
    """Drops rows whose prompt (chat template applied for conversations) is longer than ``max_prompt_length`` tokens.

    TRL 1.16's ``GRPOConfig`` has no prompt-length limit; dropping long prompts keeps the paper's bound without
    cutting questions in half.
    """

    def short_enough(example: dict[str, Any]) -> bool:
        prompt = example["prompt"]
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids) <= max_prompt_length

    return dataset.filter(short_enough)


def synthetic_arithmetic(
    n: int = 2048, seed: int = 0, *, max_operand: int = 9, conversational: bool = False
) -> Dataset:
    """``n`` additions and subtractions of operands in ``[0, max_operand]``: prompt ``"3+4="``, answer ``"7"``.

    The default prompts are bare strings in the tiny tokenizer's vocabulary (see ``tiny_model``); with
    ``conversational=True`` they are "What is 3+4?" conversations with :data:`SYSTEM_PROMPT` for chat models.
    """
    rng = random.Random(seed)
    prompts: list[Any] = []
    answers: list[str] = []
    for _ in range(n):
        left, right = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < 0.5:
            expression, value = f"{left}+{right}", left + right
        else:
            left, right = max(left, right), min(left, right)  # keep results non-negative
            expression, value = f"{left}-{right}", left - right
        question = f"What is {expression}?" if conversational else f"{expression}="
        prompts.append(make_prompt(question, conversational=conversational))
        answers.append(str(value))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def synthetic_problems(max_operand: int = 9) -> list[tuple[str, str]]:
    """Every distinct problem of :func:`synthetic_arithmetic`: ``(expression, answer)`` for all additions ``a+b`` and
    all subtractions ``a-b`` with ``a >= b``, operands in ``[0, max_operand]`` (155 problems for single digits)."""
    additions = [(f"{a}+{b}", str(a + b)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    subtractions = [(f"{a}-{b}", str(a - b)) for a in range(max_operand + 1) for b in range(a + 1)]
    return additions + subtractions


def write_synthetic_jsonl(path: str | Path, max_operand: int = 9) -> Path:
    """The synthetic task as an evaluation file: one ``{"question": "3+4=", "answer": "7"}`` line per distinct
    problem (the prompts the training script uses, so ``fused-gates-evaluate --dataset-file`` asks them verbatim).

    These are the very problems the training prompts are drawn from: the file measures how well a policy does the
    task it was trained on, not generalisation to unseen problems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for expression, answer in synthetic_problems(max_operand):
            handle.write(json.dumps({"question": f"{expression}=", "answer": answer}) + "\n")
    return path
