"""Input checks, one per kind of value, each raising ValueError that names the argument, what it saw and what
it expected. Every public entry point of the package checks its arguments through these.

Why a module of its own: the same "positive int" test written out inline sixteen times drifts (one copy
accepts True as 1, another forgets the name), and the error messages are part of the course's contract.

Python's bool is a subclass of int, so `isinstance(True, int)` holds; every int check here refuses bools,
since `num_heads=True` is a mistake, never a 1.
"""

from __future__ import annotations

import math
import numbers


def _expected_range(low, high) -> str:
    if low is not None and high is not None:
        return f"in {low}..{high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def check_int(name: str, value, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """`value` as an int in low..high (either bound may be None); bools are refused."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or (low is not None and value < low) or (high is not None and value > high)):
        expected = " ".join(part for part in ("an int", _expected_range(low, high), why) if part)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_real(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float in low..high (either bound may be None); bools are refused."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (low is not None and value < low) or (high is not None and value > high)):
        expected = " ".join(part for part in ("a finite number", _expected_range(low, high)) if part)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> object:
    """`value` if it is one of `choices` (compared with ==)."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
