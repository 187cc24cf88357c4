"""Checks of user-given options and arguments, and how a bad one is described.

Every option that sizes work or memory has a range; a value outside it raises
:class:`OptionError` naming the option, the range and the value given (shortened: a user value
may be a string of megabytes or an integer of thousands of digits).
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from pydantic import ValidationError

from deepsqueeze.errors import OptionError

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4


def short_repr(value: Any) -> str:
    """A short ``repr`` of a user value: long strings, deep or long containers and integers of
    thousands of digits are cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an integer too long for str() deep inside a container
        return f"a {type(value).__name__}"


def printable(text: str) -> str:
    """``text`` with every non-printable character but newline escaped (``\\x1b``): a name or
    path from a file can hold terminal escape sequences or bidi overrides that would forge what
    the terminal shows."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\n" else ascii(ch)[1:-1] for ch in text)


def describe_validation_error(exc: ValidationError, *, options: bool = True) -> str:
    """One line naming every wrong field (with ``options``: also as its ``--option``), its rule
    and the value given."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        flag = f" (--{loc.replace('_', '-')})" if options and len(err["loc"]) == 1 else ""
        given = "" if err["type"] in ("missing", "extra_forbidden") else \
            f", got {short_repr(err.get('input'))}"
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own words
        parts.append(f"{loc}{flag}: {msg}{given}")
    return "; ".join(parts)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``; :class:`OptionError` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OptionError(
            f"{name} must be an integer in {low:,}..{high:,}, got {short_repr(value)}"
        )
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a finite float in ``low..high``; :class:`OptionError` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            value = float(value)
        except OverflowError:
            ok = False
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise OptionError(
            f"{name} must be a number in {low:g}..{high:g}, got {short_repr(value)}"
        )
    return value


__all__ = ["check_float", "check_int", "describe_validation_error", "printable", "short_repr"]
