"""Leaderboards from a results store: a pandas pivot, Markdown, and one self-contained HTML file.

Rows are model × method, columns bit width × metric. Each quantized cell shows its value and
its delta to the FP run it is paired with (same seeds, prompts and sampler); with several
seeds, the mean ± sd over seeds and the mean paired delta. The best method per column is
highlighted. A failed or skipped cell shows its status, with the message as a footnote (and on
hover in HTML) — never a blank.

The package reads in one direction: :mod:`~bench.report.cells` computes the cells (statistics,
protocol grouping, ranks, the best of each column) from the rows; :mod:`~bench.report.text`
renders them as boards, Markdown and the terminal summary; :mod:`~bench.report.plots` draws
them; :mod:`~bench.report.html` assembles the page. :mod:`bench.compare` and
:mod:`bench.history` import the cells and the drawing helpers from those modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import claims
from bench.fsio import write_atomic
from bench.report import samples
from bench.report.cells import (
    MACHINE,
    cell_table,
    compile_modes,
    method_labels,
    protocol,
    time_split,
    with_derived,
)
from bench.report.html import CSS, to_html
from bench.report.plots import line_styles, pareto, plots, png
from bench.report.text import Shown, boards, cost_board, leaderboard, summary_text, to_markdown
from bench.store import ResultStore, load

__all__ = [
    "CSS",
    "MACHINE",
    "Report",
    "Shown",
    "boards",
    "build",
    "cell_table",
    "compile_modes",
    "cost_board",
    "leaderboard",
    "line_styles",
    "method_labels",
    "pareto",
    "plots",
    "png",
    "protocol",
    "summary_text",
    "time_split",
    "to_html",
    "to_markdown",
    "with_derived",
    "write",
]


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    cells: pd.DataFrame  # one row per (model, method, bits, metric)


def build(results: str | Path, out: str | Path | None = None) -> Report:
    """The leaderboard of one matrix's results folder; ``out``: where it will be written (the
    Markdown's links to sample grids are relative to it; default: the results folder)."""
    df = load(results)
    shown = samples.grids(df, Path(results))
    cells = cell_table(df)
    tables = boards(cells)
    title = f"Leaderboard: {', '.join(sorted(df['matrix'].dropna().unique()))}"
    invocations = ResultStore(results).invocations()
    ratios = claims.gap_ratios(df)  # bootstraps: once for both formats
    return Report(
        to_markdown(
            tables, cells, df, invocations, title, ratios, samples.to_markdown(shown, Path(out or results))
        ),
        to_html(tables, cells, df, invocations, title, ratios, samples.to_html(shown)),
        cells,
    )


def write(results: str | Path, out: str | Path | None = None) -> tuple[Path, Path, Report]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: the results folder)."""
    report = build(results, out)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    write_atomic(md, report.markdown)
    write_atomic(page, report.html)
    return md, page, report
