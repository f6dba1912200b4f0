"""What running on Ray costs and gains, measured here: ``python -m bench.scaleout``.

- ``overhead``: the seconds a run costs on Ray beyond its own work. No-op runs (a function that
  returns one row at once) go through :class:`~bench.ray_executor.RayExecutor` on a local
  instance with one CPU, so they run one after another; their throughput is the per-run
  overhead (submission, scheduling, the progress check-in, rows back to the driver). Starting
  the instance and a worker process's first run (importing torch and the suite) are per-matrix
  and per-worker costs, reported apart.
- ``speedup``: a CPU matrix run with one local worker (one torch thread), then on a cluster of
  two Ray nodes on this machine with one CPU each (``ray start`` on loopback), each with a fresh
  cache; the wall times, and whether both wrote the same quality values.

Both write JSON next to the matrices' results (``--out``) with the machine they ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fsio import proc_stat, write_atomic
from bench.provenance import REPO_ROOT, cpu_info, git_sha
from bench.spec import ExecutorSpec

RAY_CLI = str(Path(sys.executable).parent / "ray")
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


@dataclasses.dataclass(frozen=True)
class NoOp:
    """A run function that does no work: one row back, as a real run's."""

    def __call__(self, spec):
        return [{"status": "ok", "duration_s": 0.0, "config_hash": spec.hash}]


def _machine() -> dict:
    model, flags = cpu_info()
    import ray

    return {"cpu_model": model, "cpu_flags": flags, "cores": len(os.sched_getaffinity(0)),
            "host": socket.gethostname(), "ray": ray.__version__, "git_sha": git_sha()}  # fmt: skip


def overhead(runs: int) -> dict:
    """Per-run, per-matrix and per-worker costs of the Ray executor (see the module docstring)."""
    import ray

    from bench.matrix import load_matrix
    from bench.ray_executor import RayExecutor
    from bench.runner import dependencies

    base = load_matrix(REPO_ROOT / "configs" / "default.yaml").expand()[0]
    specs = [dataclasses.replace(base, seed=i) for i in range(runs)]  # distinct runs, no work
    started_here = not ray.is_initialized()  # else: measured on the caller's instance
    t = time.perf_counter()
    if started_here:
        ray.init(num_cpus=1, address="local", include_dashboard=False, logging_level="WARNING")
    startup = time.perf_counter() - t if started_here else None
    try:
        executor = RayExecutor(ExecutorSpec("ray"), threads=1, log=lambda _: None)
        t = time.perf_counter()
        list(executor.map(NoOp(), specs[:1], {}))  # a fresh worker: imports torch and the suite
        first = time.perf_counter() - t
        times = []
        for _ in range(3):  # three matrices of ``runs`` no-op runs each, on the warm worker
            t = time.perf_counter()
            done = list(executor.map(NoOp(), specs, dependencies(specs)))
            times.append((time.perf_counter() - t) / len(done))
    finally:
        if started_here:
            ray.shutdown()
    return {
        "what": f"{runs} no-op runs through RayExecutor on a local Ray instance with 1 CPU, 3 times",
        "per_run_s": round(statistics.mean(times), 4),
        "per_run_s_each_repeat": [round(x, 4) for x in times],
        "instance_startup_s": None if startup is None else round(startup, 2),
        "first_run_in_fresh_worker_s": round(first, 2),
        **_machine(),
    }


@dataclasses.dataclass
class LocalCluster:
    """Ray nodes on this machine, joined over loopback, in a session folder of their own, so that
    :meth:`stop` stops them and nothing else (``ray stop`` would stop every Ray on the machine).

    Args:
        address: the head's ``host:port``, for ``--address``.
        worker_ports: the worker nodes' node-manager ports (which name their raylet processes).
        temp_dir: the cluster's session root (every one of its processes names it).
    """

    address: str
    worker_ports: list[int]
    temp_dir: str

    @classmethod
    def start(cls, nodes: int, cpus: int, env: dict[str, str] | None = None) -> LocalCluster:
        """``nodes`` nodes (a head and workers) of ``cpus`` CPUs each, their processes started
        with ``env`` added."""
        # Ray 2.60's `ray start --head` requires token authentication (~/.ray/auth_token); nodes
        # and drivers that join need RAY_AUTH_MODE=token (TOKEN_AUTH) to present it.
        env = {**os.environ, **TOKEN_AUTH, **(env or {})}
        port = _free_port()
        temp = tempfile.mkdtemp(prefix="qdray", dir="/tmp")  # short: Ray's socket paths live in it
        cluster = cls(f"127.0.0.1:{port}", [], temp)
        common = [f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        head = [
            RAY_CLI,
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ]
        try:
            subprocess.run([*head, *common], env=env, check=True, capture_output=True)
            for _ in range(nodes - 1):
                cluster.worker_ports.append(_free_port())
                join = [
                    RAY_CLI,
                    "start",
                    f"--address={cluster.address}",
                    f"--node-manager-port={cluster.worker_ports[-1]}",
                ]
                subprocess.run([*join, *common], env=env, check=True, capture_output=True)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def stop(self) -> None:
        """Stop the cluster's processes (SIGTERM, then SIGKILL after 3 s) and remove its folder."""
        ours = {pid for pid, cmd in _processes() if self.temp_dir in cmd}
        family = ours | {pid for pid, _ in _processes() if _parent(pid) in ours}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 3
            while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in family):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _processes() -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.append(
                    (
                        int(entry.name),
                        (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                    )
                )
    return out


def _parent(pid: int) -> int | None:
    stat = proc_stat(pid)
    return int(stat[1]) if len(stat) > 1 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def speedup(matrix: Path, results: Path) -> dict:
    """One local worker, then two one-CPU Ray nodes on this machine, each with a fresh cache."""
    from bench.store import ResultStore

    def run(cache: str, *flags: str) -> float:
        env = {**os.environ, **TOKEN_AUTH, "QDIFF_BENCH_CACHE": cache}
        cmd = [sys.executable, "-m", "bench.cli", "run", str(matrix), "--results", str(results),
               "--force", "--threads", "1", "--no-progress", "--no-check", *flags]  # fmt: skip
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        return time.perf_counter() - t

    def quality(since: str) -> dict:
        store = ResultStore(results / matrix.stem)
        rows = [r for r in store.rows() if r["started_at"] >= since and r["status"] == "ok"]
        return {f"{r['config_hash']} {r['metric']}": r["value"] for r in rows if r.get("kind") == "quality"}

    with tempfile.TemporaryDirectory() as tmp:
        since = _now()
        local_s = run(f"{tmp}/local", "--workers", "1")
        local = quality(since)
        cluster = LocalCluster.start(nodes=2, cpus=1)
        try:
            since = _now()
            ray_s = run(f"{tmp}/ray", "--executor", "ray", "--address", cluster.address)
            remote = quality(since)
        finally:
            cluster.stop()
    return {
        "matrix": str(matrix.relative_to(REPO_ROOT) if matrix.is_relative_to(REPO_ROOT) else matrix),
        "local_one_worker_s": round(local_s, 1),
        "ray_two_nodes_s": round(ray_s, 1),
        "speedup": round(local_s / ray_s, 2),
        "quality_cells": len(local),
        "quality_identical": local == remote,
        "what": "wall time of `qdiff-bench run` (fresh cache, one torch thread per run): one local "
        "worker, then two Ray nodes of one CPU each on this machine",
        **_machine(),
    }


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead", help="per-run overhead of the Ray executor")
    o.add_argument("--runs", type=int, default=50)
    o.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("speedup", help="a CPU matrix on one local worker vs two local Ray nodes")
    s.add_argument("matrix", type=Path)
    s.add_argument("--results", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    found = overhead(args.runs) if args.what == "overhead" else speedup(args.matrix, args.results)
    write_atomic(args.out, json.dumps(found, indent=1) + "\n")
    print(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
