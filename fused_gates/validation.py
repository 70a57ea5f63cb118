"""Checking single values: every error names the argument (or flag). The one home of the number checks used by the
public functions, the TRL integration and the command lines.

:func:`check_number` is the rule; :func:`is_number` asks it without raising; :func:`number_argument` turns it into
an argparse ``type`` (argparse names the flag and exits 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def fail(argument: str, message: str, kind: type[Exception] = ValueError) -> Exception:
    """The error every check raises: ``argument: message``."""
    return kind(f"{argument}: {message}")


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = 0.0,
    allow_minimum: bool = False,
    maximum: float | None = None,
    allow_maximum: bool = True,
    integer: bool = False,
) -> float:
    """A finite real number (an int with ``integer``), above ``minimum`` (or equal to it with ``allow_minimum``) and
    below ``maximum`` (or equal to it with ``allow_maximum``). Tensors of one element are read (a host sync)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, f"expected {'an int' if integer else 'a number'}, got {type(value).__name__}", TypeError)
    if integer and not isinstance(value, int):
        raise fail(name, f"expected an int, got {type(value).__name__}", TypeError)
    number = float(value)
    low_ok = minimum is None or number > minimum or (number == minimum and allow_minimum)
    high_ok = maximum is None or number < maximum or (number == maximum and allow_maximum)
    if not (math.isfinite(number) and low_ok and high_ok):
        raise fail(name, f"must be {describe_range(minimum, allow_minimum, maximum, allow_maximum)}, got {value}")
    return value if integer else number


def describe_range(minimum: float | None, allow_minimum: bool, maximum: float | None, allow_maximum: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'[' if allow_minimum else '('}{minimum:g}, {maximum:g}{']' if allow_maximum else ')'}"
    if minimum is not None:
        return f"finite and {'>=' if allow_minimum else '>'} {minimum:g}"
    if maximum is not None:
        return f"finite and {'<=' if allow_maximum else '<'} {maximum:g}"
    return "a finite number"


def is_number(value: object, **bounds: Any) -> bool:
    """Whether :func:`check_number` accepts ``value`` with these bounds."""
    try:
        check_number("value", value, **bounds)
    except (TypeError, ValueError):
        return False
    return True


def check_choice(name: str, value: object, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise fail(name, f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def number_argument(
    kind: Callable[[str], Any], check: Callable[[Any], bool], requirement: str
) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses non-finite values and those failing ``check`` with an
    error stating ``requirement`` (argparse names the flag and exits 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
