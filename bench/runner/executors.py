"""Executors: where a matrix's runs execute (this process, or a pool of worker processes; the
Ray executor is :mod:`bench.ray_executor`), and what a signal asks of them (:data:`STOP`)."""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import torch

from bench.progress import log_to_stderr
from bench.runner.plan import Needs, ordered
from bench.spec import RunSpec

PR_SET_PDEATHSIG = 1  # linux/prctl.h
RunFn = Callable[[RunSpec], list[dict[str, Any]]]

Outcome = list[dict[str, Any]] | Exception  # a run's rows, or why its worker could not return them


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
    # A worker killed by a fatal signal (SIGBUS: a mapped cache entry truncated under it) says
    # where, on stderr, before its runs become "worker died" rows.
    faulthandler.enable()
    log_to_stderr()  # its warnings wrapped as the main process's are
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
