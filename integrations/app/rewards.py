"""The reward of the paper (section 5.1, eqs. 9-11): ``r = r_answer + r_format``.

Both parts have TRL's reward-function signature, ``fn(prompts, completions, answer, **kwargs) -> list[float]``, and
are passed to the trainer as two functions so that TRL logs them separately (``rewards/format_reward/mean``,
``rewards/answer_reward/mean``) and sums them into ``reward``.

Completions are strings (plain-text prompts) or conversations (``[{"role": "assistant", "content": ...}]``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "answer_reward",
    "answers_match",
    "completion_text",
    "extract_answer",
    "format_reward",
    "format_score",
    "ground_truth_answer",
    "normalize_answer",
    "parse_number",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# One think block, then one answer block; only whitespace around and between them.
_FULL_FORMAT = re.compile(r"<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------------
# Completions


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The generated text of one completion, plain or conversational (the assistant messages' text, joined)."""
    if isinstance(completion, str):
        return completion
    parts: list[str] = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:  # multimodal content: a list of typed parts
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Format (eq. 10)


def format_score(text: str) -> float:
    """The format tier of one completion (paper eq. 10). Leading and trailing whitespace is ignored.

    * ``1.0`` -- fully satisfied: the text is ``<think>T</think><answer>A</answer>`` where
      ``T`` is any text (possibly empty), ``A`` is any text that is not only whitespace, neither contains any of the
      four tags, and only whitespace may separate ``</think>`` from ``<answer>``.
    * ``0.5`` -- not fully satisfied, but the text begins with ``<think>`` and ends with ``</answer>``.
    * ``0.25`` -- exactly one of: begins with ``<think>``, ends with ``</answer>``.
    * ``0.0`` -- otherwise.
    """
    stripped = text.strip()
    begins = stripped.startswith(THINK_OPEN)
    ends = stripped.endswith(ANSWER_CLOSE)
    if begins and ends and _is_fully_formatted(stripped):
        return 1.0
    if begins and ends:
        return 0.5
    if begins or ends:
        return 0.25
    return 0.0


def _is_fully_formatted(stripped: str) -> bool:
    match = _FULL_FORMAT.fullmatch(stripped)
    if match is None:
        return False
    think, answer = match["think"], match["answer"]
    # The lazy groups could still swallow a tag (e.g. a second <think> inside the think block).
    if any(tag in think or tag in answer for tag in _TAGS):
        return False
    return bool(answer.strip())


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Paper eq. 10 for each completion (see :func:`format_score`)."""
    return [format_score(completion_text(completion)) for completion in completions]


# ----------------------------------------------------------------------------------------------------------------------
# Answer (eq. 11)


def extract_answer(text: str) -> str | None:
    """The text between the last ``<answer>`` ... ``</answer>`` pair, stripped; ``None`` when there is none."""
    blocks = _ANSWER_BLOCK.findall(text)
    if not blocks:
        return None
    # A complete pair cannot contain another <answer>; keep the text after the last opening tag.
    return blocks[-1].rsplit(ANSWER_OPEN, 1)[-1].strip()


def ground_truth_answer(answer: str) -> str:
    """The final answer of a reference solution: the text after GSM8K's ``####`` marker, else the whole text."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return answer.strip()


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SHORT_FRAC = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac12
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right|displaystyle)\b|\\quad|\\qquad")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*(?=\S)")
_LEADING_PHRASE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:=]?\s*", re.IGNORECASE)
_PARENTHESISED_NUMBER = re.compile(r"\(\s*([-+]?[\d.]+)\s*\)")  # "(1)/(2)" from \frac{1}{2}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
# A number (optionally signed, decimal or a fraction), optionally a currency before it and a percent sign or words
# (units) after it: "$1,234.50", "42 dollars", "12 cm", "50%".
_NUMBER_WITH_UNITS = re.compile(
    r"^(?:[$€£¥]|\\\$)?\s*(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*[-+]?\d+(?:\.\d*)?)?)"
    r"\s*(?:\\?%|percent)?\s*(?:[A-Za-z][A-Za-z\s.]*)?\.?$"
)


def _unwrap_boxed(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced), or the text unchanged."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return text
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]


def normalize_answer(text: str) -> str:
    """A canonical string for an answer: LaTeX wrappers, spacing, thousands separators and phrases removed.

    ``\\boxed{\\dfrac{1}{2}}`` -> ``(1)/(2)``, ``$1,234$`` -> ``1234``, ``x = 5`` -> ``5``, ``\\text{cm}`` -> ``cm``.
    """
    text = _unwrap_boxed(ground_truth_answer(text))
    for delimiter in ("$$", "\\(", "\\)", "\\[", "\\]"):
        text = text.replace(delimiter, "")
    if text.startswith("$") and text.endswith("$") and len(text) > 1:
        text = text[1:-1]
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _SPACING.sub("", text)
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _SHORT_FRAC.sub(r"(\1)/(\2)", text)
    while _FRAC.search(text):  # innermost first, so nested fractions unfold
        text = _FRAC.sub(r"(\1)/(\2)", text)
    text = text.replace("^\\circ", "").replace("^{\\circ}", "")
    text = _LEADING_PHRASE.sub("", text.strip())
    text = _ASSIGNMENT.sub("", text)
    text = _THOUSANDS.sub("", text)
    return text.strip().rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a normalised answer that is a number, possibly with currency, percent sign or units."""
    match = _NUMBER_WITH_UNITS.match(_PARENTHESISED_NUMBER.sub(r"\1", text).strip())
    if match is None:
        return None
    try:
        return Fraction(match["number"].replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def _normalized_match(predicted: str, truth: str) -> bool:
    predicted_norm, truth_norm = normalize_answer(predicted), normalize_answer(truth)
    if not predicted_norm:
        return False
    if _compact(predicted_norm) == _compact(truth_norm):
        return True
    predicted_value, truth_value = parse_number(predicted_norm), parse_number(truth_norm)
    return predicted_value is not None and predicted_value == truth_value


def _math_verify_match(predicted: str, truth: str) -> bool:
    """Symbolic equivalence by ``math_verify`` (when installed); ``False`` when it is missing or fails."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(_as_math(ground_truth_answer(truth)), parsing_timeout=timeout)
        target = parse(_as_math(predicted), parsing_timeout=timeout)
        return bool(gold) and bool(target) and bool(verify(gold, target, timeout_seconds=timeout))
    except Exception:  # a parser or sympy failure on odd text means "no match", never a crashed step
        return False


def _as_math(text: str) -> str:
    """Wraps bare text in ``$...$`` so that math_verify's LaTeX extraction sees it (``\\frac{\\pi}{4}`` alone fails)."""
    text = text.strip()
    return text if "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text else f"${text}$"


USE_MATH_VERIFY = True  # math_verify extends the exact/numeric check; set False to use only the latter


def answers_match(predicted: str, truth: str) -> bool:
    """Whether an extracted answer equals the ground truth: exact/numeric normalisation, then ``math_verify``."""
    if _normalized_match(predicted, truth):
        return True
    return USE_MATH_VERIFY and bool(predicted.strip()) and _math_verify_match(predicted, truth)


def answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **kwargs: Any
) -> list[float]:
    """Paper eq. 11: 1.0 when the text between ``<answer>`` and ``</answer>`` matches ``answer``, else 0.0."""
    rewards = []
    for completion, truth in zip(completions, answer, strict=True):
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if predicted is not None and answers_match(predicted, str(truth)) else 0.0)
    return rewards
