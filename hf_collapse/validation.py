"""Argument checks shared by every config, trainer config and command: one message format everywhere.

A leaf module (standard library only), so modeling files can import it and remote-code exports can copy it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_number", "check_known_fields", "check_finite_fields"]


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` (ints stay ints, other numbers become floats) or raise ``ValueError`` naming the field.

    Booleans are refused (``True`` is an ``int`` in Python), NaN and infinities are refused (``nan < 0`` is False,
    so a plain range check lets NaN through), and the message gives the field, the value and the allowed range.

    Args:
        owner: what the field belongs to, e.g. ``"RobustMamba2Config"`` or ``"--strength"``.
        name: the field's name.
        value: the value to check.
        integer: require an ``int``.
        minimum, maximum: bounds, inclusive unless ``exclusive_minimum`` / ``exclusive_maximum``.
        allow_none: accept ``None`` (returned as is).
    """
    if value is None and allow_none:
        return None
    lo = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum:g}"
    hi = "" if maximum is None else f"{'<' if exclusive_maximum else '<='} {maximum:g}"
    kind = "an integer" if integer else "a finite number"
    allowed = " and ".join(x for x in (lo, hi) if x)
    expected = f"{kind}{' ' + allowed if allowed else ''}{' or None' if allow_none else ''}"
    number_types = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, number_types)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if exclusive_maximum else value <= maximum
    if not ok:
        sep = "." if owner[-1:].isalnum() else ""
        raise ValueError(f"{owner}{sep}{name} must be {expected}, got {value!r}.")
    return value if integer else float(value)


def check_known_fields(owner: str, given: Iterable[str], known: Iterable[str], cutoff: float = 0.8) -> None:
    """Raise ``TypeError`` for a keyword in ``given`` that is not in ``known`` but looks like one (a typo).

    Keywords that resemble no known field are left alone: transformers configs legitimately carry extra keys.
    """
    known = list(known)
    for key in given:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=cutoff)
        if close:
            raise TypeError(f"{owner} got an unknown argument {key!r}; did you mean {close[0]!r}?")


def check_finite_fields(owner: str, obj: Any, names: Iterable[str] | None = None) -> None:
    """Raise ``ValueError`` for any float attribute of ``obj`` (a dataclass by default: all its fields) that is NaN or
    infinite, e.g. a ``TrainingArguments`` subclass whose ``learning_rate`` came from a bad command line."""
    import dataclasses

    if names is None:
        names = [f.name for f in dataclasses.fields(obj)]
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}.")
