"""Leaderboards from a results store: a pandas pivot, Markdown, and one self-contained HTML file.

Rows are model × method, columns bit width × metric. Each quantized cell shows its value and
its delta to the FP run it is paired with (same seeds, prompts and sampler); with several
seeds, the mean ± sd over seeds and the mean paired delta. The best method per column is
highlighted. A failed or skipped cell shows its status, with the message as a footnote (and on
hover in HTML) — never a blank.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.store import ResultStore, load

FP = "fp"


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    cells: pd.DataFrame  # one row per (model, method, bits, metric)


def method_labels(df: pd.DataFrame) -> list[str]:
    """Each row's method, with its backend when that is a real-kernel one: ``linear [x86]``
    (one calibrated model deployed two ways is two leaderboard rows)."""
    budgets = df["budget"] if "budget" in df else [None] * len(df)
    backends = [b.get("backend") if isinstance(b, dict) else None for b in budgets]
    return [m if b in (None, "fake") else f"{m} [{b}]" for m, b in zip(df["method"], backends, strict=True)]


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the latest rows over seeds: one row per (model, method, bits, metric).

    Columns: value (mean), sd, seeds, delta (mean paired delta to FP), status (``ok`` only if
    every seed is), error, unit, higher_is_better, kind, extras of the FP row (e.g. ``floor``).
    """
    df = df.copy()
    df["method"] = method_labels(df)
    ok = df[df["status"] == "ok"]
    fp_value = {(r.config_hash, r.metric): r.value for r in ok.itertuples() if r.method == FP}
    paired = [
        fp_value[(r.reference_hash, r.metric)]
        if r.status == "ok" and (r.reference_hash, r.metric) in fp_value
        else math.nan
        for r in df.itertuples()
    ]
    df["delta"] = df["value"].astype(float) - paired
    df["ratio"] = df["value"].astype(float) / paired
    # Columns from least to most aggressive: W8A8, W4A32, W4A8, ...
    precision = {r.bits: (-(r.w_bits or 32), -(r.a_bits or 32)) for r in df.itertuples() if r.bits != "FP"}
    bits_order = ["FP", *sorted(precision, key=precision.get)]
    records = []
    for (model, method, bits, metric), g in df.groupby(["model", "method", "bits", "metric"], sort=False):
        good = g[g["status"] == "ok"]
        bad = g[g["status"] != "ok"]
        first = g.iloc[0]
        records.append(
            {
                "model": model,
                "method": method,
                "bits": bits,
                "metric": metric,
                "value": good["value"].astype(float).mean() if len(good) else math.nan,
                "sd": good["value"].astype(float).std() if len(good) > 1 else math.nan,
                "seeds": len(good),
                "delta": good["delta"].mean() if len(good) else math.nan,
                "ratio": good["ratio"].mean() if len(good) else math.nan,
                "status": bad.iloc[-1]["status"] if len(bad) else "ok",
                "error": bad.iloc[-1]["error"] if len(bad) else None,
                "unit": first["unit"],
                "higher_is_better": bool(first["higher_is_better"]),
                "kind": first.get("kind", "quality") if isinstance(first.get("kind"), str) else "quality",
                "weights_from": _first(good, "weights_from"),
                "floor": good["floor"].mean()
                if "floor" in good and good["floor"].notna().any()
                else math.nan,
                "floor_sd": good["floor_sd"].mean()
                if "floor_sd" in good and good["floor_sd"].notna().any()
                else math.nan,
                "bits_rank": bits_order.index(bits),
            }
        )
    return pd.DataFrame.from_records(records)


def _first(rows: pd.DataFrame, column: str):
    values = rows[column].dropna() if column in rows else []
    return values.iloc[0] if len(values) else None


def leaderboard(cells: pd.DataFrame) -> pd.DataFrame:
    """The pivot: index (model, method), columns (bits, metric), values = cell text."""
    quant = cells[cells["method"] != FP]
    bits_labels = list(quant.sort_values("bits_rank")["bits"].drop_duplicates()) or ["FP"]
    metrics = list(dict.fromkeys(cells["metric"]))
    best = _best(quant)
    table: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for c in cells.itertuples():
        row = table.setdefault((c.model, c.method), {})
        targets = bits_labels if c.method == FP else [c.bits]  # FP is every column's reference
        for bits in targets:
            row[(bits, c.metric)] = _cell_text(c, is_best=(c.model, bits, c.metric, c.method) in best)
    columns = pd.MultiIndex.from_tuples(
        [(b, m) for b in bits_labels for m in metrics], names=["bits", "metric"]
    )
    index = pd.MultiIndex.from_tuples(
        sorted(table, key=lambda k: (k[0], k[1] != FP, k[1])), names=["model", "method"]
    )
    return pd.DataFrame(
        [[table[i].get(col, "—") for col in columns] for i in index], index=index, columns=columns
    )


TIME_UNITS = ("ms", "s")
# Costs a WxA32 run inherits from the run whose weight phase it reuses (``weights_from``).
SHARED_WITH_WEIGHTS_SOURCE = ("quantize_time",)
KINDS = (("quality", "Quality"), ("cost", "Cost"))


def boards(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One leaderboard per metric kind present: (heading, board), quality first."""
    return [(heading, leaderboard(cells[cells["kind"] == kind])) for kind, heading in KINDS
            if (cells["kind"] == kind).any()]  # fmt: skip


def _best(quant: pd.DataFrame) -> set[tuple[str, str, str, str]]:
    best = set()
    for (model, bits, metric), g in quant[quant["status"] == "ok"].groupby(["model", "bits", "metric"]):
        g = g.dropna(subset=["value"])
        if len(g) < 2:
            continue
        pick = g["value"].idxmax() if g["higher_is_better"].iloc[0] else g["value"].idxmin()
        best.add((model, bits, metric, g.loc[pick, "method"]))
    return best


def _fmt(v: float, like: float | None = None) -> str:
    """``v`` with the decimals that suit the magnitude of ``like`` (default: ``v`` itself), so a
    cell's sd and delta read at the precision of its value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v if like is None else like)
    return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3g}" if like is None else f"{v:.3f}"


def _cell_text(c, is_best: bool) -> str:
    if c.status != "ok":
        return f"{c.status}: {c.error}"
    text = _fmt(c.value)
    if c.seeds > 1:
        text += f" ± {_fmt(c.sd, c.value)}"
    if c.method != FP and c.kind == "cost" and c.ratio > 0:
        # Cost reads as a ratio to the paired FP run: speedup for times, a fraction for sizes.
        text += f" (speedup {1 / c.ratio:.2f}×)" if c.unit in TIME_UNITS else f" ({c.ratio:.2f}× FP)"
    elif c.method != FP and not math.isnan(c.delta):
        text += f" ({'+' if c.delta >= 0 else '−'}{_fmt(abs(c.delta), c.value)})"
    if c.metric in SHARED_WITH_WEIGHTS_SOURCE and isinstance(c.weights_from, str):
        text += f" (shared with {c.weights_from})"
    return f"**{text}**" if is_best else text


def _invocation_text(inv: dict) -> str:
    return (
        f"{inv['started_at'][:19]}: {inv['runs']} runs in {inv['wall_s']:.0f} s wall, "
        f"{inv['workers']} worker(s) × {inv['threads_per_worker']} thread(s), peak RSS "
        f"{inv['peak_rss_main_mib']:.0f} MiB (main) / {inv['peak_rss_worker_mib']:.0f} MiB (largest worker), "
        f"{inv['cache_files_at_start']} cache files at start, commit {inv['git_sha'][:12]}"
    )


def _provenance(df: pd.DataFrame, invocations: list[dict]) -> list[tuple[str, str]]:
    def values(col: str) -> str:
        return ", ".join(sorted({str(v) for v in df[col].dropna()})) if col in df else "—"

    started = df["started_at"].dropna().sort_values()
    sampling = df["sampling"].dropna().map(lambda s: ", ".join(f"{k}={v}" for k, v in s.items()))
    budget = df["budget"].dropna().map(lambda s: ", ".join(f"{k}={v}" for k, v in s.items()))
    return [
        ("matrix", values("matrix")),
        ("runs", f"{df['config_hash'].nunique()} ({len(df)} rows)"),
        ("git commit", values("git_sha")),
        ("device", values("device")),
        ("torch / CUDA", f"{values('torch')} / {values('cuda')}"),
        ("diffusers", values("diffusers")),
        ("python", values("python")),
        ("samples per run", values("n_samples")),
        ("seeds", values("seed")),
        ("sampling", "; ".join(sorted(set(sampling))) or "—"),
        ("quantization budget", "; ".join(sorted(set(budget))) or "—"),
        ("run dates (UTC)", f"{started.iloc[0][:19]} – {started.iloc[-1][:19]}" if len(started) else "—"),
        ("invocations", "; ".join(_invocation_text(i) for i in invocations) or "—"),
    ]


def time_split(df: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """Per run: (run, seconds generating its samples, seconds measuring, the slowest metric).
    Runs whose samples came from the cache have no generation time."""
    if "metric_s" not in df or "sample_s" not in df:
        return []
    out = []
    df = df.assign(method=method_labels(df))
    for _, g in df[df["status"] == "ok"].groupby("config_hash", sort=False):
        first = g.iloc[0]
        timed = g[g["metric_s"].notna()]
        if not len(timed):
            continue
        slowest = timed.loc[timed["metric_s"].astype(float).idxmax()]
        sample = first["sample_s"]
        out.append((
            f"{first['model']} {first['method']} {first['bits']}",
            "cached" if pd.isna(sample) else f"{float(sample):.1f}",
            f"{timed['metric_s'].astype(float).sum():.1f}",
            f"{slowest['metric']} ({float(slowest['metric_s']):.1f})",
        ))  # fmt: skip
    return out


TIME_HEADER = ("run", "generate (s)", "measure (s)", "slowest metric (s)")


def _metric_legend(cells: pd.DataFrame) -> list[str]:
    out = []
    for metric, g in cells.groupby("metric", sort=False):
        arrow = "higher is better" if g["higher_is_better"].iloc[0] else "lower is better"
        out.append(f"`{metric}` ({g['unit'].iloc[0]}, {arrow})")
    return out


def _floors(cells: pd.DataFrame) -> list[str]:
    fp = cells[(cells["method"] == FP) & cells["floor"].notna()]
    return [
        f"{r.model} `{r.metric}`: real-vs-real floor {_fmt(r.floor)} ± {_fmt(r.floor_sd, r.floor)} "
        "at the same sample count"
        for r in fp.itertuples()
    ]


def to_markdown(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str,
) -> str:  # fmt: skip
    notes: list[str] = []
    lines = [f"# {title}", "", "Cells: value (Δ vs the paired FP run); best per column in bold.", ""]
    lines.append("Metrics: " + "; ".join(_metric_legend(cells)) + ".")
    lines.extend(["", *[f"- {f}" for f in _floors(cells)]])
    for heading, board in tables:
        header = ["model", "method", *[f"{b} {m}" for b, m in board.columns]]
        lines.extend(["", f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        for (model, method), values in board.iterrows():
            shown = []
            for text in values:
                if text.startswith(("error:", "skipped:")):
                    notes.append(f"{model} {method}: {text}")
                    text = f"{text.split(':')[0]} [{len(notes)}]"
                shown.append(text.replace("|", "\\|"))
            lines.append(f"| {model} | {method} | " + " | ".join(shown) + " |")
    if notes:
        lines.extend(["", *[f"[{i}] {n}" for i, n in enumerate(notes, 1)]])
    split = time_split(df)
    if split:
        lines.extend(
            ["", "## Where the time went", "", "| " + " | ".join(TIME_HEADER) + " |", "|---|---|---|---|"]
        )
        lines.extend("| " + " | ".join(r) + " |" for r in split)
    lines.extend(["", "## Over commits", "", TRENDS_MD])
    lines.extend(["", "## Provenance", "", "| | |", "|---|---|"])
    lines.extend(f"| {k} | {v} |" for k, v in _provenance(df, invocations))
    return "\n".join(lines) + "\n"


# Where the history of these numbers lives: quality over commits (report --history) and asv's
# speed/memory graphs, which `asv publish` writes to .asv/html at the repository root (reports
# sit two folders below it, in results/<matrix>/).
ASV_HTML = "../../.asv/html/index.html"
TRENDS_MD = (
    "Quality of every cell over commits: `qdiff-bench report --history results/` (history.html "
    f"in the results root). Speed and memory over commits: [asv's graphs]({ASV_HTML}) "
    "(`tox -e asv` runs the suite and `asv publish` writes them)."
)
TRENDS_HTML = (
    "Quality of every cell over commits: <code>qdiff-bench report --history results/</code> "
    f'(history.html in the results root). Speed and memory over commits: <a href="{ASV_HTML}">'
    "asv's graphs</a> (<code>tox -e asv</code> runs the suite and <code>asv publish</code> writes them)."
)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(cells: pd.DataFrame) -> list[tuple[str, str]]:
    """(caption, base64 PNG): quality vs bits per method, and quality vs cost Pareto fronts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    ok = cells[cells["status"] == "ok"]
    for model, mcells in ok.groupby("model", sort=False):
        quant = mcells[mcells["method"] != FP].sort_values("bits_rank")
        labels = list(dict.fromkeys(quant["bits"]))
        for metric, g in quant[quant["kind"] == "quality"].groupby("metric", sort=False):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for method, mg in g.groupby("method", sort=False):
                xs = [labels.index(b) for b in mg["bits"]]
                ax.plot(xs, mg["value"], marker="o", label=method)
            fp = mcells[(mcells["method"] == FP) & (mcells["metric"] == metric)]
            if len(fp):
                ax.axhline(fp["value"].iloc[0], color="black", ls="--", lw=1, label="fp")
                if fp["floor"].notna().any():
                    ax.axhline(fp["floor"].iloc[0], color="grey", ls=":", lw=1, label="real-data floor")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_ylabel(f"{metric} ({g['unit'].iloc[0]})")
            ax.set_title(f"{model}: {metric} vs bit width")
            ax.legend(fontsize=7)
            out.append((f"{model}: {metric} by bit width and method", _png(fig)))
            plt.close(fig)
        costs = quant[quant["kind"] == "cost"]["metric"].unique()
        qualities = quant[quant["kind"] == "quality"]["metric"].unique()
        for cost in costs:
            for quality in qualities[:1]:
                pts = quant.pivot_table(index=["method", "bits"], columns="metric", values="value")
                if cost not in pts or quality not in pts:
                    continue
                pts = pts[[cost, quality]].dropna()
                hib = bool(quant[quant["metric"] == quality]["higher_is_better"].iloc[0])
                fig, ax = plt.subplots(figsize=(6, 3.6))
                ax.scatter(pts[cost], pts[quality], color="tab:blue")
                for (method, bits), r in pts.iterrows():
                    ax.annotate(f"{method} {bits}", (r[cost], r[quality]), fontsize=6)
                front = _pareto(pts[cost].tolist(), pts[quality].tolist(), hib)
                ax.plot([pts[cost].iloc[i] for i in front], [pts[quality].iloc[i] for i in front], "r-", lw=1)
                unit = dict(zip(quant["metric"], quant["unit"], strict=True))
                ax.set_xlabel(f"{cost} ({unit[cost]})")
                ax.set_ylabel(f"{quality} ({unit[quality]})")
                ax.set_title(f"{model}: {quality} vs {cost} (red: Pareto front)")
                out.append((f"{model}: {quality} vs {cost}", _png(fig)))
                plt.close(fig)
    return out


def _pareto(cost: list[float], quality: list[float], higher_is_better: bool) -> list[int]:
    """Indices of non-dominated points (lower cost, better quality), sorted by cost."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -sign * quality[i]))
    front, best = [], -math.inf
    for i in order:
        if sign * quality[i] > best:
            front.append(i)
            best = sign * quality[i]
    return front


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td.name{text-align:left}
td.best{background:#e3f6e3;font-weight:bold} td.error{background:#fde8e8;color:#a00}
td.skipped{background:#f3f3f3;color:#777} td.ref{color:#555}
img{max-width:100%;display:block;margin:.5em 0 1.5em}
"""


def to_html(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str,
) -> str:  # fmt: skip
    esc = html.escape
    notes: list[str] = []
    sections = []
    for heading, board in tables:
        head = "".join(f"<th>{esc(b)}<br>{esc(m)}</th>" for b, m in board.columns)
        body = []
        for (model, method), values in board.iterrows():
            tds = [f'<td class="name">{esc(model)}</td><td class="name">{esc(method)}</td>']
            for text in values:
                cls = "ref" if method == FP else ""
                if text.startswith(("error:", "skipped:")):
                    notes.append(f"{model} {method}: {text}")
                    status = text.split(":")[0]
                    tds.append(f'<td class="{status}" title="{esc(text)}">{status} [{len(notes)}]</td>')
                    continue
                if text.startswith("**"):
                    cls, text = "best", text.strip("*")
                tds.append(f'<td class="{cls}">{esc(text)}</td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        sections.append(
            f"<h2>{esc(heading)}</h2><table><tr><th>model</th><th>method</th>{head}</tr>{''.join(body)}</table>"
        )
    legend = "; ".join(_metric_legend(cells)).replace("`", "")
    floors = "".join(f"<li>{esc(f.replace('`', ''))}</li>" for f in _floors(cells))
    note_list = "".join(f"<li>{esc(n)}</li>" for n in notes)
    figures = "".join(
        f'<h3>{esc(cap)}</h3><img alt="{esc(cap)}" src="data:image/png;base64,{b64}">'
        for cap, b64 in plots(cells)
    )
    prov = "".join(
        f"<tr><th>{esc(k)}</th><td class='name'>{esc(v)}</td></tr>" for k, v in _provenance(df, invocations)
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
        f"</head><body><h1>{esc(title)}</h1><p>Cells: value (Δ vs the paired FP run); best per column "
        f"highlighted. Metrics: {esc(legend)}.</p><ul>{floors}</ul>"
        f"{''.join(sections)}<ol>{note_list}</ol>"
        f"<h2>Plots</h2>{figures or '<p>No ok quality cells to plot.</p>'}{times}"
        f"<h2>Over commits</h2><p>{TRENDS_HTML}</p>"
        f"<h2>Provenance</h2><table>{prov}</table></body></html>\n"
    )


def build(results: str | Path) -> Report:
    """The leaderboard of one matrix's results folder."""
    df = load(results)
    cells = cell_table(df)
    tables = boards(cells)
    title = f"Leaderboard: {', '.join(sorted(df['matrix'].dropna().unique()))}"
    invocations = ResultStore(results).invocations()
    return Report(
        to_markdown(tables, cells, df, invocations, title),
        to_html(tables, cells, df, invocations, title),
        cells,
    )


def write(results: str | Path, out: str | Path | None = None) -> tuple[Path, Path, Report]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: the results folder)."""
    report = build(results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(report.markdown, encoding="utf-8")
    page.write_text(report.html, encoding="utf-8")
    return md, page, report
