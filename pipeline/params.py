"""One table of what each option may be, checked before any model is loaded (scikit-learn's idea)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UserError


@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (None: unbounded); integer=True demands a whole number."""

    low: float | None = None
    high: float | None = None
    integer: bool = False

    def check(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.integer and int(value) != value:
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{kind} in [{low}, {high}]"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def check(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(self.choices)


def _accepts(constraint: Any, value: Any) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        return isinstance(value, constraint) and not isinstance(value, bool)
    return constraint.check(value)


def _describe(constraint: Any) -> str:
    if constraint is None:
        return "unset"
    return constraint.__name__ if isinstance(constraint, type) else str(constraint)


def check_params(values: Mapping[str, Any], constraints: Mapping[str, list]) -> None:
    """Raise UserError naming the first option whose value none of its constraints accept.

    Every name in values must have a row in constraints; a table may hold more rows than one caller checks.
    """
    for name, value in values.items():
        allowed = constraints[name]
        if not any(_accepts(c, value) for c in allowed):
            wants = " or ".join(_describe(c) for c in allowed)
            raise UserError(f"--{name.replace('_', '-')} is {value!r}; it must be {wants}.")


def as_number(name: str, value: Any) -> Any:
    """A number given as text on the command line (e.g. --unknown-threshold 2.5) as a float; other values as
    they are. Text that is no number is a UserError in check_params' words."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')} is {value!r}; it must be a number.") from None
    if math.isnan(number):
        raise UserError(f"--{name.replace('_', '-')} is {value!r}; it must be a number.")
    return number
