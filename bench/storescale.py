"""What reading a large results store costs: ``python -m bench.storescale``.

A store tracked over a year of commits and machines holds each cell's rows many times over (a
rerun appends, the newest row counts). This builds such a store from a committed matrix's rows
(default ``results/full``, every run file as written, its run id and start time renewed per
rerun: a rerun every few minutes), at least ``--rows`` rows; a second store (the candidate of
``compare``) holds the same files, linked, plus one more rerun. Then ``qdiff-bench report`` on
the first and ``qdiff-bench compare`` of the two run as fresh processes, each timed (wall) and
measured (peak resident memory, from the kernel's accounting of the child), and the figures go
to ``--out`` as JSON with the machine, the commit and the targets.

Targets (issue 44), on the 2-core CI machine: report and compare each within 20 s and 1 GiB
at 100,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.fsio import write_atomic
from bench.provenance import REPO_ROOT, cpu_info, git_sha

TARGET_S, TARGET_MIB = 20.0, 1024.0
RERUN_EVERY = timedelta(minutes=5)


def build(source: Path, folder: Path, rows: int) -> tuple[int, int, int]:
    """Reruns of ``source``'s run files into ``folder/runs`` until it holds ``rows`` rows.
    Returns (rows, files, bytes)."""
    runs = []
    for path in sorted((source / "runs").glob("*.jsonl")):
        runs.append([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()])
    if not runs:
        raise SystemExit(f"{source}: no run files to copy")
    out = folder / "runs"
    out.mkdir(parents=True)
    start = datetime.now(UTC) - timedelta(days=365)
    written = files = size = 0
    while written < rows:
        for run in runs:
            when = start + files * RERUN_EVERY
            run_id = f"{when:%Y%m%dT%H%M%S}-{files:06x}"
            text = "".join(
                json.dumps({**r, "run_id": run_id, "started_at": when.isoformat()}) + "\n" for r in run
            )
            (out / f"{run[0]['config_hash']}-{run_id}.jsonl").write_text(text, encoding="utf-8")
            written, files, size = written + len(run), files + 1, size + len(text)
            if written >= rows:
                break
    return written, files, size


def candidate(a: Path, b: Path) -> None:
    """``b``: ``a``'s run files (hard links) and one newer rerun of its newest file."""
    (b / "runs").mkdir(parents=True)
    files = sorted((a / "runs").glob("*.jsonl"))
    for path in files:
        os.link(path, b / "runs" / path.name)
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    rows = [json.loads(line) for line in newest.read_text(encoding="utf-8").splitlines()]
    when = datetime.now(UTC).isoformat()
    text = "".join(json.dumps({**r, "run_id": "rerun", "started_at": when}) + "\n" for r in rows)
    (b / "runs" / f"{rows[0]['config_hash']}-rerun.jsonl").write_text(text, encoding="utf-8")


def measure(argv: list[str]) -> dict[str, float]:
    """Wall seconds and peak resident MiB of ``qdiff-bench ARGV`` in a fresh process."""
    t = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # compare exits 1 for a regression, which is not a failure here
        raise SystemExit(
            f"qdiff-bench {' '.join(argv)} failed ({code}): {child.stderr.read().decode()[-2000:]}"
        )
    child.stderr.close()
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _shown(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (not this disk's layout)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storescale", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the store (default 100,000)")
    parser.add_argument(
        "--source", type=Path, default=REPO_ROOT / "results" / "full", help="matrix folder to copy"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "store-scale" / "figures.json")
    parser.add_argument("--work", type=Path, help="folder for the stores (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="qdiff-storescale-"))
    try:
        name = args.source.name
        a, b = work / "a" / name, work / "b" / name
        t = time.perf_counter()
        rows, files, size = build(args.source, a, args.rows)
        candidate(a, b)
        built_s = time.perf_counter() - t
        report = measure(["report", str(a), "--out", str(work / "report")])
        compare = measure(["compare", str(a), str(b)])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    model, flags = cpu_info()
    import duckdb

    figures = {
        "what": "qdiff-bench report and compare on a store of reruns of one matrix (bench/storescale.py)",
        "source": _shown(args.source),
        "rows": rows,
        "files": files,
        "jsonl_mib": round(size / 2**20, 1),
        "build_s": round(built_s, 1),
        "report": report,
        "compare": compare,
        "target": {"wall_s": TARGET_S, "peak_rss_mib": TARGET_MIB},
        "met": all(m["wall_s"] <= TARGET_S and m["peak_rss_mib"] <= TARGET_MIB for m in (report, compare)),
        "cpu_model": model,
        "cpu_flags": flags,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "duckdb": duckdb.__version__,
        "python": sys.version.split()[0],
        "git_sha": git_sha(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(args.out, json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
