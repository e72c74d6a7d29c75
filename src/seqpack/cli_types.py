"""argparse ``type=`` functions that range-check numbers, so a bad value stops at the command line with a message
naming the option and the allowed range (``argument --max_new_tokens: must be an integer >= 1, got -3``).

    >>> parser.add_argument("--steps", type=positive_int, default=2)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse


def _number(kind, low: float, text: str, strict: bool = False, high: float | None = None):
    name = "an integer" if kind is int else "a number"
    bound = f"> {low}" if strict else f">= {low}"
    want = f"{name} {bound}" + (f" and <= {high}" if high is not None else "")
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
    if value != value or (value <= low if strict else value < low) or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(int, 1, text)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(int, 0, text)


def positive_float(text: str) -> float:
    """A number > 0."""
    return _number(float, 0, text, strict=True)


def non_negative_float(text: str) -> float:
    """A number >= 0."""
    return _number(float, 0, text)


def fraction(text: str) -> float:
    """A number within 0..1."""
    return _number(float, 0, text, high=1)
