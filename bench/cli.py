"""``qdiff-bench``: run benchmark matrices, and report and compare their results.

qdiff-bench ls                        registered models, methods, metrics; shipped matrices
qdiff-bench validate configs/x.yaml   expand a matrix and report problems; runs nothing
qdiff-bench run [configs/x.yaml]      run it here (default: configs/default.yaml), resumable, into
                                      qdiff-results/, and check it against the committed reference
qdiff-bench report results/<name>     Markdown + self-contained HTML leaderboard
qdiff-bench report --history results/ quality of every cell over commits
qdiff-bench compare A B               per-cell deltas; exit 1 when a gated cell regresses (A, B:
                                      matrix folders such as results/default, or results roots)
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import sys
from pathlib import Path

from bench.api import MAX_PARALLEL, RESULTS
from bench.errors import ImageError, IncomparableError, MatrixError, StoreError
from bench.progress import log_to_stderr, wrap
from bench.provenance import REPO_ROOT
from bench.registry import METHODS, METRICS, MODELS, include
from bench.spec import CLEANFID_MODES, EXECUTORS, FID_BACKENDS
from qdiff.errors import QdiffError

CONFIGS = REPO_ROOT / "configs"
DEFAULT_MATRIX = CONFIGS / "default.yaml"
# What a run is checked against by default: the committed rows, measured on the machine their
# provenance names. Where it writes: bench.api.RESULTS.
REFERENCE = REPO_ROOT / "results"
# Raised on purpose with the fix in the message (and a missing file): one line, exit 2.
USER_ERRORS = (QdiffError, FileNotFoundError)


def _positive(flag: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PARALLEL:
            raise argparse.ArgumentTypeError(
                f"{flag} must be an integer from 1 to {MAX_PARALLEL}, got {value!r}"
            )
        return n

    return parse


def _non_negative(flag: str):
    def parse(value: str) -> int:
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 0, got {value!r}")
        return int(value)

    return parse


def _existing_file(flag: str):
    def parse(value: str) -> str:
        if not Path(value).is_file():
            raise argparse.ArgumentTypeError(f"{flag} {value}: no such file")
        return value

    return parse


def _execution_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=_positive("--workers"),
        help="runs side by side in worker processes (default: one per CPU core, up to 4, for CPU "
        "matrices; 1 with CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=_positive("--threads"),
        help="torch CPU threads per worker (default: cores / workers; set explicitly, since "
        "oversubscription is very slow)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdiff-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # Plugins from outside the repository: a folder of modules that register methods, models or
    # metrics (installed packages register through entry points without a flag).
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument(
        "--include", action="append", default=[], metavar="DIR",
        help="load the plugin modules (*.py) of DIR before anything else (repeatable)",
    )  # fmt: skip
    sub.add_parser(
        "ls", parents=[plugins], help="list registered models, methods, metrics and shipped matrices"
    )

    check = sub.add_parser(
        "check", parents=[plugins],
        help="run the shared contract checks on a registered method, model or metric (a plugin's)",
    )  # fmt: skip
    check.add_argument("name", help="the registered name (qdiff-bench ls lists them)")

    validate = sub.add_parser(
        "validate", parents=[plugins], help="expand a matrix file and report problems; runs nothing"
    )
    validate.add_argument("matrix", type=Path)
    validate.add_argument(
        "--results", type=Path, default=RESULTS, help=f"results root (for run states; default: {RESULTS})"
    )
    validate.add_argument("--no-estimate", action="store_true", help="skip timing the models for an estimate")
    _execution_flags(validate)

    run = sub.add_parser(
        "run", parents=[plugins], help="run a matrix (default: the embedded CPU matrix), resuming by default"
    )
    run.add_argument("matrix", type=Path, nargs="?", default=DEFAULT_MATRIX)
    run.add_argument(
        "--results", type=Path, default=RESULTS,
        help=f"results root (default: {RESULTS}, or $QDIFF_BENCH_RESULTS); the committed rows are in "
        "results/",
    )  # fmt: skip
    run.add_argument(
        "--reference", type=Path, default=REFERENCE,
        help="results root to check this run against, cell by cell within the 95 %% intervals "
        f"(default: the committed {REFERENCE.name}/, when it holds this matrix)",
    )  # fmt: skip
    run.add_argument("--no-check", action="store_true", help="do not check against the reference")
    run.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=PATTERN",
        help="run only matching cells; keys model, method, bits, seed, calib_seed, backend, compile; "
        "shell patterns; repeatable",
    )
    run.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip runs whose rows are already in the store (default); --no-resume is --force",
    )
    run.add_argument("--force", action="store_true", help="rerun selected runs even if they are done")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    run.add_argument(
        "--no-progress", action="store_true", help="no progress output (bars on a terminal, lines in a log)"
    )
    run.add_argument("--no-report", action="store_true", help="do not write report.md/html afterwards")
    _execution_flags(run)
    ray = run.add_argument_group(
        "cluster",
        "run on Ray (pip install 'qdiff-bench[ray]'); a matrix's settings may set these as "
        "executor: {name: ray, address: ..., retries: ..., memory_gib: ..., dashboard: ...}",
    )
    ray.add_argument(
        "--executor", choices=EXECUTORS,
        help="local: this machine (worker processes); ray: one Ray task per run (default: the "
        "matrix's executor setting, else local)",
    )  # fmt: skip
    ray.add_argument(
        "--address", metavar="ADDRESS",
        help="Ray cluster: auto (the cluster this machine belongs to) or ray://host:10001 (Ray "
        "Client); default: a Ray instance on this machine for the matrix",
    )  # fmt: skip
    ray.add_argument(
        "--retries", type=_non_negative("--retries"),
        help="times a run whose worker or node died is retried before it is an error row (default 2)",
    )  # fmt: skip
    ray.add_argument(
        "--memory-gib", type=float, metavar="GIB",
        help="memory reserved per run (default: 2.5 for a CPU run, none for a GPU run)",
    )  # fmt: skip
    ray.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with a local instance")
    run.add_argument(
        "--inception-weights",
        type=_existing_file("--inception-weights"),
        metavar="PATH",
        help="local Inception weights for FID (no download): torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth or clean-fid's inception-2015-12-05.pt",
    )

    fid = sub.add_parser("fid", help="FID (and KID, Inception Score) of a folder of images against another")
    fid.add_argument("images", help="folder of generated images")
    fid.add_argument("reference", help="folder of real images, or a torch-fidelity data set (cifar10-train)")
    fid.add_argument("--backend", default="torch-fidelity", choices=FID_BACKENDS)
    fid.add_argument("--mode", default="clean", choices=CLEANFID_MODES, help="clean-fid resizing mode")
    fid.add_argument("--extractor", default="inception", help="feature extractor (default: Inception-v3)")
    fid.add_argument("--inception-weights", type=_existing_file("--inception-weights"), metavar="PATH")
    fid.add_argument(
        "--download", action="store_true",
        help="without --inception-weights: let the backend download its Inception weights (~100 MB)",
    )  # fmt: skip
    fid.add_argument("--kid", action="store_true", help="also Kernel Inception Distance")
    fid.add_argument("--isc", action="store_true", help="also Inception Score (torch-fidelity)")
    fid.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    fid.add_argument("--batch-size", type=_positive("--batch-size"), default=64)

    report = sub.add_parser("report", help="write report.md and report.html for a results folder")
    report.add_argument("results", type=Path, help="results/<matrix name> (with --history: the results root)")
    report.add_argument(
        "--out", type=Path,
        help=f"output folder (default: the results folder; with --history: {RESULTS}/history, so that "
        "the committed history in results/ changes only when named: --out results)",
    )  # fmt: skip
    report.add_argument(
        "--history", action="store_true",
        help="quality of every cell of every matrix under RESULTS over commits and machines, and "
        "asv's speed history: history.md/.html",
    )  # fmt: skip
    report.add_argument(
        "--asv", type=Path, metavar="DIR",
        help="asv results for --history (default: .asv/results of this checkout, written by tox -e asv)",
    )  # fmt: skip

    compare = sub.add_parser("compare", help="per-cell deltas between two results folders")
    compare.add_argument("a", type=Path, help="baseline: a matrix folder (results/default) or a results root")
    compare.add_argument("b", type=Path, help="candidate: a matrix folder or a results root")
    compare.add_argument(
        "--threshold",
        default="0",
        help="allowed worsening of a quality cell beyond its noise (the combined 95 %% intervals, "
        "at least 0.1 %% for float rounding): absolute (0.5) or relative (5%%); default 0",
    )
    compare.add_argument(
        "--max-regression", action="append", default=[], metavar="METRIC=AMOUNT",
        help="allowed worsening for one metric (repeatable), e.g. digits_fd=2 or fid=5%%; a cost "
        "metric named here is gated too",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    # A fatal signal (SIGBUS: a mapped cache entry truncated in place) prints the Python stack
    # on stderr instead of ending the process without a word (stderr may be no file: a test's).
    if not faulthandler.is_enabled():
        with contextlib.suppress(OSError, ValueError):
            faulthandler.enable()
    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        for folder in getattr(args, "include", ()):
            include(folder)
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"qdiff-bench: error: {exc}", file=sys.stderr)
        return 2


def _ls(args: argparse.Namespace) -> int:
    print("models:")
    for name in MODELS.names():
        cls = MODELS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(wrap(f"  {name:<16} {doc} [metrics: {', '.join(cls.DEFAULT_METRICS)}]"))
    print("methods:")
    for name in METHODS.names():
        print(wrap(f"  {name:<16} {METHODS.get(name).description}"))
    print("metrics:")
    for name in METRICS.names():
        m = METRICS.get(name)
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        print(f"  {name:<16} {m.kind}, {m.unit}, {arrow}")
    print("matrices:")
    for path in sorted(CONFIGS.glob("*.yaml")):
        print(f"  {path.relative_to(REPO_ROOT)}")
    return 0


def _contracts(args: argparse.Namespace) -> int:
    """Each contract check that applies to the name: pass, skip (with why) or FAIL (with what
    broke); exit 1 when one failed."""
    import traceback

    from bench import contracts

    counts = {"pass": 0, "skip": 0, "FAIL": 0}
    for what, check in contracts.checks(args.name):
        try:
            check()
            outcome, why = "pass", ""
        except contracts.Skip as exc:
            outcome, why = "skip", str(exc)
        except Exception as exc:  # a broken contract, however the plugin breaks it
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
            message = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            outcome, why = "FAIL", f"{message or 'assertion failed'} ({where})"
        counts[outcome] += 1
        print(wrap(f"{outcome:<4}  {what}" + (f": {why}" if why else "")))
    print(f"{args.name}: {counts['pass']} passed, {counts['skip']} skipped, {counts['FAIL']} failed")
    return 1 if counts["FAIL"] else 0


def _plan_table(planned) -> str:
    lines = [f"{'state':<8} {'hash':<16} run"]
    lines += [f"{p.state:<8} {p.spec.hash:<16} {p.spec.label} [{', '.join(p.spec.metrics)}]" for p in planned]
    return wrap("\n".join(lines))


def _validate(args: argparse.Namespace) -> int:
    from bench.matrix import load_matrix
    from bench.runner import plan
    from bench.store import ResultStore

    matrix = load_matrix(args.matrix)
    planned = plan(matrix, ResultStore(args.results / matrix.name))
    print(_plan_table(planned))
    print("", *map(wrap, matrix.notes), sep="\n")
    if matrix.executor.name == "ray":
        where = matrix.executor.address or "a Ray instance started here"
        print(wrap(f"executor: ray ({where}); the estimate below is for this machine's workers"))
    todo = [p.spec for p in planned if p.state != "done"]
    # Counts first: the paths, which may be long, on lines of their own.
    print(f"\nvalid; {len(planned)} runs ({len(todo)} to run)\n  matrix:  {args.matrix}")
    print(f"  results: {args.results / matrix.name}")
    if todo and not args.no_estimate:
        print(wrap(_estimate_text(matrix, todo, args.workers, args.threads)))
    return 0


def _estimate_text(matrix, todo, workers: int | None, threads: int | None) -> str:
    import torch

    from bench.api import execution
    from bench.estimate import WARN_MINUTES, estimate

    workers, threads = execution(matrix, workers, threads)
    torch.set_num_threads(threads)
    found = estimate(todo, workers, log=lambda msg: print(wrap(msg), file=sys.stderr))
    rates = ", ".join(f"{name}: {1000 * r:.3g} ms per image-step" for name, r in found.rates.items())
    if found.seconds is None:
        return f"estimated time: unknown ({', '.join(found.unknown)} could not be timed here)"
    text = (
        f"estimated time here: about {_duration(found.seconds)} with {workers} worker(s) × {threads} "
        f"thread(s), empty cache ({rates}; a rough estimate: see bench/estimate.py)"
    )
    if found.unknown:
        text += f"; not counted: the runs of {', '.join(found.unknown)}, which could not be timed here"
    if found.seconds > 60 * WARN_MINUTES:
        text += (
            f"\nwarning: over {WARN_MINUTES} minutes. For a first look use 'preset: quick' and fewer "
            "samples, or run part of it: qdiff-bench run FILE --only method=qdiff --only bits=W4A8"
        )
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.0f} days"


def _run(args: argparse.Namespace) -> int:
    from bench import api, report
    from bench.matrix import load_matrix, parse_rules
    from bench.runner import Interrupted
    from bench.store import ResultStore

    only = parse_rules(args.only)
    force = args.force or not args.resume
    matrix = load_matrix(args.matrix, args.executor)
    if args.dry_run:
        store = ResultStore(args.results / matrix.name)
        print(_plan_table(api.planned(matrix, store, only, force)))
        return 0
    try:
        outcome = api.run(
            matrix, args.results, only=only, force=force, workers=args.workers, threads=args.threads,
            executor=_executor_spec(matrix.executor, args), inception_weights=args.inception_weights,
            progress=not args.no_progress, report=not args.no_report,
        )  # fmt: skip
    except Interrupted as exc:
        print(f"{matrix.name}: {exc}", file=sys.stderr)
        return 143 if exc.terminated else 130
    if outcome.elsewhere:
        print(wrap(f"{matrix.name}: nothing to do here; in progress elsewhere: {outcome.elsewhere}"))
        return 0
    runs = len({r["config_hash"] for r in outcome.rows})
    appended = f"{len(outcome.rows)} rows appended to {outcome.store.runs}"
    print(wrap(f"{runs} runs, {appended}; wall time {outcome.wall_s:.0f}s"))
    if outcome.report is not None:
        md, page = outcome.report_paths
        print(f"\n{report.summary_text(outcome.report.cells)}\n{wrap(f'full report: {md} and {page}')}")
    if not args.no_check:
        _check(outcome.store.root, args.reference / matrix.name)
    return 1 if outcome.failed else 0


def _check(mine: Path, reference: Path) -> None:
    """The main job's verdict: this run's cells against the reference's, within their intervals."""
    from bench.compare import Threshold, compare, machine_note, verdict

    if not (reference / "runs").is_dir() or reference.resolve() == mine.resolve():
        return
    print(f"\ncheck against the reference {reference}:")
    try:
        table = compare(reference, mine, Threshold(0.0, relative=False))
    except (IncomparableError, StoreError) as exc:
        print(wrap(f"  not checked: {exc}"))
        return
    note = machine_note(table)
    lines = [*(note.splitlines() if note else []), *verdict(table).splitlines()]
    lines += ["('moved': outside its own 95 % interval, as about 1 cell in 20 is by chance; a",
              "regression is judged over all cells at once), details:",
              f"  qdiff-bench compare {reference} {mine}"]  # fmt: skip
    print(wrap("\n".join(f"  {line}" for line in lines)))


def _executor_spec(spec, args: argparse.Namespace):
    """The matrix's executor setting with the command line's flags over it."""
    import dataclasses

    flags = {"name": args.executor, "address": args.address, "retries": args.retries,
             "memory_gib": args.memory_gib, "dashboard": args.dashboard or None}  # fmt: skip
    chosen = dataclasses.replace(spec, **{k: v for k, v in flags.items() if v is not None})
    if chosen.memory_gib is not None and chosen.memory_gib <= 0:
        raise MatrixError(f"--memory-gib must be > 0, got {chosen.memory_gib}")
    ray_only = [f"--{k.replace('_', '-')}" for k, v in flags.items() if k != "name" and v is not None]
    if chosen.name != "ray" and ray_only:
        raise MatrixError(f"{', '.join(ray_only)} only apply to Ray: add --executor ray")
    return chosen


def _fid(args: argparse.Namespace) -> int:
    import json

    from bench.errors import AvailabilityError
    from bench.metrics import fid, inception
    from bench.spec import Evaluation, resolve_device

    if args.isc and args.backend != "torch-fidelity":
        raise ImageError("--isc needs --backend torch-fidelity (clean-fid has no Inception Score)")
    if args.extractor == "inception" and not args.inception_weights and not args.download:
        wanted = inception.WEIGHT_FILES[(args.backend, args.mode if args.backend == "clean-fid" else None)]
        raise ImageError(
            f"fid downloads nothing unless asked: pass --inception-weights /path/to/{wanted}, or "
            "--download to let the backend fetch its Inception weights"
        )
    evaluation = Evaluation(
        fid_backend=args.backend, fid_mode=args.mode, fid_extractor=args.extractor,
        inception_weights=args.inception_weights or "",
    )  # fmt: skip
    try:
        scores = fid.compute(
            evaluation, args.images, args.reference, kid=args.kid, isc=args.isc,
            device=str(resolve_device(args.device)), batch_size=args.batch_size,
        )  # fmt: skip
    except AvailabilityError as exc:
        raise ImageError(str(exc)) from None
    values = {k: v for k, v in vars(scores).items() if k != "info" and v is not None}
    print(json.dumps({**values, **scores.info}, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from bench import report

    if args.history:
        from bench import history

        md, page, _ = history.write(args.results, args.out or RESULTS / "history", args.asv)
        print(wrap(f"history (quality per commit and machine, asv's speed and memory): {md} and {page}"))
        return 0
    md, page, built = report.write(args.results, args.out)
    print(f"{report.summary_text(built.cells)}\n{wrap(f'full report: {md} and {page}')}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from bench.compare import Threshold, compare, machine_note, matrix_folders, parse_limits, to_markdown

    threshold, limits = Threshold.parse(args.threshold), parse_limits(args.max_regression)
    regressed = False
    for a, b in matrix_folders(args.a, args.b):
        table = compare(a, b, threshold, limits)
        note = machine_note(table)
        text = f"## {a} → {b}\n" + (f"\n{note}\n" if note else "") + f"\n{to_markdown(table)}\n"
        # Prose wrapped to the terminal; a table row stays one line (Markdown has no other).
        print("\n".join(line if line.startswith("|") else wrap(line) for line in text.split("\n")))
        regressed |= bool(table["regressed"].any())
    return 1 if regressed else 0


COMMANDS = {
    "ls": _ls,
    "check": _contracts,
    "validate": _validate,
    "run": _run,
    "fid": _fid,
    "report": _report,
    "compare": _compare,
}


if __name__ == "__main__":
    sys.exit(main())
