"""The report as one self-contained HTML page (no script, no external resource)."""

from __future__ import annotations

import html

import pandas as pd

from bench import claims
from bench.report.cells import FP, time_split
from bench.report.plots import eps_plots, plots
from bench.report.text import CELLS_LEGEND, TIME_HEADER, floors, metric_legend, provenance

TRENDS_HTML = (
    "Quality of every cell over commits and machines, and asv's speed and memory benchmarks over "
    "commits (<code>tox -e asv</code> measures them): <code>qdiff-bench report --history "
    "results/</code> writes history.md and a self-contained history.html into the results root."
)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td.name{text-align:left}
td.best{background:#e3f6e3;font-weight:bold} td.error{background:#fde8e8;color:#a00}
td.skipped{background:#f3f3f3;color:#777} td.ref{color:#555}
div.wide td{white-space:nowrap} div.wide td.error,div.wide td.skipped{white-space:normal;max-width:20em}
div.wide{overflow-x:auto;max-width:100%} span.sub{font-size:.85em;color:#444}
img{max-width:100%;display:block;margin:.5em 0 1.5em}
table.samples img{margin:0} table.samples td{vertical-align:middle}
"""


def to_html(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str, ratios: list[tuple[str, ...]], pictures: str = "",
) -> str:  # fmt: skip
    """The report as one page; ``pictures``: its "Samples" section."""
    esc = html.escape
    notes: list[str] = []
    sections = []
    for heading, board in tables:
        head = "".join(f"<th>{'<br>'.join(map(esc, c if isinstance(c, tuple) else (c,)))}</th>"
                       for c in board.columns)  # fmt: skip
        names = "".join(f"<th>{esc(n)}</th>" for n in board.index.names)
        body = []
        for key, values in board.iterrows():
            method = key[1]
            tds = ["".join(f'<td class="name">{esc(k)}</td>' for k in key)]
            for cell in values:
                cls = "best" if cell.best else "ref" if method == FP else ""
                if cell.failed:
                    notes.append(f"{' '.join(key)}: {cell}")
                    label = f"{cell.status} [{len(notes)}]"
                    tds.append(f'<td class="{cell.status}" title="{esc(str(cell))}">{label}</td>')
                    continue
                # The value on one line, its Δ or ratio (and rank) under it: a narrow column.
                value, sep, rest = cell.text.partition(" (")
                shown = esc(value) + (f"<br><span class='sub'>({esc(rest)}</span>" if sep else "")
                tds.append(f'<td class="{cls}">{shown}</td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        sections.append(
            f"<h2>{esc(heading)}</h2><div class='wide'><table><tr>{names}{head}</tr>"
            f"{''.join(body)}</table></div>"
        )
    legend = "; ".join(metric_legend(cells)).replace("`", "")
    floor_items = "".join(f"<li>{esc(f.replace('`', ''))}</li>" for f in floors(cells))
    note_list = "".join(f"<li>{esc(n)}</li>" for n in notes)
    figures = "".join(
        f'<h3>{esc(cap)}</h3><img alt="{esc(cap)}" src="data:image/png;base64,{b64}">'
        for cap, b64 in [*plots(cells), *eps_plots(df)]
    )
    prov = "".join(
        f"<tr><th>{esc(k)}</th><td class='name'>{esc(v)}</td></tr>" for k, v in provenance(df, invocations)
    )
    split = time_split(df)
    times = (
        "<h2>Where the time went</h2><table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in TIME_HEADER)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td class='name'>{esc(v)}</td>" for v in r) + "</tr>" for r in split)
        + "</table>"
        if split
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
        f"</head><body><h1>{esc(title)}</h1><p>{esc(CELLS_LEGEND)} Metrics: {esc(legend)}.</p>"
        f"<ul>{floor_items}</ul>"
        f"{''.join(sections)}<ol>{note_list}</ol>{claims.to_html(ratios)}"
        f"<h2>Plots</h2>{figures or '<p>No ok quality cells to plot.</p>'}{pictures}{times}"
        f"<h2>Over commits</h2><p>{TRENDS_HTML}</p>"
        f"<h2>Provenance</h2><table>{prov}</table></body></html>\n"
    )
