"""The checks every typed setting goes through, in the library's configs and the harness's
matrix settings alike: each returns what is wrong with a value (``None`` if nothing), and the
caller raises its own error with the field's name and location in front."""

from __future__ import annotations

import math
from typing import Any


def choice(value: Any, valid: tuple[str, ...]) -> str | None:
    """``value`` is one of ``valid``."""
    return None if value in valid else f"is not valid; choose one of {', '.join(valid)}"


def number(value: Any, allow_zero: bool = False, integer: bool = False) -> str | None:
    """``value`` is a finite number (an integer if ``integer``) above 0 (or at least 0)."""
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"must be {'an integer' if integer else 'a number'}"
    if not math.isfinite(value):
        return "must be a finite number"
    if value < 0 or (value == 0 and not allow_zero):
        return f"must be {'>= 0' if allow_zero else '> 0'}"
    return None
