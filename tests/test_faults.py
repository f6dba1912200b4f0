"""Fault injection: a hostile and a tampered cache, a full disk, kill -9 of the runner and of a
worker at random points, SIGINT/SIGTERM, and two runners on one results root. Each case ends by
checking the store: no lost, duplicated, corrupt or silently wrong row (values are compared with
an undisturbed run of the same matrix, which is deterministic)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_matrix

from bench.cache import cache_dir
from bench.errors import StoreError
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
METHODS = "[linear, qdiff-no-recon]"
BITS = "[W8A8]"  # with the FP run, three runs: enough to interrupt, kill and share


def quiet(_msg):
    pass


def values(store: ResultStore) -> dict[tuple[str, str], float]:
    """``(config_hash, metric) → value`` of every ok quality row (cost rows are wall-clock
    times), after checking that no run's rows were written twice."""
    rows = [r for r in store.rows() if r["status"] == "ok"]
    keys = [(r["config_hash"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "a run was written twice"
    return {(r["config_hash"], r["metric"]): r["value"] for r in rows if r["kind"] == "quality"}


@pytest.fixture(scope="module")
def reference(warm_caches):
    """The undisturbed rows of the matrix every in-process case uses (its own cache, results)."""
    return values(ResultStore(warm_caches(METHODS, BITS)[1]))


def checksum(path: Path) -> None:
    """Write the checksum that matches ``path`` now (what an attacker with cache access does)."""
    sidecar = writable(path.parent / (path.name + ".sha256"))
    sidecar.write_text(hashlib.sha256(path.read_bytes()).hexdigest())


def writable(*paths: Path) -> Path:
    """Cache entries are written read-only (bench.cache): an attacker, or a test, first makes
    them writable (a no-op for root). Returns the first path."""
    for path in paths:
        if path.exists():
            path.chmod(0o644)
    return paths[0]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The undisturbed rows of a ``qdiff-bench run`` of that matrix: every run on one torch
    thread, as in the runs the cases below disturb (other thread counts round differently)."""
    tmp = tmp_path_factory.mktemp("cli-reference")
    path = tiny_matrix(tmp, methods=METHODS, bits=BITS)
    proc = cli([path, "--results", str(tmp / "results"), "--workers", "1"], tmp / "cache")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return values(ResultStore(tmp / "results" / "tiny"))


def cli(args: list[str], cache: Path) -> subprocess.Popen:
    """``qdiff-bench run`` in a new process group, every run on one torch thread."""
    env = {**os.environ, "QDIFF_BENCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", *args, "--threads", "1", "--no-progress", "--no-report"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def test_a_hostile_checkpoint_never_runs_and_is_rebuilt(tmp_path, reference, warm_cache, caplog):
    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    warm_cache(METHODS, BITS)
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for ckpt in (cache_dir() / "checkpoints").glob("*.pt"):
        torch.save({"model": Hostile()}, writable(ckpt))  # what torch.load(weights_only=False) would run
        checksum(ckpt)
    for samples in (cache_dir() / "samples").glob("*.safetensors"):
        samples.unlink()  # the quantized samples must be made again, from the checkpoints
    run_matrix(load_matrix(path), tmp_path / "b", progress=False, log=quiet, force=True)
    assert not marker.exists(), "a cached checkpoint executed code"
    assert "is not usable" in caplog.text and "checkpoint names posix.system" in caplog.text
    assert values(ResultStore(tmp_path / "b" / "tiny")) == reference


def test_tampered_samples_are_detected_and_rebuilt(tmp_path, reference, warm_cache, caplog):
    from safetensors.torch import load_file, save_file

    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    warm_cache(METHODS, BITS)
    files = sorted((cache_dir() / "samples").glob("*.safetensors"))
    flipped, truncated = writable(*files[:2]), writable(files[1])
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the image data
    flipped.write_bytes(bytes(data))
    images = load_file(str(truncated))["images"][:3]  # a valid file with 3 of the images...
    save_file({"images": images}, str(truncated), metadata={"key": truncated.stem})  # its own key
    checksum(truncated)  # ...and a checksum that matches it
    run_matrix(load_matrix(path), tmp_path / "b", progress=False, log=quiet, force=True)
    assert (
        "do not match the checksum" in caplog.text and "expected 24 uint8 NCHW images, found" in caplog.text
    )
    assert values(ResultStore(tmp_path / "b" / "tiny")) == reference


def test_a_full_disk_keeps_finished_rows_and_a_full_cache_costs_only_the_reuse(
    tmp_path, reference, monkeypatch
):
    import torch

    import bench.store

    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    # The cache's disk is full: every run still completes, uncached.
    monkeypatch.setattr("bench.cache.torch.save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")))  # fmt: skip
    real_write = bench.store.write_atomic
    calls = {"n": 0}

    def full_after_two(p, text):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(p, text)

    monkeypatch.setattr(bench.store, "write_atomic", full_after_two)
    with pytest.raises(StoreError, match=r"No space left on device.*2 run\(s\) finished before are kept"):
        run_matrix(load_matrix(path), tmp_path / "r", progress=False, log=quiet)
    store = ResultStore(tmp_path / "r" / "tiny")
    assert len({r["config_hash"] for r in store.rows()}) == 2
    monkeypatch.setattr(bench.store, "write_atomic", real_write)  # space freed: resume
    monkeypatch.setattr("bench.cache.torch.save", torch.save)
    run_matrix(load_matrix(path), tmp_path / "r", progress=False, log=quiet)
    assert values(store) == reference
    assert not list(store.runs.glob(".*.tmp")), "a partial file was left"


def test_a_report_that_cannot_be_written_leaves_the_old_one(tmp_path, monkeypatch):
    from bench.fsio import write_atomic

    target = tmp_path / "report.md"
    target.write_text("old report")

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError):
        write_atomic(target, "new report")
    monkeypatch.undo()
    assert target.read_text() == "old report" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


@pytest.mark.slow
def test_kill_9_of_the_runner_at_random_points_then_resume(tmp_path, cli_reference):
    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    results, cache = tmp_path / "results", tmp_path / "cache"
    rng = random.Random(1234)
    for _ in range(2):
        proc = cli([path, "--results", str(results), "--workers", "2"], cache)
        time.sleep(rng.uniform(4, 12))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        values(ResultStore(results / "tiny"))  # readable, nothing duplicated or partial
    proc = cli([path, "--results", str(results), "--workers", "1"], cache)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert values(ResultStore(results / "tiny")) == cli_reference


@pytest.mark.slow
def test_a_killed_worker_costs_only_a_retry(tmp_path, cli_reference):
    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    results = tmp_path / "results"
    proc = cli([path, "--results", str(results), "--workers", "2"], tmp_path / "cache")
    killed = False
    deadline = time.time() + 120
    while not killed and time.time() < deadline and proc.poll() is None:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        workers = [
            int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")
        ]
        if workers and list(ResultStore(results / "tiny").runs.glob("*.jsonl")):  # FP done, runs in flight
            os.kill(workers[0], signal.SIGKILL)
            killed = True
        time.sleep(0.5)
    assert killed, "no worker to kill"
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    store = ResultStore(results / "tiny")
    assert {r["status"] for r in store.rows()} == {"ok"}  # retried alone, not an error
    assert values(store) == cli_reference


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


def test_a_signal_while_a_worker_starts_waits_until_it_has_started():
    """SIGTERM raised inside ``pool.submit`` once cut a worker's start-up data short, and the
    worker printed a traceback ("Ran out of input") into the terminal: the runner defers the
    signal's exception to the end of the submit."""
    from bench.runner import STOP, Terminated, handle_signal

    STOP.reset()
    try:
        steps = []
        with pytest.raises(Terminated), STOP.deferred():
            handle_signal(signal.SIGTERM, None)
            steps.append("the submit finished")
        assert steps == ["the submit finished"] and STOP.level == 2
        with pytest.raises(KeyboardInterrupt):  # outside the block: at once
            handle_signal(signal.SIGINT, None)
        with STOP.deferred():  # nothing pending: nothing raised
            pass
    finally:
        STOP.reset()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly_and_resume(tmp_path, cli_reference, sig, code):
    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    results, cache = tmp_path / "results", tmp_path / "cache"
    proc = cli([path, "--results", str(results), "--workers", "2"], cache)
    deadline = time.time() + 120
    while not list((results / "tiny" / "runs").glob("*.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == code
    err = proc.stderr.read()
    assert "Traceback" not in err and (
        "interrupted:" in err if sig == signal.SIGINT else "terminated:" in err
    )
    kept = values(ResultStore(results / "tiny"))
    assert kept and all(cli_reference[k] == v for k, v in kept.items())
    proc = cli([path, "--results", str(results), "--workers", "1"], cache)
    assert proc.wait(timeout=600) == 0
    assert values(ResultStore(results / "tiny")) == cli_reference


def test_two_runners_on_one_results_root_compute_each_run_once(tmp_path, cli_reference):
    path = tiny_matrix(tmp_path, methods=METHODS, bits=BITS)
    results, cache = tmp_path / "results", tmp_path / "cache"
    a = cli([path, "--results", str(results), "--workers", "1"], cache)
    b = cli([path, "--results", str(results), "--workers", "1"], cache)
    assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0
    store = ResultStore(results / "tiny")
    files = list(store.runs.glob("*.jsonl"))
    assert len(files) == len({json.loads(f.read_text().splitlines()[0])["config_hash"] for f in files})
    assert values(store) == cli_reference
    assert "being done by pid" in a.stderr.read() + b.stderr.read()


def test_history_shows_a_newer_failure_instead_of_the_last_good_value(tmp_path):
    from helpers import row

    from bench import history

    store = ResultStore(tmp_path / "fixture")
    store.append([row("fp", "FP", "digits_fd", 14.0, started_at="2026-01-01T00:00:00", git_sha="aaaa1111")])
    good = row("qdiff", "W8A8", "digits_fd", 15.0, started_at="2026-01-01T00:00:01", git_sha="aaaa1111")
    store.append([good])
    failed = {**good, "run_id": "later", "value": None, "status": "error", "error": "RuntimeError: boom",
              "started_at": "2026-01-02T00:00:00", "git_sha": "bbbb2222"}  # fmt: skip
    store.append([failed])
    _, _, markdown = history.write(tmp_path)
    (line,) = [ln for ln in markdown.splitlines() if "| qdiff |" in ln]
    assert "15 (aaaa1111); **newest run: error at bbbb2222**" in line


def test_a_preview_that_cannot_be_written_costs_only_the_preview(tmp_path, monkeypatch, capsys):
    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bench.runner.execute.save_grid", no_space)
    path = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")
    rows = run_matrix(load_matrix(path), tmp_path / "r", progress=False, log=quiet)
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert "preview" in capsys.readouterr().err


def test_rows_are_readable_by_the_group_and_a_local_source_gets_a_local_hint(tmp_path):
    from bench.errors import AvailabilityError
    from bench.registry import MODELS
    from bench.spec import Sampling

    store = ResultStore(tmp_path)
    from helpers import row

    path = store.append([row("fp", "FP", "digits_fd", 14.0)])
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    adapter = MODELS.get("sd-1.5")(Sampling(device="cpu"), source=str(tmp_path / "no-such-dir"))
    with pytest.raises(AvailabilityError, match="is not a folder here, nor a hub id") as info:
        adapter.pipeline  # noqa: B018
    assert "huggingface-cli" not in str(info.value)


def test_cache_entries_of_every_kind_are_shared_with_the_group(tmp_path, monkeypatch):
    """Tensors (safetensors, which recreates the file it writes) and checkpoints alike: a cache
    shared between users must not hold entries only their writer can read."""
    from bench.cache import cached_module, cached_tensors

    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache"))
    cached_tensors("samples", "k", lambda: {"images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)})
    cached_module("checkpoints", "k", lambda: {"model": torch.nn.Linear(2, 2)})
    entries = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert {p.suffix for p in entries} >= {".safetensors", ".pt"}
    # Readable by the group, and read-only: a model maps its entry (see bench.cache._store).
    assert {p.stat().st_mode & 0o777 for p in entries} == {0o444 & ~_umask()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_processes_that_want_one_cache_entry_at_once_build_it_once(tmp_path, caplog):
    """Worker processes (or Ray tasks on nodes sharing the cache) asking for the same entry at
    the same time: one builds it, the others wait and load it; a dead builder's lock is taken
    over at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from helpers import build_in_process

    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=context) as pool:
        got = list(pool.map(build_in_process, [str(cache)] * 3, [str(tmp_path)] * 3))
    assert [v for v, _ in got] == [3.0, 3.0, 3.0]
    assert sorted(c for _, c in got) == [False, True, True]
    assert len(list(tmp_path.glob("built-*"))) == 1
    assert not list((cache / "test").glob("*.lock"))
    # A builder killed mid-build leaves its lock; the next process sees the holder is dead.
    for p in (cache / "test").iterdir():
        p.unlink()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = cache / "test" / "key.safetensors.lock"
    lock.write_text(
        json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname(), "time": 0})
    )
    start = time.time()
    assert build_in_process(str(cache), str(tmp_path)) == (3.0, False)
    assert time.time() - start < 10 and "its builder is gone" in caplog.text


def test_an_entry_copied_over_another_with_its_checksum_rewritten_is_rebuilt(tmp_path, monkeypatch, caplog):
    """An attacker (or a careless sync) copies one cache entry over another and rewrites the
    checksum sidecar: the entry names the key it was built for, and a mismatch is a rebuild
    with one warning, for tensors and checkpoints alike. A valid torch file of another kind
    is evicted the same way, and a read-only cache holding a stale entry costs only the reuse."""
    import shutil

    from bench.cache import cached_module, cached_tensors
    from bench.runner.checkpoints import checkpoint_problem

    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache"))
    a = {"images": torch.zeros(2, dtype=torch.uint8)}
    b = {"images": torch.ones(2, dtype=torch.uint8)}
    cached_tensors("samples", "a", lambda: a)
    cached_tensors("samples", "b", lambda: b)
    folder = tmp_path / "cache" / "samples"
    for suffix in ("", ".sha256"):
        shutil.copy(folder / f"a.safetensors{suffix}", writable(folder / f"b.safetensors{suffix}"))
    with caplog.at_level("WARNING", logger="qdiff-bench"):
        got, cached = cached_tensors("samples", "b", lambda: b)
    assert not cached and torch.equal(got["images"], b["images"])
    assert "(it was built for key 'a', not 'b'); rebuilding it" in caplog.text

    linear = {"model": torch.nn.Linear(2, 2), "note": "a"}
    cached_module("checkpoints", "a", lambda: linear)
    cached_module("checkpoints", "b", lambda: {**linear, "note": "b"})
    ckpts = tmp_path / "cache" / "checkpoints"
    for suffix in ("", ".sha256"):
        shutil.copy(ckpts / f"a.pt{suffix}", writable(ckpts / f"b.pt{suffix}"))
    got, cached = cached_module("checkpoints", "b", lambda: {**linear, "note": "b"})
    assert not cached and got["note"] == "b"
    # A dict of another kind under the right key (what a forged Checkpoint would need) is no
    # checkpoint: evicted and rebuilt rather than failing every later run of the cell.
    caplog.clear()
    with caplog.at_level("WARNING", logger="qdiff-bench"):
        _, cached = cached_module("checkpoints", "b", lambda: linear, check=checkpoint_problem)
    assert not cached and "not a checkpoint: expected the fields" in caplog.text

    writable(ckpts / "b.pt.sha256").write_text("0" * 64 + "\n")  # stale, in a cache made read-only
    for path in (ckpts, *ckpts.iterdir()):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        got, cached = cached_module("checkpoints", "b", lambda: {**linear, "note": "fresh"})
    finally:
        ckpts.chmod(0o755)
    assert not cached and got["note"] == "fresh"


def test_a_cache_path_that_is_a_file_costs_only_the_reuse(tmp_path, monkeypatch):
    from bench.cache import cached_module, cached_tensors

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "file"))
    tensors, cached = cached_tensors("samples", "k", lambda: {"x": torch.ones(1)})
    assert not cached and tensors["x"].item() == 1
    value, cached = cached_module("checkpoints", "k", lambda: {"model": torch.nn.Linear(1, 1)})
    assert not cached and isinstance(value["model"], torch.nn.Linear)
