"""The command line: every command end to end, and one clear line (exit 2) per bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fixture_store, tiny_matrix

from bench.cli import main
from bench.errors import BitsError
from bench.spec import Bits
from bench.store import ResultStore


def here(capsys, *args):
    """``qdiff-bench`` in this process (what only reads, validates or reports: a new process for
    each costs seconds of imports): ``(exit code, stdout)``."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.mark.slow
def test_validate_run_resume_report_and_compare_via_subprocess(tmp_path, caplog, capsys):
    """The runs go through the installed entry point in new processes; the commands that only
    read and write results run in this one."""
    matrix = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8, W4A32]")
    results = tmp_path / "results"
    code, out = here(capsys, "validate", matrix, "--results", results)
    assert code == 0
    assert "3 runs (3 to run)" in out and "embedded-digits linear W4A32 seed=0 calib=0" in out
    assert "budget: the paper's defaults with " in out  # what the tiny settings leave implicit
    assert "estimated time here: about" in out and "ms per image-step" in out

    out = cli("run", matrix, "--results", results, "--workers", "2", "--threads", "1", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "3 runs, 7 rows appended" in out.stdout
    # The terminal gets the compact leaderboard (method × bits), the files the full report.
    assert "embedded-digits: digits_fd (fd, lower is better)" in out.stdout and "\nlinear " in out.stdout
    # Every line within 100 columns: the run lines (the budget, each run's metrics), the
    # reconstruction's warnings from the worker processes, the leaderboard.
    # A path longer than a line is the one word kept whole (these temporary ones can be).
    lines = (out.stdout + out.stderr).splitlines()
    long = [line for line in lines if len(line) > 100 and len(line.split()) > 1]
    assert not long, long
    assert "check against the reference" not in out.stdout  # no reference holds this matrix
    assert (results / "tiny" / "report.html").is_file() and (results / "tiny" / "report.md").is_file()
    files = sorted((results / "tiny" / "runs").iterdir())
    (invocation,) = ResultStore(results / "tiny").invocations()
    assert invocation["runs"] == invocation["runs_ok"] == 3 and invocation["workers"] == 2
    assert invocation["wall_s"] > 0 and invocation["peak_rss_worker_mib"] > 100 and invocation["git_sha"]
    assert "3 runs in" in (results / "tiny" / "report.md").read_text()

    # A Python call does what the command does: the same runs and values, its report written.
    from bench import api

    outcome = api.run(matrix, tmp_path / "api", workers=1, threads=1)

    def quality(rows):
        return {(r["config_hash"], r["metric"]): r["value"] for r in rows if r["kind"] == "quality"}

    # Equal to float rounding: the Fréchet distance is computed in another process.
    assert quality(outcome.rows) == pytest.approx(quality(ResultStore(results / "tiny").rows()), rel=1e-6)
    assert not outcome.failed
    # It reused the command's checkpoints (a weight-only model keeps diffusers' attention processor).
    assert "is not usable" not in caplog.text
    folder = tmp_path / "api" / "tiny"
    assert outcome.report_paths == (folder / "report.md", folder / "report.html")
    assert "embedded-digits" in outcome.report.markdown and len(outcome.store.invocations()) == 1

    code, again = here(capsys, "run", matrix, "--results", results, "--no-progress", "--no-report")
    assert code == 0 and "0 runs, 0 rows appended" in again
    assert len(ResultStore(results / "tiny").invocations()) == 1  # a no-op resume records nothing
    assert sorted((results / "tiny" / "runs").iterdir()) == files
    dry_run = ("run", matrix, "--results", results, "--dry-run", "--force", "--only", "bits=W8*")
    code, dry = here(capsys, *dry_run)
    assert code == 0 and dry.count("forced") == 1 and "W8A8" in dry

    assert here(capsys, "report", results / "tiny", "--out", tmp_path / "report")[0] == 0
    assert (tmp_path / "report" / "report.html").is_file()
    code, out = here(capsys, "compare", results / "tiny", results / "tiny")
    assert code == 0 and "0 regression(s)" in out
    code, out = here(capsys, "compare", results, results / "tiny")  # a results root is matched by name
    assert code == 0 and "0 regression(s)" in out
    assert max(map(len, out.splitlines())) <= 100  # the verdict's prose wrapped
    code, out = here(capsys, "validate", matrix, "--results", results, "--no-estimate")
    assert code == 0 and max(map(len, out.splitlines())) <= 100

    # The main job's self-check: the same matrix rerun elsewhere, against the first as reference.
    mine = tmp_path / "mine"
    args = ["--results", mine, "--reference", results, "--workers", "1", "--threads", "1", "--no-progress"]
    out = cli("run", matrix, *args)
    assert out.returncode == 0, out.stderr
    assert f"check against the reference {results / 'tiny'}:" in out.stdout
    assert "quality cells reproduce within their 95 % intervals" in out.stdout
    assert "cost cells: 2 compared on the same machine" in out.stdout  # one thread per run on both


def test_compare_exits_non_zero_past_the_threshold(tmp_path, capsys):
    a = fixture_store(tmp_path / "a")
    b = fixture_store(tmp_path / "b", qdiff_w4=23.0)
    assert main(["compare", str(a), str(b), "--threshold", "5%"]) == 1
    assert (
        "qdiff | W4A8 | digits_fd | 20.5 | 23.5 | 3 | 0.0205 | < 0.001 | 5% | worse **REGRESSION**"
        in capsys.readouterr().out
    )
    assert main(["compare", str(a), str(b), "--threshold", "20%"]) == 0
    # A per-metric limit overrides the global one; noise within it passes.
    assert main(["compare", str(a), str(b), "--max-regression", "digits_fd=3"]) == 0
    assert main(["compare", str(a), str(b), "--max-regression", "digits_fd=2.5"]) == 1


def test_ls_lists_everything_registered(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in (
        "embedded-digits",
        "sd-1.5",
        "qdiff-no-split",
        "linear",
        "digits_fd",
        "configs/default.yaml",
    ):
        assert name in out


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdiff-bench: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["validate", "{dir}/nope.yaml"], ["does not exist"]),
        (["run", "{matrix}", "--only", "meth=qdiff"], ["keys: model, method, bits, seed"]),
        (["compare", "{dir}", "{dir}", "--threshold", "x"], ["not a number or a percentage"]),
        (["compare", "{dir}", "{dir}", "--max-regression", "fid"], ["is not METRIC=AMOUNT"]),
        (["report", "{dir}/empty"], ["no results at", "run a matrix first"]),
        (["run", "{matrix}", "--only", "method=lineer"], ["--only method=lineer matches no run of"]),
        (["compare", "{dir}", "{dir}", "--max-regression", "fdi=1"], ["unknown metric 'fdi'"]),
        (["report", "{dir}/started"], ["no rows yet in", "run the matrix"]),
    ],
)
def test_bad_arguments_are_one_clear_line(argv, needles, tmp_path, capsys):
    matrix = tiny_matrix(tmp_path)
    (tmp_path / "started" / "runs").mkdir(parents=True)  # killed during its first run
    argv = [a.format(dir=tmp_path, matrix=matrix) for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, *needles)


def test_bad_matrix_fails_before_writing_anything(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [embedded-digits]\nmethods: [qdif]\nbits: [W4A8]\n")
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 2
    one_line_error(capsys, "unknown method 'qdif' (did you mean 'qdiff'?); valid: fp, linear, ", ", qdiff, ")
    assert not (tmp_path / "results").exists()


def test_unwritable_results_and_corrupt_store_keep_existing_results(tmp_path, capsys):
    matrix = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["run", matrix, "--results", str(blocker)]) == 2
    one_line_error(capsys, "is not writable", "--results")
    assert blocker.read_text() == "keep me"

    runs = tmp_path / "results" / "tiny" / "runs"
    runs.mkdir(parents=True)
    (runs / "x-1.jsonl").write_text('{"status": "ok"}\nnot json\n')
    before = {p: p.read_bytes() for p in runs.iterdir()}
    assert main(["run", matrix, "--results", str(tmp_path / "results"), "--no-progress"]) == 2
    one_line_error(
        capsys, "x-1.jsonl:1: corrupt results row (it lacks the schema column(s) run_id", "move that file out"
    )
    assert {p: p.read_bytes() for p in runs.iterdir()} == before


def test_missing_embedded_checkpoint_is_an_error_row_that_says_how_to_fix(tmp_path, capsys, monkeypatch):
    import bench.embedded.model
    import bench.runner.execute

    monkeypatch.setattr(bench.embedded.model, "ASSETS", tmp_path / "assets")
    bench.runner.execute._load.cache_clear()
    matrix = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")
    assert main(["run", matrix, "--results", str(tmp_path / "r"), "--no-progress", "--workers", "1"]) == 1
    bench.runner.execute._load.cache_clear()
    out = capsys.readouterr().out
    assert "\nerror: embedded-digits fp FP: " in out and "python -m bench.embedded.train" in out


def test_execution_defaults_split_the_cores(monkeypatch, tmp_path):
    import bench.api
    from bench.matrix import load_matrix

    matrix = load_matrix(tiny_matrix(tmp_path))
    monkeypatch.setattr(bench.api, "cores", lambda: 8)
    assert bench.api.execution(matrix, None, None) == (4, 2)
    assert bench.api.execution(matrix, 1, None) == (1, 8)
    monkeypatch.setattr(bench.api, "cores", lambda: 2)
    assert bench.api.execution(matrix, None, None) == (2, 1)
    assert bench.api.execution(matrix, None, 1) == (2, 1)


def test_more_threads_or_workers_than_cores_are_capped_with_one_line(monkeypatch, tmp_path, capsys):
    """--threads 100000 once started that many torch threads and ended in MemoryErrors."""
    import bench.api
    import bench.cli
    from bench.matrix import load_matrix

    matrix = load_matrix(tiny_matrix(tmp_path))
    monkeypatch.setattr(bench.api, "cores", lambda: 2)
    assert bench.api.execution(matrix, None, 3) == (2, 1)
    assert capsys.readouterr().err == "--threads 3 × 2 worker(s) exceeds this machine's 2 cores: using 1\n"
    assert bench.api.execution(matrix, 8, None) == (2, 1)
    assert "--workers 8 exceeds this machine's 2 cores: using 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.cli.main(["run", "--threads", "100000", "--dry-run"])
    assert "--threads must be an integer from 1 to 1024, got '100000'" in capsys.readouterr().err


def test_bits_labels():
    assert Bits.parse("w4a32") == Bits(4, None) and Bits(4, None).label == "W4A32"
    with pytest.raises(BitsError, match="quantizes nothing"):
        Bits.parse("W32A32")
    with pytest.raises(BitsError, match="weight bits 1 are out of range; use 2–16, or 32"):
        Bits.parse("W1A8")


def test_default_matrix_is_the_readme_main_command():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "pip install -e . && qdiff-bench run\n" in readme
    from bench.cli import DEFAULT_MATRIX

    assert DEFAULT_MATRIX.is_file()


def test_the_ray_executor_without_ray_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it fails
    assert main(["run", tiny_matrix(tmp_path), "--results", str(tmp_path / "r"), "--executor", "ray"]) == 2
    one_line_error(capsys, "--executor ray needs Ray", "pip install 'qdiff-bench[ray]'")
    assert not list((tmp_path / "r").rglob("*.jsonl"))


def test_empty_environment_variables_mean_unset(monkeypatch):
    """``QDIFF_BENCH_RESULTS=""`` once wrote results into the current folder; an empty variable
    is an unset one, for the results root and the cache alike."""
    from bench.cache import cache_dir

    monkeypatch.setenv("QDIFF_BENCH_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "qdiff-bench"
    code = "import bench.cli as c; print(c.RESULTS)"
    env = {**os.environ, "QDIFF_BENCH_RESULTS": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "qdiff-results"


def test_every_error_raised_on_purpose_shares_one_root_and_prints_as_one_line(monkeypatch, capsys):
    """The command line catches one class, so an error class added later (or qdiff's own, as
    ``BackendError`` once was) cannot slip through as a traceback."""
    import inspect

    import bench.cli as cli
    import bench.errors
    from qdiff import QdiffError
    from qdiff.backends.base import BackendError
    from qdiff.config import ConfigError

    classes = [c for _, c in inspect.getmembers(bench.errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 10
    assert all(issubclass(c, QdiffError) for c in [*classes, BackendError, ConfigError])

    def fails(args):
        raise BackendError("x86 deploys on CPU only; use device: cpu")

    monkeypatch.setitem(cli.COMMANDS, "ls", fails)
    assert main(["ls"]) == 2
    assert capsys.readouterr().err == "qdiff-bench: error: x86 deploys on CPU only; use device: cpu\n"


def test_every_command_in_the_readme_and_docs_parses(tmp_path, monkeypatch):
    """The documented commands stay true to the command line: each one's arguments parse."""
    import re
    import shlex

    from test_docs import blocks as doc_blocks

    from bench.cli import build_parser
    from bench.provenance import REPO_ROOT

    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    commands = []
    for page in pages:
        text = page.read_text("utf-8")
        spans = [s for s in re.findall(r"`([^`]+)`", text) if s.startswith("qdiff-bench ")]
        blocks = [
            line.strip() for b in doc_blocks(str(page.relative_to(REPO_ROOT))) for line in b.text.splitlines()
        ]
        for line in [*spans, *blocks]:
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if part.startswith("qdiff-bench "):
                    commands.append((page.name, " ".join(part.split())))
    assert len(commands) >= 25  # the extraction still finds them (29 when this was written)
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    monkeypatch.chdir(tmp_path)  # files the commands name exist here (flags that check them)
    for page, command in commands:
        words = shlex.split(command)
        if len(words) == 2 and words[1] in subcommands:
            continue  # the text names a subcommand (`qdiff-bench validate` checks ...)
        for word in words:
            if re.fullmatch(r"[\w.-]+\.(pt|pth|txt)", word):
                (tmp_path / word).touch()
        try:
            parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{command}` does not parse")
