"""Progress inside one run: sampling steps, calibration trajectories, reconstruction units.

A run's long phases report ``(done, total)`` through a plain callback, so the library and the
adapters stay free of any display code. How it shows depends on where the run executes:

- ``"bar"``: a tqdm bar per phase, for runs in this process (one worker), on a terminal;
- ``"lines"``: for runs in worker processes, whose bars would overwrite each other on the one
  terminal, and wherever stderr is no terminal (a log file, CI), which a bar's carriage returns
  would flood: a line to stderr at most every :data:`LINE_EVERY` seconds per phase, with the
  count, the elapsed time and an ETA, and one when a phase that took that long ends;
- ``None``: nothing (``--no-progress``).
"""

from __future__ import annotations

import logging
import sys
import textwrap
import time
from collections.abc import Callable

from tqdm.auto import tqdm

MODES = ("bar", "lines")
WIDTH = 100  # columns of a line the suite prints: a default terminal shows it unwrapped
LINE_EVERY = 20.0  # seconds between two lines of one phase

Callback = Callable[[int, int], None]


def wrap(text: str, width: int = WIDTH) -> str:
    """``text`` in lines of at most ``width`` columns, continuation lines indented; each line
    of ``text`` is wrapped on its own (a word longer than a line, a path, is kept whole)."""
    return "\n".join(
        textwrap.fill(line, width, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
        or line
        for line in text.splitlines()
    )


class _WrappedStderr(logging.Handler):
    """Each record's message, wrapped to :data:`WIDTH` columns, on the ``sys.stderr`` of the
    moment (as logging's last-resort handler, which this replaces, writes it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(wrap(self.format(record)) + "\n")
        except Exception:
            self.handleError(record)


def log_to_stderr() -> None:
    """Warnings of the suite and its libraries to stderr, wrapped (the command line's process
    and its worker processes)."""
    root = logging.getLogger()
    if not any(isinstance(h, _WrappedStderr) for h in root.handlers):
        root.addHandler(_WrappedStderr())


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Phase:
    """One phase of one run; call it with ``(done, total)`` after each unit of work."""

    def __init__(self, mode: str, label: str, what: str, unit: str) -> None:
        self.mode, self.label, self.what, self.unit = mode, label, what, unit
        self.start = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # the first report: the rate counts from here
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.mode == "bar":
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.what, unit=self.unit, leave=False)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        now = time.perf_counter()
        elapsed = now - self.start
        if done >= total:
            if elapsed >= LINE_EVERY:
                self._line(f"{self.what} done: {total} {self.unit} in {_clock(elapsed)}")
            return
        if self.first is None:  # the time before it (loading, calibrating) is not this work's rate
            self.first = (now, done)
            return
        since, base = self.first
        if now - self.last >= LINE_EVERY and done > base:
            eta = (now - since) / (done - base) * (total - done)
            self._line(
                f"{self.what} {done}/{total} {self.unit}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
            )
            self.last = now

    def _line(self, text: str) -> None:
        print(wrap(f"  {self.label}: {text}"), file=sys.stderr, flush=True)


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a bar redraws in place) rather than a log."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


class Tracker:
    """The progress callbacks of one run (see the module docstring for ``mode``)."""

    def __init__(self, mode: str | None, label: str) -> None:
        if mode not in (None, *MODES):
            raise ValueError(f"progress mode {mode!r}: choose from {', '.join(MODES)} or None")
        self.mode, self.label = mode, label

    def phase(self, what: str, unit: str) -> Callback | None:
        return None if self.mode is None else Phase(self.mode, self.label, what, unit)
