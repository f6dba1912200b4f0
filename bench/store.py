"""The results store: append-only, atomic, one tidy row per run × metric.

A matrix's results live in ``<results>/<matrix>/runs/``, one JSON-lines file per executed run,
written to a temporary name and renamed into place: a killed run leaves no partial row, and any
number of processes (or Ray workers) can write to one store without locks. Files are never
modified; re-running a cell adds a new file, and readers take each (run, metric)'s latest row.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import StoreError
from bench.fsio import lock_holder, lock_is_stale, try_lock, write_atomic

# The schema every row has (DESIGN.md), in report order; runs add descriptive extras after it.
COLUMNS = (
    "run_id",
    "matrix",
    "model",
    "method",
    "w_bits",
    "a_bits",
    "bits",
    "seed",
    "metric",
    "value",
    "unit",
    "higher_is_better",
    "n_samples",
    "status",
    "error",
    "device",
    "torch",
    "cuda",
    "diffusers",
    "python",
    "git_sha",
    "config_hash",
    "reference_hash",
    "started_at",
    "duration_s",
)
STATUSES = ("ok", "error", "skipped")
# Columns every reader sorts, groups or labels by: text in every row.
TEXT_COLUMNS = ("run_id", "matrix", "model", "method", "bits", "metric", "config_hash", "started_at")
# A row dated later than this after now was written by a skewed clock: as the newest row of its
# run it would shadow every real rerun.
FUTURE_SLACK = timedelta(days=1)


def _check_row(row: dict[str, Any]) -> None:
    """Raise ValueError naming what makes ``row`` unusable: a label that is not text, a value
    that is not a finite number (an ``ok`` row's value ranks; ``Infinity`` must not), or a date
    that is not an ISO timestamp or lies in the future."""
    wrong = [c for c in TEXT_COLUMNS if not isinstance(row[c], str)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} must be text, got {', '.join(repr(row[c]) for c in wrong)}")
    value = row["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"value must be a number or null, got {value!r}")
    if row["status"] == "ok" and (value is None or not math.isfinite(value)):
        raise ValueError(f"an ok row's value must be a finite number, got {value!r}")
    try:
        started = datetime.fromisoformat(row["started_at"])
    except ValueError:
        raise ValueError(f"started_at {row['started_at']!r} is not an ISO timestamp") from None
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    if started > datetime.now(UTC) + FUTURE_SLACK:
        raise ValueError(f"started_at {row['started_at']} lies in the future (a skewed clock?)")


# What a report reads from an invocation record, and the type each must have.
INVOCATION_FIELDS = {
    "matrix": str,
    "started_at": str,
    "wall_s": (int, float),
    "runs": int,
    "workers": int,
    "threads_per_worker": int,
    "peak_rss_main_mib": (int, float),
    "cache_files_at_start": int,
    "git_sha": str,
}


def _check_invocation(record: Any) -> None:
    """Raise ValueError naming what makes an invocation record unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    wrong = [
        k for k, kind in INVOCATION_FIELDS.items()
        if isinstance(record.get(k), bool) or not isinstance(record.get(k), kind)
    ]  # fmt: skip
    if wrong:
        raise ValueError(f"field(s) {', '.join(wrong)} missing or of the wrong type")


STALE_CLAIM_S = 7 * 24 * 3600  # a claim from another host that old is a dead runner's


def _check_one_matrix(root: Path, rows: list[tuple[Path, int, dict[str, Any]]]) -> None:
    """A store holds one matrix: a row naming another was copied in from elsewhere, and read as
    this matrix's it would replace its cells. Which matrix the store holds is decided by its
    folder's name where a row carries it, else by most rows, never by the intruder."""
    names = Counter(row["matrix"] for _, _, row in rows)
    if len(names) <= 1:
        return
    own = root.name if root.name in names else names.most_common(1)[0][0]
    path, i, row = next(r for r in rows if r[2]["matrix"] != own)
    raise StoreError(
        f"{path}:{i}: results row of matrix {row['matrix']!r} in the store of matrix {own!r} "
        f"({root}); move that file out of {root / 'runs'} (only that run is redone)"
    )


class ResultStore:
    """Rows of one matrix under ``root`` (``<results>/<matrix>``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"

    def check_writable(self) -> None:
        """Fail now, before any work, if rows could not be written later."""
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.runs, prefix=".probe-"):
                pass
        except OSError as exc:
            reason = exc.strerror or exc
            raise StoreError(
                f"results path {self.root} is not writable ({reason}); pass another with --results"
            ) from None

    def append(self, rows: list[dict[str, Any]]) -> Path:
        """Write one run's rows as a new file, atomically (temp file, fsync, rename)."""
        if not rows:
            raise ValueError("append() needs at least one row")
        missing = [c for c in COLUMNS if c not in rows[0]]
        if missing:
            raise ValueError(f"rows lack schema columns: {', '.join(missing)}")
        path = self.runs / f"{rows[0]['config_hash']}-{rows[0]['run_id']}.jsonl"
        write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        return path

    def claim(self, config_hash: str) -> str | None:
        """Claim a run for this process, so that a second runner on the same results root does
        not compute it too. Returns None when claimed, else who holds it. A claim whose process
        is gone (same host) or that is older than :data:`STALE_CLAIM_S` is recovered."""
        path = self.runs / ".claims" / f"{config_hash}.json"
        for _ in range(2):
            if try_lock(path):
                return None
            if not lock_is_stale(path, STALE_CLAIM_S):
                held = lock_holder(path) or {}
                return f"pid {held.get('pid', '?')} on {held.get('host', '?')}"
            path.unlink(missing_ok=True)
        return "another runner (claimed while recovering a stale claim)"

    def release(self, config_hash: str) -> None:
        (self.runs / ".claims" / f"{config_hash}.json").unlink(missing_ok=True)

    def record_invocation(self, record: dict[str, Any]) -> Path:
        """Keep what one ``qdiff-bench run`` cost as a whole (wall time, peak memory, workers),
        next to the rows it wrote."""
        path = self.root / "invocations" / f"{record['started_at'].replace(':', '')}.json"
        write_atomic(path, json.dumps(record, allow_nan=False, indent=1) + "\n")
        return path

    def invocations(self) -> list[dict[str, Any]]:
        """Every recorded invocation, oldest first."""
        records = []
        for path in sorted((self.root / "invocations").glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                _check_invocation(record)
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(
                    f"{path}: corrupt invocation record ({exc}); move that file out of "
                    f"{path.parent} (it only describes a past run's wall time and memory)"
                ) from None
            records.append(record)
        return records

    def rows(self) -> list[dict[str, Any]]:
        """Every row ever written, oldest run first."""
        if not self.runs.is_dir():
            return []
        rows: list[tuple[Path, int, dict[str, Any]]] = []
        for path in sorted(self.runs.glob("*.jsonl")):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or row.get("status") not in STATUSES:
                        raise ValueError("not a results row")
                    missing = [c for c in COLUMNS if c not in row]
                    if missing:
                        raise ValueError(f"it lacks the schema column(s) {', '.join(missing)}")
                    _check_row(row)
                except ValueError as exc:
                    raise StoreError(
                        f"{path}:{i}: corrupt results row ({exc}); move that file out of {self.runs} "
                        "and rerun the matrix (only that run is redone)"
                    ) from None
                rows.append((path, i, row))
        _check_one_matrix(self.root, rows)
        return sorted((row for _, _, row in rows), key=lambda r: r["started_at"])

    def latest(self) -> list[dict[str, Any]]:
        """The newest row of each (run, metric)."""
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.rows():
            newest[(row["config_hash"], row["metric"])] = row
        return list(newest.values())

    def completed(self) -> dict[str, set[str]]:
        """``config_hash → metrics`` whose latest row is ``ok``: what resuming skips."""
        done: dict[str, set[str]] = {}
        for row in self.latest():
            if row["status"] == "ok":
                done.setdefault(row["config_hash"], set()).add(row["metric"])
        return done


def load(path: str | Path, latest: bool = True) -> pd.DataFrame:
    """One matrix's results as a DataFrame (schema columns first).

    Args:
        path: ``<results>/<matrix>`` (the folder holding ``runs/``).
        latest: keep only the newest row of each (run, metric); ``False`` gives the full history.
    """
    store = ResultStore(path)
    if not store.runs.is_dir():
        raise StoreError(f"no results at {path} (expected {store.runs}); run a matrix first: qdiff-bench run")
    rows = store.latest() if latest else store.rows()
    if not rows:
        raise StoreError(f"no rows yet in {store.runs} (a first run was stopped before it finished); "
                         "run the matrix: qdiff-bench run")  # fmt: skip
    df = pd.DataFrame(rows)
    extras = [c for c in df.columns if c not in COLUMNS]
    return df.reindex(columns=[*COLUMNS, *extras])
