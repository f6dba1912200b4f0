"""How close `validate`'s estimate comes to recorded wall times: ``python -m bench.estimatecheck``.

For each matrix file, the estimate of its whole matrix (:mod:`bench.estimate`, timed here, with
the workers and threads each recorded run used) against every invocation record under the
results roots given that ran all of its runs. The figures go to ``--out`` as JSON with this
machine, each record's machine and cache state, and the commit. Target (issue 46): within a
factor 1.5 of the runs the docs cite, on the machine that ran them. A record that started with a
filled cache ran faster than an empty cache would have (the estimate is for an empty one), and
a record from another machine measures that machine: both are listed, and marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.errors import QdiffError
from bench.estimate import estimate
from bench.fsio import write_atomic
from bench.matrix import load_matrix
from bench.provenance import cpu_info, git_sha
from bench.store import ResultStore

CITED = ("small", "default", "conditional", "full")  # matrices whose wall times the docs cite
TARGET = 1.5


def check(config: Path, roots: list[Path], here: str) -> list[dict]:
    """One matrix: its estimate here against each complete recorded run of it under ``roots``."""
    matrix = load_matrix(config)
    runs = list(matrix.expand())
    records = [r for root in roots for r in ResultStore(root / matrix.name).invocations()]
    out = []
    estimates: dict[tuple[int, int], float] = {}  # one per setting: records read one estimate
    for record in (r for r in records if r.get("runs_ok") == len(runs)):
        setting = record["workers"], record["threads_per_worker"]
        if setting not in estimates:
            torch.set_num_threads(setting[1])
            estimates[setting] = estimate(runs, setting[0], log=lambda _msg: None).seconds
        seconds = estimates[setting]
        machine = f"{record.get('cpu_model')} ({record.get('cpu_flags')})"
        out.append({
            "matrix": matrix.name,
            "runs": len(runs),
            "workers": record["workers"],
            "threads_per_worker": record["threads_per_worker"],
            "estimate_s": round(seconds, 1),
            "measured_s": record["wall_s"],
            "ratio": round(seconds / record["wall_s"], 3),
            "measured_on": machine,
            "same_machine": machine == here,
            "measured_at": record.get("git_sha", "")[:7],
            "cache_files_at_start": record.get("cache_files_at_start"),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs", nargs="*", type=Path, default=[Path("configs") / f"{m}.yaml" for m in CITED]
    )
    parser.add_argument(
        "--results", type=Path, action="append",
        help="a results root to read invocation records from (repeatable; default: results)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/estimates/figures.json"))
    args = parser.parse_args(argv)
    model, flags = cpu_info()
    here = f"{model} ({flags})"
    try:
        rows = [row for c in args.configs for row in check(c, args.results or [Path("results")], here)]
    except QdiffError as exc:  # a matrix file or a record that cannot be read: one line
        sys.exit(f"estimatecheck: error: {exc}")
    for row in rows:
        print(json.dumps(row))
    figures = {"estimated_on": here, "git_sha": git_sha(), "target": TARGET, "records": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
