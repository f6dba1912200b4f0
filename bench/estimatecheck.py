"""How close `validate`'s estimate comes to the wall times on record: ``python -m bench.estimatecheck``.

For each matrix file, the estimate of its whole matrix (``bench.estimate``, timed here, with the
workers and threads the recorded run used) against the newest invocation record of its committed
results folder that ran every run of it. The figures go to ``--out`` as JSON with this machine,
the record's machine and cache state, and the commit. Target (issue 46): within a factor 1.5 on
the matrices the docs cite. A record that started with a filled cache ran faster than an empty
cache would have; the estimate is for an empty one, so such a ratio leans high.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.estimate import estimate
from bench.fsio import write_atomic
from bench.matrix import load_matrix
from bench.provenance import cpu_info, git_sha
from bench.store import ResultStore

CITED = ("default", "conditional", "ablations", "full")  # the matrices whose wall times the docs cite
TARGET = 1.5


def check(config: Path, results: Path) -> dict:
    """One matrix: its estimate here against its newest complete recorded run."""
    matrix = load_matrix(config)
    runs = list(matrix.expand())
    records = [r for r in ResultStore(results / matrix.name).invocations() if r.get("runs_ok") == len(runs)]
    if not records:
        return {"matrix": matrix.name, "runs": len(runs), "skipped": "no recorded run of every run"}
    record = records[-1]
    torch.set_num_threads(record["threads_per_worker"])
    found = estimate(runs, record["workers"], log=lambda _msg: None)
    return {
        "matrix": matrix.name,
        "runs": len(runs),
        "workers": record["workers"],
        "threads_per_worker": record["threads_per_worker"],
        "estimate_s": round(found.seconds, 1),
        "measured_s": record["wall_s"],
        "ratio": round(found.seconds / record["wall_s"], 3),
        "measured_on": f"{record.get('cpu_model')} ({record.get('cpu_flags')})",
        "measured_at": record.get("git_sha", "")[:7],
        "cache_files_at_start": record.get("cache_files_at_start"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs", nargs="*", type=Path, default=[Path("configs") / f"{m}.yaml" for m in CITED]
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="the committed results root")
    parser.add_argument("--out", type=Path, default=Path("results/estimates/figures.json"))
    args = parser.parse_args(argv)
    model, flags = cpu_info()
    rows = [check(c, args.results) for c in args.configs]
    for row in rows:
        print(json.dumps(row))
    figures = {"estimated_on": f"{model} ({flags})", "git_sha": git_sha(), "target": TARGET, "matrices": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
