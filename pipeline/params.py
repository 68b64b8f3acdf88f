"""One table of what each option may be, checked before any model is loaded (scikit-learn's idea).

Every option is declared once for the whole package (`define`), where the fact it depends on lives: the
shared ones here, the others beside their module's choices (`define(clf=[Options(CLASSIFIERS)])` in heads).
Errors name the parameter as the caller gave it: the argument's name to a Python caller, the flag on the
command line (cli.py renders a `ParamError` with `as_flags`).
"""

from __future__ import annotations

import math
import re
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


@dataclass(frozen=True)
class Matches:
    """A string that matches a regular expression as a whole; description says what that means."""

    pattern: str
    description: str

    def check(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def __str__(self) -> str:
        return self.description


def literal(text: str) -> str:
    """Text to put into a ParamError template as it is (its braces escaped)."""
    return text.replace("{", "{{").replace("}", "}}")


class ParamError(UserError):
    """A user error about named parameters: `str()` names them as Python arguments, `as_flags()` as options.

    The message is a template with one `{}` per name, e.g. ParamError("{} applies to MobileNet only", "alpha").
    """

    def __init__(self, template: str, *names: str) -> None:
        self.template, self.names = template, names
        super().__init__(template.format(*names))

    def as_flags(self) -> str:
        """The message as the command line's user reads it: `--top-k` for top_k."""
        return self.template.format(*("--" + n.replace("_", "-") for n in self.names))


SEED = Interval(0, 2**32 - 1, integer=True)  # what numpy's and scikit-learn's seeds accept
N_JOBS = [Interval(-1, -1, integer=True), Interval(1, 256, integer=True)]  # -1: every core

# name -> the constraints of which a valid value meets at least one; filled by define()
PARAMETERS: dict[str, list] = {}


def define(**constraints: list) -> None:
    """Declare what options may be; a name has one definition in the whole package."""
    for name, allowed in constraints.items():
        if PARAMETERS.setdefault(name, allowed) != allowed:
            raise ValueError(f"option {name!r} is defined twice, differently")  # a bug, not a user mistake


define(
    seed=[SEED],
    cv=[Interval(2, 50, integer=True)],
    n_jobs=N_JOBS,
    test_size=[Interval(0.01, 0.9)],
    batch_size=[Interval(1, 4096, integer=True)],
    workers=[Interval(1, 256, integer=True), None],
    threads=[Interval(1, 256, integer=True), None],
    top_k=[Interval(1, 1000, integer=True)],
)


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


def check_params(values: Mapping[str, Any]) -> None:
    """Raise ParamError naming the first option whose value none of its defined constraints accept."""
    for name, value in values.items():
        allowed = PARAMETERS[name]
        if not any(_accepts(c, value) for c in allowed):
            wants = " or ".join(_describe(c) for c in allowed)
            raise ParamError("{} " + literal(f"is {value!r}; it must be {wants}."), name)


def as_number(name: str, value: Any) -> Any:
    """A number given as text on the command line (e.g. --unknown-threshold 2.5) as a float; other values as
    they are. Text that is no number is a ParamError in check_params' words."""
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        raise ParamError("{} " + literal(f"is {value!r}; it must be a number."), name)
    return number
