"""The runner: executes a matrix's runs, each isolated, and appends their rows to the store.

- :mod:`~bench.runner.plan`: what is left to run, and in which order;
- :mod:`~bench.runner.executors`: where runs execute (this process, worker processes) and what
  a signal asks of them; the Ray executor is :mod:`bench.ray_executor`;
- :mod:`~bench.runner.execute`: one run, a pure function of its :class:`~bench.spec.RunSpec`;
- :mod:`~bench.runner.checkpoints`: quantized checkpoints, built or from the cache.

:func:`run_matrix` ties them together: plan, claim, execute, append rows run by run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.errors import StoreError
from bench.progress import on_terminal
from bench.runner.execute import RunTask, failure_rows
from bench.runner.executors import STOP, Executor, LocalExecutor, ProcessExecutor, Terminated, handle_signal
from bench.runner.plan import PlannedRun, dependencies, ordered, plan, waves
from bench.spec import MatrixSpec, RunSpec
from bench.store import ResultStore

__all__ = [
    "STOP", "Executor", "Interrupted", "LocalExecutor", "PlannedRun", "ProcessExecutor", "RunTask",
    "dependencies", "failure_rows", "handle_signal", "ordered", "plan", "run_matrix", "waves",
]  # fmt: skip

Log = Callable[[str], None]


def run_matrix(
    matrix: MatrixSpec,
    results_root: Path,
    executor: Executor | None = None,
    only: dict[str, tuple[str, ...]] | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Run what is left of ``matrix`` (or all of it with ``force``); return the new rows.

    Rows are appended run by run, so an interrupted matrix keeps every finished run and a
    rerun resumes with the first unfinished one.
    """
    store = ResultStore(results_root / matrix.name)
    store.check_writable()
    todo, held = [], {}
    for spec in (p.spec for p in plan(matrix, store, only, force) if p.state != "done"):
        holder = store.claim(spec.hash, force=force)
        if holder is None:
            todo.append(spec)
        else:  # another runner on this results root computes it
            held.setdefault(holder, []).append(store.claims / f"{spec.hash}.json")
    for holder, claims in held.items():
        files = str(claims[0]) if len(claims) == 1 else f"{claims[0]} and {len(claims) - 1} more"
        log(f"{len(claims)} run(s) are being done by {holder}; skipped here (claim {files}: one whose "
            "process is gone is recovered by itself, --force takes them over)")  # fmt: skip
    executor = executor or LocalExecutor()
    # Bars where runs share this process's terminal; throttled lines from worker processes and
    # wherever stderr is a log, not a terminal.
    bars = isinstance(executor, LocalExecutor) and on_terminal()
    run_progress = None if not progress else "bar" if bars else "lines"
    fn = RunTask(matrix.name, store.root / "samples", run_progress)
    new: list[dict[str, Any]] = []
    # Worker processes print progress lines of their own, which a bar would garble: there the
    # count of finished runs leads each run's summary line instead.
    bar = tqdm(total=len(todo), desc=f"matrix {matrix.name}", unit="run", disable=run_progress != "bar")
    finished = 0
    try:
        for spec, outcome in executor.map(fn, todo, dependencies(todo)):
            rows = outcome
            if isinstance(outcome, Exception):
                rows = failure_rows(
                    spec, matrix.name, "error", f"worker died: {type(outcome).__name__}: {outcome}"
                )
            try:
                try:
                    store.append(rows)
                except (
                    ValueError,
                    TypeError,
                ) as exc:  # rows no store can hold: the run failed, the matrix goes on
                    rows = failure_rows(spec, matrix.name, "error", f"rows not storable: {exc}")
                    store.append(rows)
            except OSError as exc:
                raise StoreError(
                    f"cannot write rows to {store.runs} ({exc.strerror or exc}); the {finished} run(s) "
                    "finished before are kept: free space and rerun to resume"
                ) from None
            store.release(spec.hash)
            finished += 1
            new.extend(rows)
            bar.update()
            log(f"[{finished}/{len(todo)}] {_summary(spec, rows)}")
    except KeyboardInterrupt as exc:
        raise Interrupted(finished, len(todo) - finished, isinstance(exc, Terminated)) from None
    finally:
        bar.close()
        for spec in todo:  # runs not finished here (interrupted, failed writes) are free again
            store.release(spec.hash)
    if STOP.level:
        raise Interrupted(finished, len(todo) - finished, terminated=False)
    return new


class Interrupted(Exception):
    """A matrix stopped by Ctrl-C or SIGTERM: ``finished`` runs were written, ``left`` resume."""

    def __init__(self, finished: int, left: int, terminated: bool) -> None:
        self.finished, self.left, self.terminated = finished, left, terminated
        how = "terminated" if terminated else "interrupted"
        super().__init__(f"{how}: {finished} run(s) finished and kept; {left} left, which a rerun resumes")


def _summary(spec: RunSpec, rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            return f"{spec.label}: {r['status'].upper()} {r['error']}"
        parts.append(f"{r['metric']}={r['value']:.4g}")
    return f"{spec.label}: {', '.join(parts)} ({rows[0]['duration_s']:.0f}s)"
