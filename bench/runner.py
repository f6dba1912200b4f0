"""The runner: executes a matrix's runs, each isolated, and appends their rows to the store.

:func:`execute` is the whole of one run and a pure function of its :class:`RunSpec`: everything
runs share (FP samples, calibration data, quantized checkpoints) goes through the on-disk cache
by content hash, so every executor (in-process, a pool of worker processes, or one Ray task per
run) gives the same rows. An in-process memo only saves reloading the model between consecutive
runs.

Every quantized run samples from exactly the same initial noise, prompts and DDIM schedule as
its FP reference, so differences in the metrics come from quantization alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import multiprocessing
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

import qdiff
from bench.cache import cached_module, cached_tensors
from bench.errors import AvailabilityError, StoreError
from bench.images import save_grid
from bench.metrics.cost import PeakWindow, ready
from bench.metrics.quality import EvalContext
from bench.progress import Tracker
from bench.provenance import code_hash, config_hash, environment, model_hash
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import Bits, MatrixSpec, RunSpec, resolve_device
from bench.store import ResultStore

Log = Callable[[str], None]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RunFn = Callable[[RunSpec], list[dict[str, Any]]]
Needs = dict[str, tuple[str, ...]]  # run hash -> hashes of the runs that must finish before it starts


Outcome = list[dict[str, Any]] | Exception  # a run's rows, or why its worker could not return them


@dataclasses.dataclass(frozen=True)
class RunTask:
    """What every run of a matrix executes: :func:`execute` with the matrix's name, the folder
    for preview grids and the progress mode. A picklable value, so that executors can ship it
    to worker processes and cluster nodes (which may write ``previews`` elsewhere)."""

    matrix: str
    previews: Path | None = None
    progress: str | None = None

    def __call__(self, spec: RunSpec) -> list[dict[str, Any]]:
        return execute(spec, self.matrix, self.previews, self.progress)


class Executor(Protocol):
    """Runs ``fn`` on each spec and yields ``(spec, outcome)`` as runs finish, in any order.

    ``needs`` maps a run's hash to the runs (among ``specs``) that must finish before it starts
    (:func:`dependencies`); a run whose prerequisite failed still runs. ``fn`` never raises for
    a failed run (it returns error rows); an executor yields an exception only when the run's
    worker itself was lost.
    """

    def map(self, fn: RunFn, specs: Sequence[RunSpec], needs: Needs) -> Iterator[tuple[RunSpec, Outcome]]: ...


class LocalExecutor:
    """Runs one spec after another in this process."""

    def map(self, fn: RunFn, specs: Sequence[RunSpec], needs: Needs) -> Iterator[tuple[RunSpec, Outcome]]:
        for spec in ordered(specs, needs):
            if STOP.level:  # Ctrl-C during the previous run: start no more
                return
            yield spec, fn(spec)


class ProcessExecutor:
    """Runs specs in ``workers`` fresh processes with ``threads`` torch threads each.

    On a CPU, small models leave threads idle (two threads ran the embedded model's
    reconstruction only 1.4× faster than one), so separate runs side by side use the cores
    better. Every run gets the same thread count, even when fewer runs than workers are ready,
    so that latencies in one matrix are measured alike. A run starts as soon as the runs it
    needs have finished, not when a whole wave has.

    A worker that dies (killed, out of memory) breaks the whole pool, so every run then in
    flight fails with it; those runs are retried one at a time in a fresh pool, and only the one
    that dies again alone becomes an error. After a Ctrl-C (:data:`STOP`) no new run starts and
    the in-flight ones finish (their rows are kept); a second one, or SIGTERM, kills them.
    """

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = workers
        self.threads = threads

    def map(self, fn: RunFn, specs: Sequence[RunSpec], needs: Needs) -> Iterator[tuple[RunSpec, Outcome]]:
        suspects: list[RunSpec] = []
        yield from self._pool(fn, list(specs), needs, max(1, min(self.workers, len(specs))), suspects)
        for spec in list(suspects):  # alone, a run that kills its worker is the culprit
            if STOP.level:
                return
            yield from self._pool(fn, [spec], {}, 1, None)

    def _pool(self, fn, specs, needs, workers, suspects) -> Iterator[tuple[RunSpec, Outcome]]:
        context = multiprocessing.get_context("spawn")  # no forked torch/CUDA state
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(self.threads,)
        )
        waiting = list(ordered(specs, needs))
        settled: set[str] = set()  # finished, or parked as a suspect: its dependants may start
        futures: dict = {}
        pending: set = set()
        try:
            while waiting or pending:
                if STOP.level:  # Ctrl-C: nothing new starts; what runs finishes and is kept
                    waiting = []
                    pending -= {f for f in pending if f.cancel()}
                for spec in [s for s in waiting if settled.issuperset(needs.get(s.hash, ()))]:
                    waiting.remove(spec)
                    try:
                        with STOP.deferred():  # may start a worker: see StopRequest.deferred
                            future = pool.submit(fn, spec)
                    except BrokenProcessPool as exc:  # a worker died: the pool takes no more
                        settled.add(spec.hash)
                        yield from _lost(spec, exc, suspects)
                        continue
                    futures[future] = spec
                    pending.add(future)
                if not pending:
                    continue
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = futures[future]
                    settled.add(spec.hash)
                    try:
                        yield spec, future.result()
                    except BrokenProcessPool as exc:
                        yield from _lost(spec, exc, suspects)
        finally:
            if STOP.level >= 2 or pending:  # abandoned (second Ctrl-C, SIGTERM, or an error here)
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.kill()
            pool.shutdown(wait=True, cancel_futures=True)


def _lost(spec: RunSpec, exc: Exception, suspects: list[RunSpec] | None) -> Iterator[tuple[RunSpec, Outcome]]:
    """A run whose pool broke: parked among ``suspects`` for a retry alone, or (retried
    already: ``suspects`` is None) yielded as lost."""
    if suspects is None:
        yield spec, exc
    else:
        suspects.append(spec)


class StopRequest:
    """What the user asked by signal: 0 nothing, 1 stop after the runs in flight (Ctrl-C), 2 stop
    now (a second Ctrl-C, or SIGTERM). :func:`handle_signal` sets it; executors poll it."""

    level = 0
    _deferring = False
    _pending: BaseException | None = None

    def reset(self) -> None:
        self.level, self._deferring, self._pending = 0, False, None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a signal's exception until the block ends. Submitting to the pool may start a
        worker, and spawning writes the worker's start-up data down a pipe: an exception raised
        in the middle leaves the worker reading a half-written pipe, and it dies printing a
        traceback ("Ran out of input") into the user's terminal."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending

    def stop(self, exc: BaseException) -> None:
        """Raise ``exc`` now, or when the deferred block ends."""
        if self._deferring:
            self._pending = exc
            return
        raise exc


STOP = StopRequest()


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop now (in-flight runs are abandoned and resume next time)."""


def handle_signal(signum: int, _frame) -> None:
    """SIGINT once: finish what runs, start nothing new. Again, or SIGTERM: stop now."""
    if signum == signal.SIGTERM:
        STOP.level = 2
        STOP.stop(Terminated())
        return
    STOP.level += 1
    if STOP.level >= 2:
        STOP.stop(KeyboardInterrupt())
        return
    print("\ninterrupted: finishing the run(s) in flight (their rows are kept) and starting no more; "
          "Ctrl-C again to abandon them", file=sys.stderr, flush=True)  # fmt: skip


def _init_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    # numpy's BLAS too (the metrics' bootstrap): workers side by side that each spin up one BLAS
    # thread per core made 64×64 eigendecompositions 20× slower.
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    if sys.platform == "linux":
        # Die with the parent: a killed matrix must not leave runs computing in the background.
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    state: str  # "todo", "partial" (some metrics missing), "done", or "forced"


def plan(
    matrix: MatrixSpec,
    store: ResultStore,
    only: dict[str, tuple[str, ...]] | None = None,
    force: bool = False,
) -> list[PlannedRun]:
    """The matrix's runs (filtered by ``only``) and whether each still has work to do."""
    done = store.completed()
    out = []
    for spec in matrix.expand():
        if only and not spec.matches(only):
            continue
        have = done.get(spec.hash, set())
        if force:
            state = "forced"
        elif set(spec.metrics) <= have:  # expansion gives every run at least one metric
            state = "done"
        else:
            state = "partial" if have else "todo"
        out.append(PlannedRun(spec, state))
    return out


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
    todo = []
    for spec in (p.spec for p in plan(matrix, store, only, force) if p.state != "done"):
        holder = store.claim(spec.hash)
        if holder is None:
            todo.append(spec)
        else:  # another runner on this results root computes it
            log(f"{spec.label}: being run by {holder}; skipped here")
    executor = executor or LocalExecutor()
    # Bars where runs share this process's terminal; throttled lines from worker processes.
    run_progress = None if not progress else "bar" if isinstance(executor, LocalExecutor) else "lines"
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


def dependencies(specs: Sequence[RunSpec]) -> Needs:
    """For each run, the runs among ``specs`` that must finish before it starts (an executor
    starts every other run as soon as it can): a quantized run waits for its FP reference, whose
    cached samples it pairs with, and a run of a method with ``bases`` for its bases' runs (same
    model and seeds), whose checkpoints it refines. The order only saves work: a run whose
    prerequisite failed builds what it needs itself."""
    hashes = {s.hash for s in specs}
    cells: dict[tuple, list[str]] = {}
    for s in specs:
        cells.setdefault((s.model, s.method, s.w_bits, s.a_bits, s.seed, s.calib_seed), []).append(s.hash)
    needs: Needs = {}
    for s in specs:
        if s.is_fp:
            needs[s.hash] = ()
            continue
        reference = s.fp_reference().hash
        after = [reference] if reference in hashes else []
        for base, b in METHODS.get(s.method).bases(Bits(s.w_bits, s.a_bits)):
            after += cells.get((s.model, base, b.w, b.a, s.seed, s.calib_seed), [])
        needs[s.hash] = tuple(dict.fromkeys(after))
    return needs


def waves(specs: Sequence[RunSpec], needs: Needs | None = None) -> list[list[RunSpec]]:
    """Runs in dependency order, as groups whose members need only runs of earlier groups:
    FP references first, then quantized runs, then runs that refine their checkpoints."""
    needs = dependencies(specs) if needs is None else needs

    @cache
    def depth(h: str) -> int:
        return 1 + max((depth(d) for d in needs.get(h, ())), default=-1)

    groups: dict[int, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(depth(spec.hash), []).append(spec)
    return [groups[level] for level in sorted(groups)]


def ordered(specs: Sequence[RunSpec], needs: Needs) -> list[RunSpec]:
    """``specs`` with every run after the runs it needs (otherwise in their given order)."""
    return [spec for wave in waves(specs, needs) for spec in wave]


def _summary(spec: RunSpec, rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            return f"{spec.label}: {r['status'].upper()} {r['error']}"
        parts.append(f"{r['metric']}={r['value']:.4g}")
    return f"{spec.label}: {', '.join(parts)} ({rows[0]['duration_s']:.0f}s)"


def execute(
    spec: RunSpec, matrix: str, previews: Path | None = None, progress: str | None = None
) -> list[dict[str, Any]]:
    """One run: its rows, one per metric. Failures become ``error`` rows (``skipped`` when the
    run cannot happen on this machine) with the message; this function does not raise for them.
    ``progress`` is a :mod:`bench.progress` mode (``"bar"``, ``"lines"``) or None.
    """
    t0 = time.perf_counter()
    base = _base(spec, matrix, datetime.now(UTC))
    device = torch.device("cpu")
    try:
        device = resolve_device(spec.sampling.device)
        rows = _evaluate(spec, base, previews, Tracker(progress, spec.label))
        duration = round(time.perf_counter() - t0, 3)
        return [{**environment(device), **row, "duration_s": duration} for row in rows]
    except Exception as exc:  # one failed run must not stop the matrix (CUDA OOM included)
        return failure_rows(spec, matrix, *_failure(exc), base, device, time.perf_counter() - t0)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _failure(exc: Exception) -> tuple[str, str]:
    """``(status, message)`` of an exception: ``skipped`` when this machine lacks what it needs,
    else ``error`` (whose traceback goes to the log)."""
    if isinstance(exc, AvailabilityError):
        return "skipped", str(exc)
    traceback.print_exc(limit=4)
    return "error", f"{type(exc).__name__}: {exc}"


def failure_rows(
    spec: RunSpec,
    matrix: str,
    status: str,
    message: str,
    base: dict[str, Any] | None = None,
    device: torch.device | None = None,
    seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """One ``error``/``skipped`` row per requested metric, so the failure shows in every cell."""
    base = base or _base(spec, matrix, datetime.now(UTC))
    base = {**base, **environment(device or torch.device("cpu")), "status": status, "error": message}
    return [_metric_row(base, METRICS.get(m), None, duration_s=round(seconds, 3)) for m in spec.metrics]


def _base(spec: RunSpec, matrix: str, started: datetime) -> dict[str, Any]:
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    reference = None if spec.is_fp else spec.fp_reference().hash
    return {"run_id": run_id, "matrix": matrix, **spec.fields(), "reference_hash": reference,
            "started_at": started.isoformat()}  # fmt: skip


def _metric_row(base: dict[str, Any], metric, value: float | None, **extra: Any) -> dict[str, Any]:
    row = {
        "status": "ok",
        "error": None,
        **base,
        "metric": metric.name,
        "value": value,
        "unit": metric.unit,
        "higher_is_better": metric.higher_is_better,
        "kind": metric.kind,
    }
    return {**row, **extra}


@lru_cache(maxsize=2)
def _load(model: str, model_args: tuple, sampling) -> tuple[Any, torch.nn.Module, str]:
    """Adapter, FP denoiser and the denoiser's content hash (memoised per process)."""
    adapter = MODELS.get(model)(sampling, **dict(model_args))
    fp = adapter.denoiser().eval().requires_grad_(False)
    return adapter, fp, model_hash(fp)


def _evaluate(
    spec: RunSpec, base: dict[str, Any], previews: Path | None, progress: Tracker
) -> list[dict[str, Any]]:
    adapter, fp32, fp_id = _load(spec.model, spec.model_args, spec.sampling)
    fp = fp32
    code = code_hash()  # a code change never reuses a stale checkpoint or sample set
    n, seed = spec.sampling.samples, spec.seed
    # Cost-only runs (step latency, weight bytes) generate no images: a large random-weight
    # model's cost needs neither a sampler run nor a decoder.
    sampled = any(METRICS.get(m).needs_images for m in spec.metrics)
    fp_key = config_hash("fp-samples", code, fp_id, adapter.identity(), n, seed)

    def fp_samples():
        if not sampled:
            return None, None
        return _timed_samples(
            fp_key, n, lambda: adapter.sample(fp, n, seed, progress=progress.phase("FP sampling", "steps"))
        )

    dtype = getattr(torch, spec.sampling.dtype)
    if dtype != torch.float32 and (spec.is_fp or sampled):
        fp = copy.deepcopy(fp32).to(dtype)  # evaluated in ``dtype``; quantization calibrates float32
    if spec.is_fp:
        fp_images, fp_sample_s = fp_samples()
        ctx = EvalContext(spec, adapter, fp_images, None, make_denoiser=lambda: fp)
        extra = {"sample_s": fp_sample_s}
    else:
        fp_images = fp_samples()[0]
        ckpt, cached = _quantized(adapter, fp32, fp_id, spec, code, progress)
        key = config_hash("samples", code, fp_id, ckpt.key, spec.budget.backend, adapter.identity(), n, seed)

        method = METHODS.get(spec.method)

        @cache
        def deployable() -> torch.nn.Module:
            deployed = method.deploy(ckpt.model.to(adapter.device), spec.budget.backend)
            # Cast only when asked: diffusers warns on every ``.to(dtype)`` of a UNet.
            return deployed if dtype == torch.float32 else deployed.to(dtype)

        images = sample_s = None
        if sampled:
            steps = progress.phase("sampling", "steps")
            sample = lambda: adapter.sample(deployable(), n, seed, progress=steps)  # noqa: E731
            ready_model = lambda: ready(deployable(), adapter, spec)  # noqa: E731
            images, sample_s = _timed_samples(key, n, sample, before=ready_model)
        # The simulation the deployment is compared with (deploy_sqnr): qdiff's methods only. The
        # quantized model itself, not ``convert(..., "fake")``, whose precomputed fake-quantized
        # weights would be a third float copy of a real-size model (SDXL: 9.6 GiB).
        simulated = None if method.backend else (lambda: ckpt.model.to(adapter.device))
        ctx = EvalContext(spec, adapter, images, fp_images, deployable, ckpt.quantize_s, cached, simulated,
                          quantize_peak_mib=ckpt.quantize_peak_mib)  # fmt: skip
        extra = {"qconfig": ckpt.qconfig, "weights_from": ckpt.weights_from, "sample_s": sample_s,
                 "recon": ckpt.report}  # fmt: skip
    if previews is not None and ctx.images is not None:
        count = 64 if ctx.images.shape[-1] < 64 else 8
        on = "" if spec.real_backend is None else f"-{spec.real_backend}"
        calib = "" if spec.is_fp else f"c{spec.calib_seed}"
        name = f"{spec.model}-{spec.method}{on}-{spec.bits_label}-s{seed}{calib}.png"
        try:
            save_grid(ctx.images[:count], previews / name)
        except OSError as exc:  # a picture for eyeballing: its loss must not cost the run's rows
            print(
                f"{spec.label}: preview {previews / name} not written ({exc.strerror or exc})",
                file=sys.stderr,
            )
    rows = []
    for name in spec.metrics:
        metric = METRICS.get(name)
        t = time.perf_counter()
        try:
            measured = metric(ctx)
        except Exception as exc:  # one metric's failure leaves the run's other metrics standing
            status, message = _failure(exc)
            rows.append(_metric_row({**base, "status": status, "error": message}, metric, None, **extra))
            continue
        if measured is not None:
            # Metrics sharing work (FID and KID) charge it to the first of them.
            timing = {"metric_s": round(time.perf_counter() - t, 3)}
            rows.append(_metric_row(base, metric, measured.value, **{**extra, **timing, **measured.extra}))
    if not rows:
        raise ValueError(f"none of the metrics {', '.join(spec.metrics)} applies to {spec.label}")
    return rows


def _timed_samples(
    key: str, n: int, sample: Callable[[], torch.Tensor], before: Callable[[], object] | None = None
) -> tuple[torch.Tensor, float | None]:
    """Samples from the cache or ``sample()``, and the seconds sampling took (None if cached).
    ``before()`` runs first when sampling is needed, outside the timing (building the model)."""
    seconds = None

    def build() -> dict[str, torch.Tensor]:
        nonlocal seconds
        if before is not None:
            before()
        t = time.perf_counter()
        images = sample()
        seconds = round(time.perf_counter() - t, 3)
        return {"images": images}

    tensors, _ = cached_tensors("samples", key, build, check=partial(_images_problem, n))
    return tensors["images"], seconds


@dataclasses.dataclass
class Checkpoint:
    """A quantized model as the runner caches and shares it.

    Args:
        model: the quantized denoiser (what ``Method.deploy`` deploys).
        key: its cache key (the method, its configuration, the FP weights and the code).
        qconfig: the method's configuration, as the rows' ``qconfig`` column.
        quantize_s: seconds the method took, its bases' included.
        quantize_peak_mib: peak memory of quantizing (MiB): the FP model once plus everything
            the method held at its peak (its copies, calibration inputs, reconstruction state);
            the largest of its bases' and its own for a refining method; None if unmeasured.
        report: what the method reported about its work (the rows' ``recon`` column), or None.
        weights_from: for a method with bases, the ``method bits`` it refined (``+``-joined).
    """

    model: torch.nn.Module
    key: str
    qconfig: dict[str, Any]
    quantize_s: float
    report: dict[str, Any] | None = None
    weights_from: str | None = None
    quantize_peak_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _quantized(
    adapter, fp, fp_id: str, spec: RunSpec, code: str, progress: Tracker
) -> tuple[Checkpoint, bool]:
    """The run's quantized checkpoint, from the cache or built: quantized by the method, or,
    for a method with ``bases``, refined from their checkpoints (built or cached)."""
    method = METHODS.get(spec.method)
    bits = Bits(spec.w_bits, spec.a_bits)
    config = method.configure(bits, spec.budget)
    # The calibration trajectories depend on how the model is sampled (steps, guidance, ...), so
    # the adapter's identity is part of the key, as it is of the calibration data's.
    key = config_hash("checkpoint", code, fp_id, adapter.identity(), spec.method, config.to_dict())

    def calibration(calib: qdiff.CalibConfig) -> qdiff.CalibData:
        return _calibration(adapter, fp, fp_id, calib, code, progress).to(adapter.device)

    def build() -> Checkpoint:
        if method.bases(bits):
            return _refined(adapter, fp, fp_id, spec, code, progress, method, config, calibration, key)
        calib = getattr(config, "calib", None)
        if isinstance(calib, qdiff.CalibConfig):
            calibration(calib)  # generated (FP sampling, shared by methods) outside the window
        units = progress.phase(f"quantize {spec.method} {spec.bits_label}", "units")
        t = time.perf_counter()
        with PeakWindow(adapter.device) as window:
            model, report = method.quantize(fp, config, calibration, progress=units)
        seconds = time.perf_counter() - t
        return Checkpoint(
            model, key, config.to_dict(), seconds, report, quantize_peak_mib=_quantize_peak(fp, window)
        )

    if not method.checkpointable:
        return build(), False
    stored, cached = cached_module("checkpoints", key, lambda: build().to_dict(), check=_checkpoint_problem)
    # Its key is the one asked for (what the samples' key derives from), never the file's.
    return Checkpoint(**{**stored, "key": key}), cached


def _checkpoint_problem(stored: dict) -> str | None:
    """What makes a loaded dict not a :class:`Checkpoint` (a valid torch file of another kind)."""
    fields = {f.name for f in dataclasses.fields(Checkpoint)}
    if set(stored) != fields or not isinstance(stored.get("model"), torch.nn.Module):
        return f"not a checkpoint: expected the fields {', '.join(sorted(fields))}"
    return None


def _refined(adapter, fp, fp_id, spec, code, progress, method, config, calibration, key) -> Checkpoint:
    """The model of a method with ``bases``: their checkpoints (cached or built), refined. Its
    quantize time is theirs plus the refinement's."""
    bases = method.bases(Bits(spec.w_bits, spec.a_bits))
    first, first_bits = bases[0]
    if METHODS.get(first).configure(first_bits, spec.budget) != config:
        raise ValueError(
            f"{spec.method} builds on {first} {first_bits.label} but their configurations differ"
        )
    models, seconds, sources, base_peaks = [], 0.0, [], []
    for name, bits in bases:
        base_spec = dataclasses.replace(spec, method=name, w_bits=bits.w, a_bits=bits.a)
        base, _ = _quantized(adapter, fp, fp_id, base_spec, code, progress)
        models.append(copy.deepcopy(base.model))
        seconds += base.quantize_s
        base_peaks.append(base.quantize_peak_mib)
        sources.append(f"{name} {base.weights_from or bits.label}")
    t = time.perf_counter()
    with PeakWindow(adapter.device) as window:
        model = method.refine(fp, models, config, calibration, adapter.scheduler().alphas_cumprod)
    seconds += time.perf_counter() - t
    peaks = [p for p in (*base_peaks, _quantize_peak(fp, window)) if p is not None]
    return Checkpoint(model, key, config.to_dict(), seconds, weights_from=" + ".join(sources),
                      quantize_peak_mib=max(peaks) if peaks else None)  # fmt: skip


def _quantize_peak(fp: torch.nn.Module, window: PeakWindow) -> float | None:
    """The FP model once plus the window's working memory (MiB), or None where the platform
    cannot reset its peak."""
    if window.working_mib is None:
        return None
    return round(qdiff.resident_bytes(fp) / 2**20 + window.working_mib, 1)


def _images_problem(n: int, tensors: dict[str, torch.Tensor]) -> str | None:
    images = tensors.get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or len(images) != n:
        got = None if images is None else f"{images.dtype} {tuple(images.shape)}"
        return f"expected {n} uint8 NCHW images, found {got}"
    return None


def _calibration(
    adapter, fp, fp_id: str, calib: qdiff.CalibConfig, code: str, progress: Tracker
) -> qdiff.CalibData:
    key = config_hash("calib", code, fp_id, adapter.identity(), calib)

    def problem(t: dict[str, torch.Tensor]) -> str | None:
        # K steps × N trajectories of inputs (twice that under classifier-free guidance).
        size = len(qdiff.select_steps(calib, adapter.sampling.steps)) * calib.samples_per_timestep
        x, steps = t.get("x"), t.get("t")
        if x is None or steps is None or len(x) != len(steps) or len(x) not in (size, 2 * size):
            return f"expected {size} calibration inputs, found {None if x is None else len(x)}"
        return None if x.is_floating_point() else f"calibration inputs are {x.dtype}, not floating point"

    steps = progress.phase("calibration trajectories", "steps")
    build = lambda: adapter.calibration_data(fp, calib, steps).to_dict()  # noqa: E731
    tensors, _ = cached_tensors("calibration", key, build, check=problem)
    return qdiff.CalibData.from_dict(tensors)
