"""The paper's reward (eqs. 9-11): every format tier with its near misses, and answer matching."""

from __future__ import annotations

import importlib.util

import pytest

from fused_gates.integrations.app import rewards
from fused_gates.integrations.app.rewards import (
    answer_reward,
    extract_answer,
    format_reward,
    format_score,
    ground_truth_answer,
)

# ----------------------------------------------------------------------------------------------------------------------
# Format (eq. 10)

FORMAT_CASES = {
    # 1.0: fully satisfied
    "full": ("<think>3 plus 4</think><answer>7</answer>", 1.0),
    "full-surrounding-whitespace": ("\n  <think>a</think><answer>7</answer>\n\n", 1.0),
    "full-whitespace-between-blocks": ("<think>a</think>\n\n<answer>7</answer>", 1.0),
    "full-empty-think": ("<think></think><answer>7</answer>", 1.0),
    "full-multiline": ("<think>line 1\nline 2</think>\n<answer>\n7\n</answer>", 1.0),
    # 0.5: begins with <think> and ends with </answer>, but not fully satisfied
    "near-empty-answer": ("<think>a</think><answer>  </answer>", 0.5),
    "near-missing-think-close": ("<think>a<answer>7</answer>", 0.5),
    "near-missing-answer-open": ("<think>a</think>7</answer>", 0.5),
    "near-text-between-blocks": ("<think>a</think> so <answer>7</answer>", 0.5),
    "near-two-think-blocks": ("<think>a</think><think>b</think><answer>7</answer>", 0.5),
    "near-nested-answer": ("<think>a</think><answer><answer>7</answer>", 0.5),
    "near-tags-in-wrong-order": ("<think><answer>7</answer></think></answer>", 0.5),
    "near-bare-tags": ("<think></answer>", 0.5),
    # 0.25: only one of the two ends
    "begins-only-truncated": ("<think>a</think><answer>7", 0.25),
    "begins-only-trailing-text": ("<think>a</think><answer>7</answer> done", 0.25),
    "ends-only-leading-text": ("Sure. <think>a</think><answer>7</answer>", 0.25),
    "ends-only-no-think": ("<answer>7</answer>", 0.25),
    "begins-only-bare": ("<think>", 0.25),
    # 0.0: neither
    "none-plain-text": ("The answer is 7.", 0.0),
    "none-empty": ("", 0.0),
    "none-tags-inside": ("I <think>a</think><answer>7</answer> think", 0.0),
    "none-misspelt-tags": ("<thinking>a</thinking><answer>7</answers>", 0.0),
    "none-uppercase-tags": ("<THINK>a</THINK><ANSWER>7</ANSWER>", 0.0),
}


@pytest.mark.parametrize(("text", "expected"), FORMAT_CASES.values(), ids=FORMAT_CASES.keys())
def test_format_tiers(text: str, expected: float) -> None:
    assert format_score(text) == expected


def test_format_reward_takes_plain_and_conversational_completions() -> None:
    plain = ["<think>a</think><answer>7</answer>", "<think>a", "7"]
    conversational = [[{"role": "assistant", "content": text}] for text in plain]
    assert format_reward(prompts=["q"] * 3, completions=plain) == [1.0, 0.25, 0.0]
    assert format_reward(prompts=["q"] * 3, completions=conversational) == [1.0, 0.25, 0.0]


def test_format_reward_reads_text_parts_of_multimodal_content() -> None:
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "<think>a</think><answer>7</answer>"}]}]
    assert format_reward(prompts=["q"], completions=[completion]) == [1.0]


# ----------------------------------------------------------------------------------------------------------------------
# Answer extraction and ground truth


def test_extract_answer_takes_the_last_complete_block() -> None:
    assert extract_answer("<think>x</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>1</answer> no wait <answer>2</answer>") == "2"
    assert extract_answer("<answer><answer>3</answer>") == "3"
    assert extract_answer("<think>x</think><answer>7") is None
    assert extract_answer("7") is None


def test_ground_truth_takes_the_gsm8k_marker() -> None:
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert ground_truth_answer(solution) == "72"
    assert ground_truth_answer("  \\frac{1}{2} ") == "\\frac{1}{2}"


# ----------------------------------------------------------------------------------------------------------------------
# Answer matching (eq. 11), with and without math_verify

MATCHES = {
    "same-integer": ("42", "42"),
    "gsm8k-solution": ("72", "She sold 48+24 = 72 clips.\n#### 72"),
    "gsm8k-thousands-in-truth": ("1234", "#### 1,234"),
    "thousands-separator": ("1,234", "1234"),
    "millions-separator": ("1,234,567", "1234567"),
    "surrounding-whitespace": ("  42 \n", "42"),
    "negative": ("-5", "-5"),
    "decimal-vs-fraction": ("0.5", "1/2"),
    "fraction-vs-decimal": ("1/2", "0.5"),
    "trailing-zeros": ("42.00", "42"),
    "latex-frac": ("\\frac{1}{2}", "0.5"),
    "latex-dfrac": ("\\dfrac{3}{4}", "0.75"),
    "latex-frac-vs-slash": ("\\frac{1}{2}", "1/2"),
    "boxed": ("\\boxed{42}", "42"),
    "boxed-dfrac": ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    "inline-math": ("$42$", "42"),
    "dollar-currency": ("$42", "42"),
    "escaped-dollar-currency": ("\\$42", "42"),
    "currency-with-cents": ("$18.00", "18"),
    "trailing-unit-word": ("42 dollars", "42"),
    "trailing-units-words": ("12 square meters", "12"),
    "latex-text-unit": ("5 \\text{ cm}", "5"),
    "percent": ("50%", "50"),
    "latex-percent": ("50\\%", "50"),
    "assignment": ("x = 3", "3"),
    "answer-phrase": ("The answer is 42", "42"),
    "trailing-period": ("42.", "42"),
    "same-expression": ("\\sqrt{2}", "\\sqrt{2}"),
    "expression-spacing": ("2 \\pi", "2\\pi"),
    "word-answer-case": ("Yes", "yes"),
}

MISMATCHES = {
    "different-integer": ("41", "42"),
    "prefix-digits": ("4", "42"),
    "digits-inside-longer-number": ("142", "42"),
    "wrong-fraction": ("1/3", "1/2"),
    "rounded-decimal": ("0.33", "1/3"),
    "wrong-sign": ("-42", "42"),
    "two-numbers": ("42 or 43", "43"),
    "empty": ("", "42"),
    "only-whitespace": ("   ", "42"),
    "words-only": ("forty-two", "42"),
    "different-word": ("no", "yes"),
}


@pytest.fixture(params=["normalisation-only", "with-math-verify"])
def matcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs each answer case with the package's own normalisation alone, then with math_verify on top."""
    if request.param == "with-math-verify" and importlib.util.find_spec("math_verify") is None:
        pytest.skip("math_verify is not installed")
    monkeypatch.setattr(rewards, "USE_MATH_VERIFY", request.param == "with-math-verify")
    return request.param


def _reward(predicted: str, truth: str) -> float:
    completion = f"<think>work</think><answer>{predicted}</answer>"
    return answer_reward(prompts=["q"], completions=[completion], answer=[truth])[0]


@pytest.mark.parametrize(("predicted", "truth"), MATCHES.values(), ids=MATCHES.keys())
def test_answer_matches(matcher: str, predicted: str, truth: str) -> None:
    assert _reward(predicted, truth) == 1.0


@pytest.mark.parametrize(("predicted", "truth"), MISMATCHES.values(), ids=MISMATCHES.keys())
def test_answer_mismatches(matcher: str, predicted: str, truth: str) -> None:
    assert _reward(predicted, truth) == 0.0


def test_math_verify_adds_symbolic_equivalence(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("math_verify")
    monkeypatch.setattr(rewards, "USE_MATH_VERIFY", True)
    assert _reward("\\pi/4", "\\frac{\\pi}{4}") == 1.0
    monkeypatch.setattr(rewards, "USE_MATH_VERIFY", False)
    assert _reward("\\pi/4", "\\frac{\\pi}{4}") == 0.0


def test_answer_reward_needs_an_answer_block() -> None:
    completions = ["<think>7</think>", "7", "<think>a</think><answer>7</answer>", "<answer>7"]
    assert answer_reward(prompts=["q"] * 4, completions=completions, answer=["7"] * 4) == [0.0, 0.0, 1.0, 0.0]


def test_answer_reward_takes_conversational_completions() -> None:
    completions = [[{"role": "assistant", "content": "<think>a</think><answer>1,000</answer>"}]]
    prompts = [[{"role": "user", "content": "q"}]]
    assert answer_reward(prompts=prompts, completions=completions, answer=["1000"]) == [1.0]


def test_rewards_accept_extra_trainer_arguments() -> None:
    extra = {"trainer_state": None, "log_extra": print, "log_metric": print, "completion_ids": [[1, 2]]}
    assert format_reward(prompts=["q"], completions=["x"], answer=["1"], **extra) == [0.0]
    assert answer_reward(prompts=["q"], completions=["<answer>1</answer>"], answer=["1"], **extra) == [1.0]
