"""Runs a matrix on Ray: a laptop, a multi-node cluster, KubeRay or Slurm, with the same rows.

- **One task per run**, asking for what the run needs (:func:`resources`): a GPU for a CUDA run,
  CPU threads and memory otherwise. A run's prerequisites (:func:`bench.runner.dependencies`:
  its FP reference, the checkpoints it refines) are passed to its task as object refs, so Ray
  starts it the moment they finish, and independent runs never wait for each other.
- **One shared cache.** FP samples, calibration inputs and checkpoints go through the cache
  folder (``QDIFF_BENCH_CACHE``), which every node must mount at the same path (NFS, a
  ReadWriteMany volume on Kubernetes); :mod:`bench.cache` builds each entry once cluster-wide
  and checks every entry it reads. A task on a node that does not see the driver's cache, or
  that runs other code than the driver (:func:`bench.provenance.all_code_hash`), refuses to run and
  says which.
- **One writer.** Rows (and preview grids) travel back as task results; only the driver writes
  them, atomically, so the store is the same as a local run's, apart from timing and placement
  (the ``host`` and ``node`` columns name where each run ran, beside its ``device``).
- **Faults.** A task whose worker process or node dies is retried up to ``retries`` times, then
  becomes an error row; the other runs go on. Ctrl-C cancels the runs not yet started and
  keeps the finished ones; a killed driver leaves no partial rows, and ``--resume`` continues.

Ray is an optional dependency: ``pip install 'qdiff-bench[ray]'``. Ray 2.60 clusters started
with ``ray start`` require token authentication: a driver joining one needs
``RAY_AUTH_MODE=token`` and the cluster's token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.errors import ClusterError
from bench.spec import ExecutorSpec

RAY_MISSING = (
    "--executor ray needs Ray, an optional extra: pip install 'qdiff-bench[ray]' (in a checkout: "
    "pip install -e '.[ray]')"
)
# A CPU run's memory request when none is given: the embedded matrices' runs peaked at 1.2 GiB
# (default, conditional) to 2.2 GiB (perf-cpu's int8 backends) resident, in worker processes.
DEFAULT_CPU_MEMORY_GIB = 2.5
STATUS_EVERY_S = 30.0  # seconds between two cluster status lines
# Variables the runs read (cache and results folders, offline hub, Triton's interpreter), passed
# from the driver to every task.
FORWARDED_ENV = ("QDIFF_", "HF_", "TRITON_", "TORCH_HOME", "XDG_CACHE_HOME")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


def resources(spec, threads: int, memory_gib: float | None, cluster_has_gpus: bool) -> dict[str, Any]:
    """The Ray resource request of one run: one GPU (and a CPU to drive it) for a run on CUDA,
    ``threads`` CPUs otherwise; ``memory_gib`` reserved (None: :data:`DEFAULT_CPU_MEMORY_GIB`
    for a CPU run, nothing for a GPU run, whose GPU is what it waits for)."""
    device = spec.sampling.device
    gpu = device == "cuda" or (device == "auto" and cluster_has_gpus)
    need: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": threads}
    memory = memory_gib if memory_gib is not None else None if gpu else DEFAULT_CPU_MEMORY_GIB
    if memory:
        need["memory"] = int(memory * 2**30)
    return need


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every task receives from the driver: what to check and what to stamp on its rows."""

    code: str  # the driver's code hash
    git_sha: str
    cache: str  # the driver's cache folder, and a marker file in it that only a sharer sees
    marker: str
    env: dict[str, str]
    threads: int
    board: Any  # the ProgressBoard actor


class ProgressBoard:
    """A Ray actor (no CPU) where tasks check in when they start, so that the driver can tell
    running runs from queued ones (its status line, and what Ctrl-C cancels)."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[str, float]] = {}

    def start(self, run: str, node: str) -> None:
        self.started[run] = (node, time.time())

    def running(self) -> dict[str, tuple[str, float]]:
        return dict(self.started)


Outcome = tuple[list[dict], dict[str, bytes]]  # a run's rows and its preview PNGs by file name


def qdiff_run(fn, spec, context: _Context, *_prerequisites) -> tuple[Outcome, None]:
    """The Ray task of one run: its rows (stamped with the node) and preview PNGs by file name;
    and a token that the runs needing this one wait for. (``_prerequisites`` are those runs'
    tokens: Ray starts this task once they exist.)"""
    import ray
    import torch
    from threadpoolctl import threadpool_limits

    from bench.runner import RunTask, failure_rows

    os.environ.update(context.env)
    runtime = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()} {runtime.get_node_id()[:12]}"
    context.board.start.remote(spec.hash, node)
    torch.set_num_threads(context.threads)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(context.threads):
        problem = _problem_here(context, node)
        if problem:
            rows = failure_rows(spec, getattr(fn, "matrix", ""), "error", problem)
        else:  # previews come back with the rows: the driver's results folder may not be here
            here = isinstance(fn, RunTask) and fn.previews is not None
            rows = (dataclasses.replace(fn, previews=Path(tmp)) if here else fn)(spec)
        pictures = {p.name: p.read_bytes() for p in Path(tmp).glob("*.png")}
    stamp = {"node": node, **({} if problem else {"git_sha": context.git_sha})}
    return ([{**r, **stamp} for r in rows], pictures), None


def _problem_here(context: _Context, node: str) -> str | None:
    """Why this node must not run the matrix's runs (other code, another cache), or None."""
    from bench.cache import cache_dir
    from bench.provenance import all_code_hash

    if all_code_hash() != context.code:
        return (
            f"node {node} runs other code than the driver (code hash {all_code_hash()}, driver "
            f"{context.code}): install the driver's qdiff-bench commit on every node"
        )
    if not (cache_dir() / ".cluster" / context.marker).is_file():
        return (
            f"node {node} does not see the driver's cache folder {context.cache}: mount one shared "
            "folder at that path on every node (or point QDIFF_BENCH_CACHE at one)"
        )
    return None


Log = Callable[[str], None]


# Where Ray warns, at every new local instance, that it enabled token authentication.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet_logger(name: str):
    """``name``'s warnings dropped for the block (errors still shown)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# Seconds to wait for a cluster's port to accept a connection. ``ray.init`` itself retries an
# address where nothing listens for minutes, printing its GCS client's retries.
CONNECT_TIMEOUT_S = 10


def _probe(address: str) -> None:
    """Raise ClusterError at once if nothing accepts connections at ``address`` (``host:port``
    or ``ray://host:port``); ``auto`` and other forms are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"nothing accepts connections at {address} ({reason}, waited up to {CONNECT_TIMEOUT_S} s); "
            "start the cluster there (`ray start --head`) or pass its address: --address host:6379, "
            "ray://host:10001 or auto"
        ) from None


class RayExecutor:
    """One Ray task per run (see the module docstring); ``threads`` torch threads per CPU run."""

    def __init__(self, options: ExecutorSpec, threads: int, log: Log = print) -> None:
        self.options, self.threads, self.log = options, threads, log

    def map(self, fn, specs: Sequence, needs: dict[str, tuple[str, ...]]) -> Iterator[tuple[Any, Any]]:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            self._connect(ray)
        marker = self._mark_cache()
        try:
            yield from self._run(ray, fn, specs, needs, marker)
        finally:
            marker.unlink(missing_ok=True)
            if started_here:
                ray.shutdown()

    def _connect(self, ray) -> None:
        env = _forwarded_env()
        kwargs = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
        try:
            if self.options.address is None:
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                # A new local instance gets Ray's default, token authentication, without Ray's
                # warning that it did so (setting RAY_AUTH_MODE here instead would come too late
                # for the configuration Ray read at import).
                with _quiet_logger(TOKEN_NOTICE_LOGGER):
                    info = ray.init(
                        address="local", num_cpus=cpus, include_dashboard=self.options.dashboard, **kwargs
                    )
            else:
                _probe(self.options.address)
                info = ray.init(address=self.options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if _auth_error(exc):
                raise ClusterError(
                    f"Ray at {self.options.address} requires token authentication: export "
                    "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(
                f"cannot start Ray at {self.options.address or 'this machine'} ({first}); check the "
                "address (auto: the cluster started here with `ray start`; ray://host:10001) and that "
                "the cluster runs the same Ray version"
            ) from None
        url = getattr(info, "dashboard_url", None)
        where = "a local Ray instance" if self.options.address is None else f"Ray at {self.options.address}"
        self.log(f"running on {where}" + (f"; dashboard: http://{url}" if url else ""))

    def _mark_cache(self) -> Path:
        from bench.cache import cache_dir

        marker = cache_dir() / ".cluster" / uuid.uuid4().hex
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"driver pid {os.getpid()}\n")
        return marker

    def _run(self, ray, fn, specs, needs, marker: Path) -> Iterator[tuple[Any, Any]]:
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from bench.cache import cache_dir
        from bench.provenance import all_code_hash, git_sha
        from bench.runner import STOP, ordered

        # The board lives on the driver's node: a worker node lost mid-run must not take it along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        board = ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()

        def started() -> dict[str, tuple[str, float]]:
            try:
                return ray.get(board.running.remote(), timeout=10)
            except RayError:  # the board is gone (its node was lost): status without it
                return {}

        env = {**_forwarded_env(), "QDIFF_BENCH_CACHE": str(cache_dir())}
        context = _Context(
            all_code_hash(), git_sha(), str(cache_dir()), marker.name, env, self.threads, board
        )
        task = ray.remote(num_returns=2)(qdiff_run)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        tokens: dict[str, Any] = {}
        pending: dict[Any, Any] = {}  # result ref -> spec
        waited: dict[str, Sequence[str]] = {}  # run -> the runs its task was submitted after

        def submit(spec, after: Sequence[str]) -> None:
            waited[spec.hash] = after
            options = resources(spec, self.threads, self.options.memory_gib, gpus)
            result, token = task.options(
                name=spec.label, max_retries=self.options.retries, retry_exceptions=False, **options
            ).remote(fn, spec, context, *(tokens[h] for h in after))
            tokens[spec.hash] = token
            pending[result] = spec

        for spec in ordered(specs, needs):
            submit(spec, needs.get(spec.hash, ()))
        status = _Status(len(specs), self.log)
        cancelled = False
        try:
            while pending:
                if STOP.level and not cancelled:  # Ctrl-C: cancel what has not started
                    running = started()
                    for ref, spec in pending.items():
                        if spec.hash not in running:
                            ray.cancel(ref)
                    cancelled = True
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    spec = pending.pop(ref)
                    try:
                        rows, pictures = ray.get(ref)
                    except TaskCancelledError:
                        status.cancelled += 1
                        continue  # no rows: the run resumes next time
                    except RayError as exc:
                        if any(_failed(ray, tokens[h]) for h in waited[spec.hash]):
                            submit(spec, ())  # only its prerequisite died: run it without
                            continue
                        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause else exc
                        status.lost()
                        yield spec, cause
                        continue
                    _save_pictures(fn, pictures, self.log)
                    status.finished(rows)
                    yield spec, rows
                left = {s.hash for s in pending.values()}
                status.maybe_report(started, left)
        finally:
            for ref in pending:  # abandoned (a second Ctrl-C, SIGTERM, the driver's error)
                ray.cancel(ref, force=True)


def _auth_error(exc: BaseException | None) -> bool:
    """Whether a failed connection was refused for want of Ray's authentication token (Ray
    reports it as text inside the ConnectionError's cause)."""
    while exc is not None:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _failed(ray, ref) -> bool:
    """Whether a prerequisite's token holds an error (its run was lost)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
    except Exception:
        return True
    return False


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def _save_pictures(fn, pictures: dict[str, bytes], log: Log) -> None:
    folder = getattr(fn, "previews", None)
    if folder is None:
        return
    from bench.fsio import atomic_path

    for name, data in pictures.items():
        try:
            with atomic_path(Path(folder) / name) as tmp:
                tmp.write_bytes(data)
        except OSError as exc:  # a picture for eyeballing: its loss must not cost the run's rows
            log(f"preview {Path(folder) / name} not written ({exc.strerror or exc})")


class _Status:
    """The cluster-wide progress line: done / failed / running / queued and an ETA, every
    :data:`STATUS_EVERY_S` seconds."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log = total, log
        self.done = self.failed = self.cancelled = 0
        self.durations: list[float] = []
        self.last = time.monotonic()

    def finished(self, rows: list[dict]) -> None:
        self.done += 1
        self.failed += any(r["status"] == "error" for r in rows)
        self.durations.append(float(rows[0].get("duration_s") or 0.0))

    def lost(self) -> None:
        self.done += 1
        self.failed += 1

    def maybe_report(self, started: Callable[[], dict], pending: set[str]) -> None:
        if not pending or time.monotonic() - self.last < STATUS_EVERY_S:
            return
        self.last = time.monotonic()
        running = {h: v for h, v in started().items() if h in pending}
        now = time.time()
        nodes = len({node for node, _ in running.values()})
        queued = len(pending) - len(running)
        line = (
            f"cluster: {self.done}/{self.total} done ({self.failed} failed), "
            f"{len(running)} running on {nodes} node(s), {queued} queued"
        )
        if self.durations and running:
            mean = sum(self.durations) / len(self.durations)
            # The runs in flight finish in about a mean run's time less what they have done;
            # the queued ones follow, as many at once as run now.
            left = sum(max(mean - (now - t), 0.0) for _, t in running.values()) / len(running)
            eta = left + mean * queued / len(running)
            line += f"; ETA ~{eta / 60:.0f} min" if eta >= 90 else f"; ETA ~{eta:.0f} s"
        self.log(line)
