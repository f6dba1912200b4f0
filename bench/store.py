"""The results store: append-only, atomic, one tidy row per run × metric.

A matrix's results live in ``<results>/<matrix>/runs/``, one JSON-lines file per executed run,
written to a temporary name and renamed into place: a killed run leaves no partial row, and any
number of processes (or Ray workers) can write to one store without locks. Files are never
modified; re-running a cell adds a new file, and readers take each (run, metric)'s latest row.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
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


def _own_matrix(root: Path, names: Counter) -> str | None:
    """Which matrix a store holds, from its rows' ``matrix`` counts, where they name more than
    one (else None). A store holds one matrix: a row naming another was copied in from
    elsewhere, and read as this matrix's it would replace its cells. Its folder's name decides
    where a row carries it, else most rows, never the intruder."""
    if len(names) <= 1:
        return None
    return root.name if root.name in names else names.most_common(1)[0][0]


def _check_one_matrix(root: Path, rows: list[tuple[Path, int, dict[str, Any]]], own: str | None) -> None:
    """Raise naming the first of ``rows`` that is not of matrix ``own`` (None: no check)."""
    if own is None:
        return
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

    @property
    def claims(self) -> Path:
        return self.runs / ".claims"

    def claim(self, config_hash: str, force: bool = False) -> str | None:
        """Claim a run for this process, so that a second runner on the same results root does
        not compute it too. Returns None when claimed, else who holds it. A claim whose process
        is gone (same host, its pid dead or reused by another process) or that is older than
        :data:`STALE_CLAIM_S` is recovered; ``force`` takes any claim over."""
        path = self.claims / f"{config_hash}.json"
        for _ in range(2):
            if try_lock(path):
                return None
            if not force and not lock_is_stale(path, STALE_CLAIM_S):
                return _holder(path)
            path.unlink(missing_ok=True)
        return "another runner (claimed while recovering a stale claim)"

    def in_progress(self) -> str | None:
        """Who is running this matrix's runs now ("2 run(s) by pid 7 on host"), from the live
        claims, or None."""
        if not self.claims.is_dir():
            return None
        holders = Counter(
            _holder(path) for path in self.claims.glob("*.json") if not lock_is_stale(path, STALE_CLAIM_S)
        )
        holders.pop("nobody", None)
        return "; ".join(f"{n} run(s) by {who}" for who, n in holders.items()) or None

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

    def files(self) -> list[Path]:
        """The run files (``runs/*.jsonl``), by name. An entry so named that is not a readable
        regular file (a folder, a FIFO, a dangling link or a link loop) is a corrupt entry."""
        if not self.runs.is_dir():
            return []
        paths = []
        with os.scandir(self.runs) as entries:
            for entry in entries:
                if not entry.name.endswith(".jsonl"):
                    continue
                path = Path(entry.path)
                try:
                    mode = path.stat().st_mode  # follows links: a loop or a dangling one fails here
                except OSError as exc:
                    raise self._corrupt(path, f"unreadable: {exc.strerror or exc}") from None
                if not stat.S_ISREG(mode):
                    kind = (
                        "a folder"
                        if stat.S_ISDIR(mode)
                        else "a FIFO"
                        if stat.S_ISFIFO(mode)
                        else "not a file"
                    )
                    raise self._corrupt(path, f"{kind}, not a file of rows")
                paths.append(path)
        return sorted(paths)

    def _corrupt(self, where: str | Path, problem: str) -> StoreError:
        return StoreError(f"{where}: corrupt results row ({problem}); move that file out of {self.runs} "
                          "and rerun the matrix (only that run is redone)")  # fmt: skip

    def _file_rows(self, path: Path) -> list[dict[str, Any]]:
        """One run file's rows, each checked in full (:data:`COLUMNS`, :func:`_check_row`)."""
        rows = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(path, f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
        for i, line in enumerate(text.splitlines(), 1):
            try:
                try:
                    row = json.loads(line)
                except RecursionError:
                    raise ValueError("nested too deeply to be a results row") from None
                if not isinstance(row, dict) or row.get("status") not in STATUSES:
                    raise ValueError("not a results row")
                missing = [c for c in COLUMNS if c not in row]
                if missing:
                    raise ValueError(f"it lacks the schema column(s) {', '.join(missing)}")
                _check_row(row)
            except ValueError as exc:
                raise self._corrupt(f"{path}:{i}", str(exc)) from None
            rows.append(row)
        return rows

    def rows(self) -> list[dict[str, Any]]:
        """Every row ever written, each checked in full, oldest run first (every row in memory:
        :meth:`latest` reads a large store through its :meth:`index`)."""
        rows = [(path, i, row) for path in self.files() for i, row in enumerate(self._file_rows(path), 1)]
        _check_one_matrix(
            self.root, rows, _own_matrix(self.root, Counter(row["matrix"] for _, _, row in rows))
        )
        return sorted((row for _, _, row in rows), key=lambda r: r["started_at"])

    def index(self) -> pd.DataFrame:
        """Every row's :data:`INDEX_COLUMNS` and its ``file`` (the name in ``runs/``), read by
        DuckDB without building the rows' other fields; every row's identity is checked as
        :meth:`rows` checks it, and a row that fails is named by reading its file in full.
        Memoised per folder (every store object of it: a run plans with one, reads with
        another) while no run file is added, removed or changed."""
        files = self.files()
        stamp = tuple((p.name, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
        key = self.runs.resolve()
        cached = _INDEXES.get(key)
        if cached is None or cached[0] != stamp:
            cached = _INDEXES[key] = (stamp, self._read_index(files))
        return cached[1]

    def _read_index(self, files: list[Path]) -> pd.DataFrame:
        if not files:
            return pd.DataFrame(columns=["file", *INDEX_COLUMNS, "bad"])
        try:
            df = _duckdb_index(files)
        except Exception as exc:  # duckdb.Error: a line it cannot read; the full read names it
            culprit = re.search(r'in file "([^"]+)"', str(exc))
            for path in [Path(culprit[1])] if culprit else files:
                self._file_rows(path)
            raise self._corrupt(culprit[1] if culprit else self.runs, str(exc).splitlines()[0]) from None
        bad = _bad_rows(df)
        if bad.any():
            path = self.runs / df.loc[bad.idxmax(), "file"]
            self._file_rows(path)  # raises with the line and the reason
            raise self._corrupt(path, "a row the full read accepts but its index does not")
        own = _own_matrix(self.root, Counter(df["matrix"]))
        if own is not None:
            path = self.runs / df.loc[(df["matrix"] != own).idxmax(), "file"]
            _check_one_matrix(self.root, [(path, i, r) for i, r in enumerate(self._file_rows(path), 1)], own)
        return df

    def _newest(self) -> pd.DataFrame:
        """The index row of the newest row of each (run, metric); a tie goes to the later file
        and line, as a reader of every row in order would have it."""
        return (
            self.index()
            .sort_values("started_at", kind="stable")
            .drop_duplicates(["config_hash", "metric"], keep="last")
        )

    def latest(self) -> list[dict[str, Any]]:
        """The newest row of each (run, metric), oldest first: the newest is found in the
        :meth:`index`, and only the files holding one are read in full."""
        newest = self._newest()
        rows = []
        for name, wanted in newest.groupby("file", sort=True)["metric"]:
            keep = set(wanted)
            rows.extend(r for r in self._file_rows(self.runs / name) if r["metric"] in keep)
        return sorted(rows, key=lambda r: r["started_at"])

    def completed(self) -> dict[str, set[str]]:
        """``config_hash → metrics`` whose latest row is ``ok``: what resuming skips."""
        newest = self._newest()
        done: dict[str, set[str]] = {}
        for config, metric in newest.loc[newest["status"] == "ok", ["config_hash", "metric"]].itertuples(
            index=False
        ):
            done.setdefault(config, set()).add(metric)
        return done


_INDEXES: dict[Path, tuple[tuple, pd.DataFrame]] = {}  # runs folder -> (its files' stamp, index)

# What the index keeps of each row: what decides which row of a (run, metric) counts.
INDEX_COLUMNS = ("config_hash", "metric", "started_at", "status", "matrix")
NUMBER_TYPES = ("BIGINT", "UBIGINT", "HUGEINT", "DOUBLE")


def _duckdb_index(files: list[Path]) -> pd.DataFrame:
    """Every row of ``files`` as its file's name, its :data:`INDEX_COLUMNS` and ``bad``: whether
    :func:`_check_row` (or the status check) would refuse its identity (a label that is not
    text, a value that is not a number, an ``ok`` value that is not finite; the dates are
    checked by the caller). Read by DuckDB's JSON reader, which builds only these keys,
    whatever else (bootstrap replicates, configurations) a row holds."""
    import duckdb

    columns = "{" + ", ".join(f"'{c}': 'JSON'" for c in (*TEXT_COLUMNS, "status", "value")) + "}"
    text = " OR ".join(f"coalesce(json_type({c}), 'NULL') <> 'VARCHAR'" for c in (*TEXT_COLUMNS, "status"))
    numbers = ", ".join(f"'{t}'" for t in ("NULL", *NUMBER_TYPES))
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    query = (
        "SELECT parse_filename(filename) AS file, "
        + ", ".join(f"{c}->>'$' AS {c}" for c in INDEX_COLUMNS)
        + f", ({text} OR (status->>'$') NOT IN ({statuses}) "
        f"OR coalesce(json_type(value), 'NULL') NOT IN ({numbers}) "
        "OR ((status->>'$') = 'ok' AND NOT coalesce(isfinite(TRY_CAST(value AS DOUBLE)), false))) AS bad "
        f"FROM read_json(?, format='newline_delimited', columns={columns}, filename=true)"
    )  # a line over DuckDB's 16 MB object size is refused: a results row is some 20 kB
    with duckdb.connect(config={"threads": max(1, min(4, os.cpu_count() or 1))}) as con:
        return con.execute(query, [[str(p) for p in files]]).df()


def _bad_rows(df: pd.DataFrame) -> pd.Series:
    """Which index rows :func:`_check_row` would refuse: :func:`_duckdb_index`'s ``bad``, and
    a start that is no ISO timestamp or lies in the future."""
    started = pd.to_datetime(df["started_at"], format="ISO8601", utc=True, errors="coerce")
    return df["bad"] | started.isna() | (started > pd.Timestamp.now(tz="UTC") + FUTURE_SLACK)


def _holder(path: Path) -> str:
    held = lock_holder(path)
    if held is None:
        return "nobody"
    return f"pid {held.get('pid', '?')} on {held.get('host', '?')}"


def no_rows_yet(store: ResultStore) -> StoreError:
    """The error of a store without rows: a first run is in progress, or was stopped."""
    busy = store.in_progress()
    if busy:
        return StoreError(f"no rows yet in {store.runs}: a run is in progress ({busy}); "
                          "report again when it has finished a run")  # fmt: skip
    return StoreError(f"no rows yet in {store.runs} (a first run was stopped before it finished); "
                      "run the matrix: qdiff-bench run")  # fmt: skip


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
        raise no_rows_yet(store)
    df = pd.DataFrame(rows)
    extras = [c for c in df.columns if c not in COLUMNS]
    return df.reindex(columns=[*COLUMNS, *extras])
