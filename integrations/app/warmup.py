"""Supervised warm-up of the tiny local model on the synthetic task's answer format, before RL.

The paper starts RL from an instruct model that already writes ``<think>...</think><answer>...</answer>`` and
answers some problems right; a randomly initialised model does neither, and never produces a right answer to learn
from. The warm-up plays the instruct model's part, briefly: each prompt ``"3+4="`` is paired with the completion
``"<think>W</think><answer>7</answer>"`` + end token, where ``W`` is one filler word drawn at random, trained with
cross-entropy and stopped long before the answers are learned (offline default: 100 steps; the format is then right
almost always, the answer about one time in four when sampling at temperature 1).

Why this template (each alternative was tried on the offline default; see ``docs/toy-study/README.md``):

* The think text does not restate the problem: the answer would come to depend on it, and RL, which rewards only the
  answer, lets that unrewarded text drift and drags the answers with it.
* It is not empty either: with ``<think></think>`` five of the six completion tokens are certain (ratio exactly 1 on
  every update), so EUR cannot fall below about 5/6 whatever the gate temperature. One random word, independent of
  the problem, gives the completion a second token whose probability moves under RL, as a real model's reasoning
  tokens do.

``answer_source="shuffled"`` pairs each prompt with the answer of *another*, random prompt instead: the model learns
the template and the answers' overall distribution but to ignore the operands. It is kept as a control: from such a
start, RL on this task stays at the level of a guess within the offline budget, so the right-answer warm-up above
is what makes the answer learnable.

Cross-entropy on the completion tokens only, AdamW, a constant learning rate, batches drawn with replacement from a
seeded generator: deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ANSWER_SOURCES", "FILLER_WORDS", "WarmupResult", "random_filler", "supervised_warmup", "warmup_completion"]

ANSWER_SOURCES = ("true", "shuffled")
WARMUP_BATCH_SIZE = 64
FILLER_WORDS = ("so", "I", "think", "It", "is", "the", "answer")  # words of the tiny tokenizer's vocabulary
FILLER_LENGTH = 1


def warmup_completion(answer: str, filler: Sequence[str] = ()) -> str:
    """The template the warm-up teaches: ``"<think>so</think><answer>7</answer>"`` (filler words, then the answer)."""
    return f"<think>{' '.join(filler)}</think><answer>{answer}</answer>"


def random_filler(rng: random.Random) -> list[str]:
    """:data:`FILLER_LENGTH` words drawn from :data:`FILLER_WORDS`, independently of the problem."""
    return [rng.choice(FILLER_WORDS) for _ in range(FILLER_LENGTH)]


@dataclass(frozen=True)
class WarmupResult:
    steps: int
    first_loss: float
    last_loss: float


def supervised_warmup(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, steps: int,
                      learning_rate: float, seed: int, answer_source: str = "true",
                      batch_size: int = WARMUP_BATCH_SIZE) -> WarmupResult:
    """Trains ``model`` in place for ``steps`` AdamW steps on :func:`warmup_completion` targets (see module docstring).

    ``prompts`` are plain strings (the tiny tokenizer's ``"a+b="`` prompts); ``answers`` their right answers. Returns
    the number of steps and the loss of the first step and the mean loss of the last ten.
    """
    import torch

    if answer_source not in ANSWER_SOURCES:
        raise ValueError(f"answer_source must be one of {', '.join(ANSWER_SOURCES)}, got {answer_source!r}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"prompts and answers must be non-empty and of equal length, got {len(prompts)} and "
                         f"{len(answers)}")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("the warm-up takes plain-text prompts (the tiny local model's); got conversations")
    if steps == 0:
        return WarmupResult(0, float("nan"), float("nan"))
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    was_training = model.training
    model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):  # dropout-free model, but keep the caller's random stream untouched
        torch.manual_seed(seed)
        for _ in range(steps):
            rows = [rng.randrange(len(prompts)) for _ in range(batch_size)]
            completions = [warmup_completion(answers[row] if answer_source == "true"
                                             else answers[rng.randrange(len(answers))], random_filler(rng))
                           for row in rows]
            input_ids, attention_mask, labels = _batch(tokenizer, [prompts[row] for row in rows], completions, eos)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.train(was_training)
    return WarmupResult(steps, losses[0], sum(losses[-10:]) / len(losses[-10:]))


def _batch(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], eos: int):
    """Right-padded ``prompt + completion + eos`` rows; labels only on the completion (``-100`` elsewhere)."""
    import torch

    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    completion_ids = [tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
                      for completion in completions]
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        sequence = prompt + completion
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = torch.tensor(completion)
    return input_ids, attention_mask, labels
