"""The Ray executor on a local Ray instance started here (``ray.init(num_cpus=2)``): the same rows
as the local executor, dependencies without barriers, retries of dead workers, a run whose
prerequisite died, Ctrl-C, and a killed driver that ``--resume`` recovers from. The two-node
cluster is tested in ``test_ray_cluster.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import Scripted, tiny_matrix

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'qdiff-bench[ray]'")

from bench.errors import MatrixError  # noqa: E402
from bench.matrix import load_matrix  # noqa: E402
from bench.ray_executor import RayExecutor, _Context, _problem_here, resources  # noqa: E402
from bench.runner import LocalExecutor, dependencies, run_matrix  # noqa: E402
from bench.spec import ExecutorSpec  # noqa: E402
from bench.store import ResultStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Where a run ran and how long it took: the only columns allowed to differ between executors.
PLACEMENT = {"run_id", "started_at", "duration_s", "metric_s", "sample_s", "host", "node"}


def ray_env() -> dict[str, str]:
    """The environment for Ray's worker processes: the tests' helpers importable (the run
    functions below come from them), as the suite itself is on every node."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, address="local", logging_level="WARNING",
        runtime_env={"env_vars": ray_env()},
    )  # fmt: skip
    yield
    ray.shutdown()


def quiet(_msg):
    pass


def comparable(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Rows by (run, metric) without placement and timing columns (and the value of the one
    timed metric, quantize_time)."""
    out = {}
    for r in rows:
        r = {k: v for k, v in r.items() if k not in PLACEMENT}
        if r["metric"] == "quantize_time":
            r.pop("value")
        out[(r["config_hash"], r["metric"])] = r
    return out


@pytest.mark.slow
def test_ray_writes_the_rows_the_local_executor_writes(tmp_path, local_ray, monkeypatch):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[qdiff]", bits="[W4A8]"))  # reconstruction too
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache-local"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray run: other thread counts round differently
    try:
        local = run_matrix(matrix, tmp_path / "local", LocalExecutor(), progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache-ray"))
    executor = RayExecutor(ExecutorSpec("ray"), threads=1, log=quiet)
    remote = run_matrix(matrix, tmp_path / "ray", executor, progress=False, log=quiet)
    assert {r["status"] for r in remote} == {"ok"} and len(remote) == len(local)
    assert comparable(remote) == comparable(local)
    assert all(r["node"] and r["host"] for r in remote) and not any("node" in r for r in local)
    # Previews travel back with the rows and land in the driver's results folder.
    assert sorted(p.name for p in (tmp_path / "ray" / "tiny" / "samples").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "tiny" / "samples").iterdir()
    )
    # The cache the runs shared holds each FP sample set and calibration set once.
    assert len(list((tmp_path / "cache-ray" / "samples").glob("*.safetensors"))) == len(
        list((tmp_path / "cache-local" / "samples").glob("*.safetensors"))
    )


def test_a_run_starts_when_its_own_prerequisites_finish(tmp_path, local_ray):
    """No barrier between waves: seed 1's quantized run starts while seed 0's slow FP run is
    still going (it needs only seed 1's FP run). Seed 0's FP run ends once seed 1's two runs
    have; behind a barrier it would wait its 120 s out and end first."""
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]", seeds="[0, 1]"))
    specs = matrix.expand()
    needs = dependencies(specs)
    fn = Scripted(str(tmp_path), hold_s=120.0, others=2)
    out = list(RayExecutor(ExecutorSpec("ray"), threads=1, log=quiet).map(fn, specs, needs))
    assert len(out) == 4 and all(isinstance(rows, list) for _, rows in out)
    ran = {s.hash: json.loads((tmp_path / f"ran-{s.hash}.json").read_text()) for s in specs}
    by = {(s.method, s.seed): ran[s.hash] for s in specs}
    assert by["linear", 1][1] < by["fp", 0][2]  # started before the unrelated FP run ended
    assert by["linear", 0][1] >= by["fp", 0][2]  # but after its own reference
    assert [s.hash for s in specs if s.is_fp] == [h for s in specs for h in needs[s.hash] if not s.is_fp]


def test_a_dead_worker_is_retried_then_becomes_an_error(tmp_path, local_ray):
    specs = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")).expand()
    needs = dependencies(specs)
    (tmp_path / "once").mkdir()
    retried = RayExecutor(ExecutorSpec("ray", retries=1), threads=1, log=quiet)
    once = retried.map(Scripted(str(tmp_path / "once"), die="once"), specs, needs)
    assert all(isinstance(rows, list) for _, rows in once)
    (tmp_path / "always").mkdir()
    lost = list(retried.map(Scripted(str(tmp_path / "always"), die="always"), specs[:1], {}))
    assert len(lost) == 1 and isinstance(lost[0][1], ray.exceptions.WorkerCrashedError)


def test_a_run_whose_prerequisite_died_still_runs(tmp_path, local_ray):
    specs = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8, W4A8]")).expand()
    executor = RayExecutor(ExecutorSpec("ray", retries=0), threads=1, log=quiet)
    fn = Scripted(str(tmp_path), die="fp")
    out = {s.method + s.bits_label: o for s, o in executor.map(fn, specs, dependencies(specs))}
    assert isinstance(out["fpFP"], ray.exceptions.WorkerCrashedError)
    assert isinstance(out["linearW8A8"], list) and isinstance(out["linearW4A8"], list)


def test_the_matrix_records_lost_workers_as_error_rows(tmp_path, local_ray):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]"))

    class Doomed(RayExecutor):
        def map(self, fn, specs, needs):
            return super().map(Scripted(str(tmp_path), die="always"), specs, needs)

    executor = Doomed(ExecutorSpec("ray", retries=0), 1, quiet)
    rows = run_matrix(matrix, tmp_path / "r", executor, progress=False, log=quiet)
    assert rows and {r["status"] for r in rows} == {"error"}
    assert all(r["error"].startswith("worker died: WorkerCrashedError") for r in rows)


def test_resources_follow_the_device(tmp_path):
    import dataclasses

    spec = load_matrix(tiny_matrix(tmp_path)).expand()[0]
    assert resources(spec, 2, None, cluster_has_gpus=True) == {"num_cpus": 2, "memory": int(2.5 * 2**30)}
    auto = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, device="auto"))
    assert resources(auto, 2, None, cluster_has_gpus=True) == {"num_gpus": 1, "num_cpus": 1}
    assert resources(auto, 2, 8, cluster_has_gpus=False) == {"num_cpus": 2, "memory": 8 * 2**30}


def test_a_node_without_the_drivers_code_or_cache_refuses_with_the_fix(tmp_path, monkeypatch):
    from bench.provenance import all_code_hash

    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "elsewhere"))
    context = _Context(all_code_hash(), "sha", "/shared/cache", "marker", {}, 1, None)
    problem = _problem_here(context, "10.0.0.2 abc")
    assert "does not see the driver's cache folder /shared/cache" in problem and "mount one shared" in problem
    other = _Context("0" * 16, "sha", "/shared/cache", "marker", {}, 1, None)
    assert "runs other code than the driver" in _problem_here(other, "10.0.0.2 abc")


def test_executor_settings_in_the_matrix_and_their_errors(tmp_path):
    path = Path(tiny_matrix(tmp_path))
    text = path.read_text()
    path.write_text(text.replace("settings: {", "settings: {executor: {name: ray, retries: 3}, "))
    assert load_matrix(path).executor == ExecutorSpec("ray", retries=3)
    path.write_text(text.replace("settings: {", "settings: {executor: rya, "))
    with pytest.raises(MatrixError, match=r"unknown executor 'rya' \(did you mean 'ray'\?\)"):
        load_matrix(path)
    path.write_text(text.replace("settings: {", "settings: {executor: {name: ray, retries: -1}, "))
    with pytest.raises(MatrixError, match="retries=-1 must be an integer >= 0"):
        load_matrix(path)
    # The executor is not part of any run's identity.
    assert [r.hash for r in load_matrix(tiny_matrix(tmp_path)).expand()] == [
        r.hash for r in load_matrix(tiny_matrix(tmp_path)).expand()
    ]


def cli(args: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "QDIFF_BENCH_CACHE": str(cache), **ray_env()}
    env.pop("RAY_AUTH_MODE", None)  # as a user's shell: set by Ray in this process (local_ray)
    return subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", *args, "--no-progress", "--no-report", "--no-check"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_killed_driver_leaves_no_partial_rows_and_resume_finishes(tmp_path, local_ray, monkeypatch):
    path = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")
    results, cache = tmp_path / "results", tmp_path / "cache"
    proc = cli([path, "--results", str(results), "--executor", "ray"], cache)
    runs = results / "tiny" / "runs"
    deadline = time.time() + 180
    while not list(runs.glob("*.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: Ray's processes must go with it
    proc.wait()
    assert "Token authentication" not in proc.stderr.read()  # a local instance starts quietly
    store = ResultStore(results / "tiny")
    before = store.rows()  # every file parses whole
    assert before and len(before) < 4
    # Resume (here in-process, on this module's Ray instance, which is quicker than a new one).
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(cache))
    executor = RayExecutor(ExecutorSpec("ray"), threads=1, log=quiet)
    run_matrix(load_matrix(path), results, executor, progress=False, log=quiet)
    rows = store.rows()
    keys = [(r["config_hash"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4  # each run once: the finished ones were not redone
    assert {r["status"] for r in rows} == {"ok"}


def test_cli_flags_name_what_they_need(tmp_path, capsys):
    from bench.cli import main

    matrix = tiny_matrix(tmp_path)
    assert main(["run", matrix, "--results", str(tmp_path / "r"), "--address", "auto"]) == 2
    assert "--address only apply to Ray: add --executor ray" in capsys.readouterr().err
    assert main(["run", matrix, "--results", str(tmp_path / "r"), "--executor", "ray", "--workers", "2"]) == 2
    assert "--workers is for the local executor" in capsys.readouterr().err


def test_scaleout_measures_the_overhead_of_a_run(tmp_path, local_ray):
    from bench.scaleout import overhead

    found = overhead(runs=4)  # on the Ray instance already running here
    assert found["per_run_s"] > 0 and len(found["per_run_s_each_repeat"]) == 3
    assert found["first_run_in_fresh_worker_s"] > 0 and found["cpu_model"] and found["ray"]
    assert ray.is_initialized()  # not its instance: left running


def test_an_address_where_nothing_listens_fails_at_once_with_the_address_and_the_fix():
    """`ray.init` retries such an address for minutes; the probe before it answers in one line."""
    import socket

    from bench.errors import ClusterError
    from bench.ray_executor import _probe

    with socket.socket() as free:  # a port that was free a moment ago: nothing listens there
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ClusterError) as info:
            _probe(address)
        assert f"nothing accepts connections at {address}" in str(info.value) and "\n" not in str(info.value)
        assert "ray start --head" in str(info.value)
    assert time.monotonic() - start < 30
    _probe("auto")  # left to Ray
