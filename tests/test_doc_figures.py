"""Figures the docs quote from committed results are checked against those results.

A page marks what it quotes from (results folders, or a measurement's JSON figures file) with a
directive; it covers the prose and tables after it up to
the next heading or directive:

    <!-- figures: results/default results/reruns/xeon-amx -->
    <!-- figures: results/perf-cpu-real; not from records: 1,689 | 316 -->

Inside, every figure must be one the records hold:
- a number with decimals, a thousands comma or three digits or more equals, at the precision it
  is written with, a number in one of the folders' reports (report.md, itself checked against the
  rows below), invocation records, or its runs' values and reconstruction logs; a percentage may
  be a recorded share;
- a wall time ("9 min 39 s", "52 min") is a recorded wall time;
- a commit is the prefix of one that made the rows; "EPYC" or "Xeon" the CPU that ran them;
  "empty cache" needs an invocation that started with none.
Figures that are not from the records (a side measurement, a paper's number) are listed after
"not from records:", or a part holding only such figures says `figures: none (why)`. And each
committed report.md is what `qdiff-bench report` writes from its rows today, so a figure cannot
be stale against the rows through a stale report either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache

import pytest
from test_docs import PAGES, ROOT

from bench.store import ResultStore, load

DIRECTIVE = re.compile(
    r"<!--\s*figures:\s*(?P<paths>[^;>]*?)\s*(?:;\s*not from records:\s*(?P<free>.*?))?\s*-->"
)
HEADING = re.compile(r"^#{1,6} ")
NUMBER = re.compile(r"(?<![\w.,/#'`-])(?P<n>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\w²³.'`-]|,\d)")
DURATION = re.compile(r"(?<![\w.])(?P<m>\d+) min(?: (?P<s>\d+) s)?\b")
COMMIT = re.compile(r"(?<![\w/.])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/])")
CPUS = ("EPYC", "Xeon")


@dataclass
class Section:
    page: str
    line: int
    folders: list[str]
    free: list[str]
    text: str = ""


@dataclass
class Records:
    numbers: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    commits: set[str] = field(default_factory=set)
    cpus: set[str] = field(default_factory=set)
    empty_cache: bool = False


def sections(page: str, source: str | None = None) -> list[Section]:
    """The parts of a page under a figures directive, without their code blocks."""
    source = (ROOT / page).read_text() if source is None else source
    found: list[Section] = []
    current = None
    fenced = False
    for number, line in enumerate(source.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        match = DIRECTIVE.search(line)
        if "<!-- figures" in line and not match:
            raise AssertionError(f"{page}:{number}: a figures directive this check cannot read (one line)")
        if match or HEADING.match(line):
            current = None
        if match:
            free = [" ".join(f.split()) for f in (match["free"] or "").split("|") if f.strip()]
            current = Section(page, number, match["paths"].split(), free)
            found.append(current)
        elif current is not None:
            current.text += line + "\n"
    return found


def _numbers(text: str) -> list[float]:
    return [float(m["n"].replace(",", "")) for m in NUMBER.finditer(text)] + [
        float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)
    ]


@cache
def records(folder: str) -> Records:
    path = ROOT / folder
    found = Records()
    if path.suffix == ".json":  # a measurement's own figures file (a training log, a scale test)
        record = json.loads(path.read_text())
        found.numbers += _numbers(json.dumps(record))
        found.walls += [
            v for k, v in _items(record) if k.endswith(("_s", "seconds")) and isinstance(v, float | int)
        ]
        found.commits |= {v for k, v in _items(record) if k in ("git_sha", "measured_at")}
        found.empty_cache = any(k == "cache_files_at_start" and v == 0 for k, v in _items(record))
        found.cpus |= {
            v for k, v in _items(record) if isinstance(v, str) and ("cpu" in k or k.endswith("_on"))
        }
        return found
    assert (path / "runs").is_dir(), f"{folder} holds no committed rows"
    found.numbers += _numbers((path / "report.md").read_text())
    for inv in ResultStore(path).invocations():
        found.walls.append(inv["wall_s"])
        found.empty_cache |= inv.get("cache_files_at_start") == 0
        found.numbers += _numbers(json.dumps(inv))
        found.commits.add(inv["git_sha"])
        found.cpus.add(inv.get("cpu_model") or "")
    rows = load(path, latest=False)
    # A run's value, duration and reconstruction's per-timestep errors, which the docs quote run
    # by run; not every number a row holds (that would match anything).
    found.numbers += [float(v) for v in rows.reindex(columns=["value", "duration_s"]).stack()]
    if "recon" in rows:
        found.numbers += _numbers(json.dumps([r for r in rows["recon"] if isinstance(r, dict)]))
    found.commits |= set(rows["git_sha"].dropna())
    found.cpus |= set(rows["cpu_model"].dropna())
    return found


def _items(record):
    """Every (key, value) of a JSON record, nested ones included."""
    if isinstance(record, dict):
        for k, v in record.items():
            yield k, v
            yield from _items(v)
    elif isinstance(record, list):
        for v in record:
            yield from _items(v)


def _close(value: float, decimals: int, pool: list[float]) -> bool:
    return any(abs(abs(p) - value) <= 0.5 * 10**-decimals + 1e-9 for p in pool)


def problems(section: Section) -> list[str]:
    """Each figure of the section that none of its folders' records hold."""
    if section.folders[0] == "none":
        assert len(section.folders) > 1, f"{section.page}:{section.line}: 'figures: none (why)'"
        return []
    pool = [records(f) for f in section.folders]
    numbers = [n for r in pool for n in r.numbers]
    hundredfold = [100 * n for n in numbers]  # a share quoted as a percentage
    walls = [w for r in pool for w in r.walls]
    where = f"{section.page}:{section.line} ({' '.join(section.folders)})"
    text = " ".join(section.text.split())  # a claim may wrap across lines
    for free in section.free:
        text = text.replace(free, " ")
    found = []
    for m in DURATION.finditer(text):
        seconds = int(m["m"]) * 60 + int(m["s"] or 0)
        slack = 0.5 if m["s"] else 30
        if not any(abs(w - seconds) <= slack for w in walls):
            found.append(
                f"{where}: '{m[0]}' is no recorded wall time ({', '.join(f'{w:.0f} s' for w in walls)})"
            )
    text = DURATION.sub(" ", text)
    for m in NUMBER.finditer(text):
        token = m["n"]
        if "." not in token and "," not in token and int(token) < 100:
            continue
        decimals = len(token.split(".")[1]) if "." in token else 0
        value = float(token.replace(",", ""))
        percent = text[m.end() : m.end() + 2].strip().startswith("%")
        if not _close(value, decimals, numbers) and not (percent and _close(value, decimals, hundredfold)):
            found.append(f"{where}: {token} is in none of its records")
    for commit in COMMIT.findall(text):
        if not any(c.startswith(commit) for r in pool for c in r.commits):
            found.append(f"{where}: commit {commit} made none of its rows")
    for cpu in CPUS:
        if cpu in text and not any(cpu in c for r in pool for c in r.cpus):
            found.append(
                f"{where}: says {cpu}, but its rows came from {sorted(c for r in pool for c in r.cpus)}"
            )
    if "empty cache" in text and not any(r.empty_cache for r in pool):
        found.append(f"{where}: says 'empty cache', but no invocation started with an empty one")
    return found


ALL = [s for page in PAGES for s in sections(page)]


def test_the_docs_mark_what_they_quote():
    assert {s.page for s in ALL} >= {"README.md", "docs/results.md", "docs/cost.md"}


@pytest.mark.parametrize("section", ALL, ids=lambda s: f"{s.page}:{s.line}")
def test_every_quoted_figure_is_in_the_records(section):
    assert not problems(section)


def test_a_stale_figure_fails():
    """The check catches each kind of staleness it claims to."""
    readme = (ROOT / "README.md").read_text()
    assert not any(problems(s) for s in sections("README.md", readme))
    for stale, fresh in [
        ("36.84 ± 8.56", "36.94 ± 8.56"),  # a table cell
        ("at commit a202bf2", "at commit 5870312"),  # the commit
        ("11 min 37 s", "9 min 43 s"),  # the wall time
        ("At real size on a 2-core AMD EPYC", "At real size on a 2-core Intel Xeon"),  # the machine
    ]:
        assert stale in readme, stale
        page = readme.replace(stale, fresh, 1)
        assert any(problems(s) for s in sections("README.md", page)), fresh
    claim = "<!-- figures: results/default -->\nRun from an empty cache.\n"
    assert problems(sections("x.md", claim)[0]) == [
        "x.md:1 (results/default): says 'empty cache', but no invocation started with an empty one"
    ]


# --- committed reports ---------------------------------------------------------------------------

FOLDERS = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "results").glob("**/runs"))
TOKEN = re.compile(r"(\d+(?:\.\d+)?)")


def _same_up_to_last_digits(old: str, new: str) -> bool:
    """Equal, except that a number may differ by one unit in its last written digit: a bootstrap's
    float sums may round the other way on another CPU's vector width."""
    a, b = TOKEN.split(old), TOKEN.split(new)
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i % 2 == 0 and x != y:
            return False
        if i % 2 == 1 and x != y:
            decimals = len(x.split(".")[1]) if "." in x else 0
            if (
                decimals != (len(y.split(".")[1]) if "." in y else 0)
                or abs(float(x) - float(y)) > 1.01 * 10**-decimals
            ):
                return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_committed_report_is_what_its_rows_give(folder):
    from bench import report

    committed = (ROOT / folder / "report.md").read_text()
    built = report.build(ROOT / folder).markdown
    assert _same_up_to_last_digits(committed, built), (
        f"{folder}/report.md is stale against its rows: qdiff-bench report {folder}"
    )


@pytest.mark.slow
def test_committed_history_is_what_the_rows_give(tmp_path, monkeypatch):
    from bench import history

    committed = (ROOT / "results" / "history.md").read_text().split("## Speed and memory")[0]
    monkeypatch.chdir(ROOT)  # the page names the root as given
    _, _, built = history.write("results", tmp_path, tmp_path / "no-asv")
    assert _same_up_to_last_digits(committed, built.split("## Speed and memory")[0]), (
        "results/history.md is stale against the rows: qdiff-bench report --history results/ --out results"
    )
