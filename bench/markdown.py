"""Markdown tables that row fields cannot break. A results row may carry any text in its labels
(a model, method or host name from another machine's store); a ``|`` or a line break in one
would end a table cell or row, so every cell and heading written from row fields goes through
here."""

from __future__ import annotations

from collections.abc import Iterable

_CELL = str.maketrans({"|": "\\|", "\n": " ", "\r": " "})


def cell(value: object) -> str:
    """``value`` as one table cell."""
    return str(value).translate(_CELL)


def line(value: object) -> str:
    """``value`` on one line (a heading or a list item)."""
    return " ".join(str(value).splitlines())


def row(values: Iterable[object]) -> str:
    """One table row."""
    return "| " + " | ".join(cell(v) for v in values) + " |"


def table(header: Iterable[object], rows: Iterable[Iterable[object]]) -> list[str]:
    """A table's lines: header, rule, rows."""
    header = list(header)
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]
