"""What ``qdiff-bench run`` does, as a Python call; the command line parses its flags, calls
:func:`run` and prints.

    from bench import api

    outcome = api.run("configs/default.yaml", "qdiff-results", workers=1)
    outcome.rows            # the rows this call appended (one per run × metric)
    outcome.report.cells    # the leaderboard's cells (bench.report.cells), or None with report=False

Runs already in the store are skipped (resumable) unless ``force``; every run's rows and the
call's invocation record (wall time, workers, peak memory, machine) are written to
``<results>/<matrix name>/``, then ``report.md`` and ``report.html``. SIGINT and SIGTERM stop it
between runs and raise :class:`bench.runner.Interrupted`; what finished stays written.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cache import cache_dir
from bench.errors import MatrixError
from bench.matrix import MatrixSpec, load_matrix
from bench.spec import ExecutorSpec
from bench.store import ResultStore

# Where a run writes by default (yours, measured here); an empty variable means unset.
RESULTS = Path(os.environ.get("QDIFF_BENCH_RESULTS") or "qdiff-results")


@dataclass(frozen=True)
class Outcome:
    """What one :func:`run` did.

    Attributes:
        matrix: the matrix as loaded. store: its results folder.
        rows: the rows this call appended. wall_s: seconds the call took.
        report: the leaderboard written into the folder (``None`` with ``report=False`` or when
            nothing ran). report_paths: its ``report.md`` and ``report.html``.
        elsewhere: who runs this matrix's other runs now ("3 run(s) by pid 7 on host"), when
            another process holds them and this call ran nothing; else None.
    """

    matrix: MatrixSpec
    store: ResultStore
    rows: list[dict[str, Any]]
    wall_s: float
    report: Any = None
    report_paths: tuple[Path, Path] | None = None
    elsewhere: str | None = None

    @property
    def failed(self) -> bool:
        """Whether a run ended in an error row (a skipped one is not a failure)."""
        return any(r["status"] == "error" for r in self.rows)


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def execution(matrix: MatrixSpec, workers: int | None, threads: int | None) -> tuple[int, int]:
    """Worker processes and torch threads per worker for this machine and matrix; a request
    beyond the machine's cores is capped, with one line on stderr."""
    import torch

    cuda = torch.cuda.is_available() and any(r.sampling.device != "cpu" for r in matrix.expand())
    n = cores()
    if workers is None:
        workers = 1 if cuda else max(1, min(4, n, len(matrix.expand())))
    elif workers > n:
        print(f"--workers {workers} exceeds this machine's {n} cores: using {n}", file=sys.stderr)
        workers = n
    if threads is not None and workers * threads > n:
        # Oversubscribed cores make every timing and reconstruction many times slower.
        capped = max(1, n // workers)
        print(
            f"--threads {threads} × {workers} worker(s) exceeds this machine's {n} cores: using {capped}",
            file=sys.stderr,
        )
        threads = capped
    return workers, threads or max(1, n // workers)


def planned(spec: MatrixSpec, store: ResultStore, only: dict | None, force: bool) -> list:
    """The runs of ``spec`` selected by ``only``, each with its state in ``store`` (todo, partial,
    done, forced: :func:`bench.runner.plan`).

    Raises:
        MatrixError: ``only`` selects none of them.
    """
    from bench.runner import plan

    runs = plan(spec, store, only, force)
    if only and not runs:
        asked = " ".join(f"--only {k}={','.join(v)}" for k, v in only.items())
        raise MatrixError(
            f"{asked} matches no run of {spec.path}; see its runs with: qdiff-bench validate {spec.path}"
        )
    return runs


def run(
    matrix: str | Path | MatrixSpec,
    results: str | Path = RESULTS,
    *,
    only: dict[str, tuple[str, ...]] | None = None,
    force: bool = False,
    workers: int | None = None,
    threads: int | None = None,
    executor: ExecutorSpec | None = None,
    inception_weights: str | None = None,
    progress: bool = False,
    report: bool = True,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Run a matrix (a file or a loaded :class:`~bench.matrix.MatrixSpec`) into ``results``.

    Args:
        only: run only the cells matching these rules (``{"method": ("qdiff",)}``, shell
            patterns; :func:`bench.matrix.parse_rules` reads ``KEY=PATTERN`` strings).
        force: rerun runs whose rows are already in the store.
        workers / threads: local worker processes and torch threads each (default: split this
            machine's cores; see :func:`execution`). On Ray, ``threads`` per run.
        executor: where runs go (default: the matrix's ``executor`` setting).
        inception_weights: local Inception weights for FID (nothing is downloaded).
        progress: progress on stderr (bars on a terminal, plain lines in a log).
        report: write the leaderboard afterwards.
        log: where progress lines go (default: stderr, above the bars).

    Raises:
        MatrixError: the matrix has problems, or ``only`` matches none of its runs.
        bench.runner.Interrupted: SIGINT or SIGTERM arrived; finished runs stay written.
    """
    _check_arguments(matrix, results, workers, threads, only)
    import torch
    from tqdm.auto import tqdm

    from bench.runner import STOP, LocalExecutor, ProcessExecutor, handle_signal, run_matrix

    spec = matrix if isinstance(matrix, MatrixSpec) else load_matrix(matrix, executor and executor.name)
    if inception_weights:
        spec = spec.with_evaluation(inception_weights=inception_weights)
    results = Path(results)
    store = ResultStore(results / spec.name)
    planned(spec, store, only, force)
    store.check_writable()
    store.index()  # a corrupt store fails now, before any work
    if log is None:
        from bench.progress import wrap

        log = lambda msg: tqdm.write(wrap(msg), file=sys.stderr)  # noqa: E731  (keeps the bars intact)
    chosen = executor or spec.executor
    if chosen.name == "ray":
        from bench.ray_executor import RayExecutor, import_ray

        import_ray()  # not installed: say so before any work
        if workers:
            raise MatrixError("--workers is for the local executor: on Ray, as many runs go at once as the "
                              "cluster has resources for (set --threads per run)")  # fmt: skip
        workers, threads = 0, threads or 1
        runner = RayExecutor(chosen, threads, log)
        how = f"Ray ({chosen.address or 'a local instance'}), {threads} torch thread(s) per CPU run"
    else:
        workers, threads = execution(spec, workers, threads)
        runner = LocalExecutor() if workers == 1 else ProcessExecutor(workers, threads)
        how = f"{workers} worker(s) x {threads} torch thread(s)"
    torch.set_num_threads(threads)
    started = datetime.now(UTC)
    start = time.time()
    cached_before = sum(1 for p in cache_dir().rglob("*") if p.is_file()) if cache_dir().is_dir() else 0
    log(f"{spec.name}: {how}; {spec.budget_note}")
    STOP.reset()
    handlers = {sig: signal.signal(sig, handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rows = run_matrix(spec, results, runner, only=only, force=force, progress=progress, log=log)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    wall_s = time.time() - start
    if rows:
        record = invocation(spec, rows, started, wall_s, workers, threads, cached_before, chosen)
        store.record_invocation(record)
    built = paths = elsewhere = None
    if not rows:
        elsewhere = store.in_progress()
    if report and not (elsewhere and store.index().empty):  # no report before another's first row
        from bench import report as leaderboard

        md, page, built = leaderboard.write(store.root)
        paths = (md, page)
    return Outcome(spec, store, rows, wall_s, built, paths, elsewhere)


# No machine this suite runs on has more cores than this; a larger count is a typo, and torch
# would try to start that many threads.
MAX_PARALLEL = 1024


def _check_arguments(matrix: Any, results: Any, workers: Any, threads: Any, only: Any) -> None:
    """One ValueError naming the argument of :func:`run` that is of the wrong kind or range."""
    if not isinstance(matrix, str | os.PathLike | MatrixSpec):
        raise MatrixError(
            f"matrix must be a path to a YAML file or a MatrixSpec, got {type(matrix).__name__}"
        )
    if not isinstance(results, str | os.PathLike):
        raise MatrixError(f"results must be a folder path (str or Path), got {results!r}")
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_PARALLEL):  # fmt: skip
            raise MatrixError(f"{name} must be a whole number from 1 to {MAX_PARALLEL} (or None: "
                              f"split this machine's cores), got {value!r}")  # fmt: skip
    if only is not None and not (
        isinstance(only, dict) and all(isinstance(v, tuple | list) for v in only.values())
    ):
        raise MatrixError(
            f"only must map axes to tuples of patterns ({{'method': ('qdiff',)}}), got {only!r}"
        )


def invocation(
    matrix: MatrixSpec, rows: list[dict], started: datetime, wall_s: float, workers: int, threads: int,
    cached: int, executor: ExecutorSpec,
) -> dict[str, Any]:  # fmt: skip
    """What one :func:`run` cost as a whole: the figures behind the README's time and memory claims."""
    import resource

    import torch

    from bench.provenance import environment

    def peak_mib(who: int) -> float:  # ru_maxrss is KiB on Linux
        return round(resource.getrusage(who).ru_maxrss / 1024, 1)

    statuses = [r["status"] for r in {r["config_hash"]: r for r in rows}.values()]
    return {
        "matrix": matrix.name,
        "started_at": started.isoformat(),
        "wall_s": round(wall_s, 1),
        "runs": len(statuses),
        **{f"runs_{s}": statuses.count(s) for s in ("ok", "error", "skipped")},
        "executor": executor.name,
        **({"address": executor.address or "local instance"} if executor.name == "ray" else {}),
        "workers": workers,  # 0 on Ray: as many as the cluster fits
        "threads_per_worker": threads,
        "peak_rss_main_mib": peak_mib(resource.RUSAGE_SELF),
        # On Ray the runs' processes are the cluster's, not this process's children.
        "peak_rss_worker_mib": None if executor.name == "ray" else peak_mib(resource.RUSAGE_CHILDREN),
        "cache_files_at_start": cached,
        "run_devices": sorted({r["device"] for r in rows}),
        "run_nodes": sorted({r.get("node") or r.get("host") or "" for r in rows}),
        **environment(torch.device("cpu")),
    }
