"""The docs' code blocks are tests: every block in README.md and docs/ runs here, or says why not.

Each block is fenced with its language. The line before it may hold one directive:

    <!-- doctest: skip: REASON -->   not run in CI, and why (a GPU, real weights, over a minute)
    <!-- doctest: file PATH -->      the block is a file the next blocks use, written to PATH
    <!-- doctest: output -->        the block is what the run block before it prints ("..." on a
                                     line of its own stands for any lines, inside a line for any text)
    <!-- doctest: paths -->         the block names files and folders (`name.py`, `name/`) that exist

Without a directive, ``sh`` blocks run line by line in bash and ``python`` blocks in one
namespace per page, in a scratch folder that holds a copy of ``results/`` and links to the rest
of the checkout, so that nothing they write reaches the committed files. Any other block needs a
directive, and an indented (unfenced) code block is an error: it could be neither run nor
exempted. No block is copied into this file; a page's blocks are read from the page.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(?P<kind>skip|file|output|paths)\b:?\s*(?P<arg>.*?)\s*-->$")
RUNNABLE = {"sh", "python"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str  # run, skip, file, output or paths
    arg: str  # skip's reason, file's path

    def __str__(self) -> str:
        what = {"skip": f"not run: {self.arg}", "file": f"file {self.arg}"}.get(self.kind, self.kind)
        return f"{self.page}:{self.line} {self.lang}: {what}"


def blocks(page: str, source: str | None = None) -> list[Block]:
    """The page's code blocks with what CI does with each; a block CI cannot place is an error."""
    source = (ROOT / page).read_text() if source is None else source
    lines = source.splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("<!-- doctest") and not DIRECTIVE.match(line.strip()):
            raise AssertionError(f"{page}:{number}: a doctest directive this check cannot read")
    found = []
    for token in MarkdownIt().parse(source):
        if token.type == "code_block":
            raise AssertionError(
                f"{page}:{token.map[0] + 1}: an indented code block; fence it with its language "
                "(```sh, ```python, ```text) so that it runs here or says why not"
            )
        if token.type != "fence":
            continue
        line = token.map[0]
        lang = token.info.split()[0] if token.info.strip() else ""
        before = next((s.strip() for s in reversed(lines[:line]) if s.strip()), "")
        match = DIRECTIVE.match(before)
        kind, arg = (match["kind"], match["arg"]) if match else ("run", "")
        where = f"{page}:{line + 1}"
        if kind == "run" and lang not in RUNNABLE:
            raise AssertionError(
                f"{where}: a ```{lang} block with no directive; put one on the line before it "
                "(<!-- doctest: skip: why -->, file PATH, output or paths)"
            )
        if kind in ("skip", "file") and not arg:
            raise AssertionError(
                f"{where}: 'doctest: {kind}' needs {'a reason' if kind == 'skip' else 'a path'}"
            )
        found.append(Block(page, line + 1, lang, token.content, kind, arg))
    return found


def test_every_block_runs_or_says_why_not():
    """The inventory (printed with -s): each block of each page, and what CI does with it."""
    inventory = [b for page in PAGES for b in blocks(page)]
    print("\n".join(map(str, inventory)))
    assert any(b.kind == "run" for b in inventory)
    assert all(b.kind != "skip" or len(b.arg) > 8 for b in inventory), "a reason, not a word"


def test_an_unplaced_block_is_an_error():
    with pytest.raises(AssertionError, match="indented code block"):
        blocks("x.md", "Run this:\n\n    qdiff-bench run\n")
    with pytest.raises(AssertionError, match="no directive"):
        blocks("x.md", "```text\nsome output\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        blocks("x.md", "<!-- doctest: skip -->\n```sh\nqdiff-bench run\n```\n")
    skipped = blocks("x.md", "<!-- doctest: skip: needs a GPU -->\n\n```sh\n.ci/gpu\n```\n")
    assert [(b.kind, b.arg) for b in skipped] == [("skip", "needs a GPU")]


# --- running a page -----------------------------------------------------------------------------


def matches(expected: str, actual: str) -> bool:
    """Line by line; "..." alone on a line is any number of lines, inside a line any text."""
    parts = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            parts.append(r"(?:.*\n)*?")
        else:
            parts.append(".*".join(map(re.escape, line.rstrip().split("..."))) + r"[ \t]*\n")
    text = "\n".join(s.rstrip() for s in actual.rstrip("\n").splitlines()) + "\n"
    return re.fullmatch("".join(parts), text) is not None


def scratch_checkout(where: Path) -> Path:
    """A folder where the docs' commands see the checkout: a copy of results/ (commands write
    reports there), links to everything else."""
    where.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in (".git", "results", ".tox") or entry.name.startswith("qdiff-results"):
            continue
        (where / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "results", where / "results")
    return where


# A block of `qdiff-bench` commands runs in one Python process, each command through the CLI's
# entry point in turn, as a shell would run them one after another: one import of torch and the
# suite instead of one per line. Any other command runs in bash.
CLI_BLOCK = """
import shlex, sys
from bench.cli import main
for command in sys.argv[1:]:
    print(f"$ {command}", file=sys.stderr, flush=True)
    code = main(shlex.split(command, comments=True)[1:])
    if code:
        sys.exit(f"`{command}` exited {code}")
"""


def run_sh(block: Block, cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "100",
    }
    commands = [
        c
        for c in block.text.replace("\\\n", " ").splitlines()
        if c.strip() and not c.lstrip().startswith("#")
    ]
    if all(c.startswith("qdiff-bench ") for c in commands):
        runs = [[sys.executable, "-c", CLI_BLOCK, *commands]]
    else:
        runs = [["bash", "-c", c] for c in commands]
    out = []
    for argv in runs:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (
            f"{block.page}:{block.line}: {argv[-1] if len(runs) > 1 else commands} failed "
            f"({done.returncode})\n{done.stdout}\n{done.stderr}"
        )
        out.append(done.stdout)
    return "".join(out)


def run_python(block: Block, namespace: dict) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(block.text, f"{block.page}:{block.line}", "exec"), namespace)
    return stdout.getvalue()


# Where a layout's names live: the checkout's own folders, not .git, .tox (a 7 GB environment in
# CI) or the results.
SOURCE_FOLDERS = ("qdiff", "bench", "baselines", "configs", "benchmarks", "tests", ".ci")


def check_paths(block: Block) -> None:
    names = set(re.findall(r"(?<![\w/.-])([\w.-]+(?:\.py|/))(?=[\s,:;)]|$)", block.text, re.M))

    def exists(name: str) -> bool:
        name = name.rstrip("/")
        return (ROOT / name).exists() or any(any((ROOT / f).glob(f"**/{name}")) for f in SOURCE_FOLDERS)

    missing = [n for n in sorted(names) if not exists(n)]
    assert not missing, f"{block.page}:{block.line} names what the checkout does not hold: {missing}"


def _runs_something(page: str) -> bool:
    try:
        return any(b.kind != "skip" for b in blocks(page))
    except AssertionError:
        return True  # its test reports what is wrong with the page


RUN_PAGES = [p for p in PAGES if _runs_something(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    cwd = scratch_checkout(tmp_path / "checkout")
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__doc__"}
    last: tuple[Block, str] | None = None
    for block in blocks(page):
        if block.kind == "skip":
            continue
        if block.kind == "paths":
            check_paths(block)
        elif block.kind == "file":
            path = cwd / block.arg
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text)
            if path.suffix == ".toml":
                tomllib.loads(block.text)
        elif block.kind == "output":
            assert last is not None, f"{block.page}:{block.line}: output of which block?"
            ran, printed = last
            assert matches(block.text, printed), (
                f"{block.page}:{block.line}: the block at line {ran.line} printed\n{printed}\n"
                f"where the page shows\n{block.text}"
            )
        elif block.lang == "sh":
            last = block, run_sh(block, cwd)
        else:
            last = block, run_python(block, namespace)


def test_output_matching():
    assert matches("a\n...\nz\n", "a\nb\nc\nz\n")
    assert matches("took ... s\n", "took 1.5 s\n")
    assert not matches("a\nz\n", "a\nb\nz\n")
    assert not matches("took 2 s\n", "took 1.5 s\n")
