"""``qdiff-bench``: the command line of the suite."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.embedded.model import AssetError
from bench.methods import BitsError
from bench.registry import METHODS, UnknownNameError
from qdiff.config import ConfigError

USER_ERRORS = (UnknownNameError, BitsError, ConfigError, AssetError, ValueError, FileNotFoundError)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _threads(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("--threads must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdiff-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list registered methods")
    run = sub.add_parser("run", help="run methods × bit widths on the embedded model (CPU, offline)")
    run.add_argument("--methods", type=_csv, default=("linear", "qdiff"), help="comma-separated")
    run.add_argument("--bits", type=_csv, default=("W8A8", "W4A8", "W4A32"), help="e.g. W8A8,W4A32")
    run.add_argument("--samples", type=int, default=500, help="images per model (2–899)")
    run.add_argument("--steps", type=int, default=25, help="DDIM steps")
    run.add_argument("--seed", type=int, default=0, help="evaluation seed, shared by FP and quantized")
    run.add_argument("--name", default="embedded-default", help="results subfolder")
    run.add_argument("--results", type=Path, default=Path("results"), help="results root")
    run.add_argument(
        "--threads",
        type=_threads,
        default=min(4, os.cpu_count() or 1),
        help="torch CPU threads (set explicitly: oversubscription is very slow)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            print("methods: " + ", ".join(METHODS.names()))
            return 0
        return _run(args)
    except USER_ERRORS as exc:
        print(f"qdiff-bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from bench.models.embedded import SamplerConfig
    from bench.run import ExperimentConfig, format_table, run_experiment

    torch.set_num_threads(args.threads)
    config = ExperimentConfig(
        name=args.name,
        methods=args.methods,
        bits=args.bits,
        n_samples=args.samples,
        seed=args.seed,
        sampler=SamplerConfig(steps=args.steps),
    )
    config.validate()
    start = time.time()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = run_experiment(config, args.results, log=log)
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows appended to {args.results / args.name / 'rows.jsonl'}; "
        f"wall time {time.time() - start:.0f}s"
    )
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
