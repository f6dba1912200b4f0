"""A two-node Ray cluster on this machine (``ray start --head`` and a second ``ray start
--address`` on loopback): runs are placed on both nodes through the one shared cache, and a node
lost mid-run costs only a retry of its run on the other. Each driver is a fresh process, as a
user's is (Ray keeps per-process authentication state across ``ray.shutdown``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import tiny_matrix

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'qdiff-bench[ray]'")

from bench.scaleout import TOKEN_AUTH, LocalCluster, _processes
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def cluster():
    """``(address, worker node's node-manager port)`` of a head and a worker node, one CPU each."""
    # A lost node is noticed within seconds (Ray's default waits about half a minute).
    env = {"PYTHONPATH": PYTHONPATH, "RAY_health_check_period_ms": "500",
           "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "0"}  # fmt: skip
    cluster = LocalCluster.start(nodes=2, cpus=1, env=env)
    try:
        yield cluster.address, cluster.worker_ports[0]
    finally:
        cluster.stop()
    assert not [pid for pid, cmd in _processes() if cluster.temp_dir in cmd]


def driver(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **TOKEN_AUTH, "PYTHONPATH": PYTHONPATH, "QDIFF_BENCH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_runs_spread_over_both_nodes_through_the_shared_cache(tmp_path, cluster):
    address, _ = cluster
    matrix = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8, W4A8]")
    run = ["-m", "bench.cli", "run", matrix, "--results", str(tmp_path / "results"), "--executor", "ray",
           "--address", address, "--no-progress", "--no-report", "--no-check"]  # fmt: skip
    done = driver(run, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    rows = ResultStore(tmp_path / "results" / "tiny").rows()
    assert len(rows) == 7 and {r["status"] for r in rows} == {"ok"}, {r["error"] for r in rows}
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 2  # placed on both nodes; each read the cache entries the other wrote
    fp = {r["node"] for r in rows if r["method"] == "fp"}
    assert nodes - fp, "no quantized run ran on the node without the FP run"
    assert not list((tmp_path / "cache").rglob("*.lock"))


LOSE_A_NODE = """
import json, sys
from helpers import Sleeper
from bench.matrix import load_matrix
from bench.ray_executor import RayExecutor
from bench.runner import dependencies
from bench.spec import ExecutorSpec

matrix, address, folder = sys.argv[1:]
specs = [s for s in load_matrix(matrix).expand() if s.is_fp]
executor = RayExecutor(ExecutorSpec("ray", address=address, retries=2), threads=1, log=lambda _: None)
out = executor.map(Sleeper(folder, 8.0), specs, dependencies(specs))
print(json.dumps([type(o).__name__ for _, o in out]))
"""


def _raylet_of(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"node_manager_port={port}"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, "the worker node's raylet is not running"
    return pids[0]


@pytest.mark.slow
def test_a_node_lost_mid_run_costs_a_retry_not_the_matrix(tmp_path, cluster):
    address, worker_port = cluster
    matrix = tiny_matrix(tmp_path, seeds="[0, 1]")
    placed: set[str] = set()

    def kill_the_worker_node_mid_run() -> None:
        deadline = time.time() + 90
        while len(list(tmp_path.glob("started-*"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        placed.update(p.read_text() for p in tmp_path.glob("started-*"))
        os.kill(_raylet_of(worker_port), signal.SIGKILL)  # the node dies with its run

    killer = threading.Thread(target=kill_the_worker_node_mid_run)
    killer.start()
    done = driver(["-c", LOSE_A_NODE, matrix, address, str(tmp_path)], tmp_path / "cache")
    killer.join()
    assert done.returncode == 0, done.stderr
    assert len(placed) == 2, "the two FP runs did not start on two nodes"
    assert json.loads(done.stdout.splitlines()[-1]) == ["list", "list"]  # both ran to the end
    assert len(list(tmp_path.glob("started-*"))) == 3  # the lost run started again, elsewhere
