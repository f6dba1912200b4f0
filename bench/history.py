"""Trends over commits: every quality cell of every matrix under a results root, per commit.

Each row records the commit it was measured at (``git_sha``) and when (``started_at``); the
store keeps superseded rows, so the history of a cell is its rows grouped by commit (seeds
averaged, the newest row of a run and metric per commit), commits ordered by their first row.
``qdiff-bench report --history results/`` writes ``history.md`` (first and latest value of each
cell) and ``history.html`` (one plot per model and metric, a line per method and bit width).
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

import pandas as pd

from bench.errors import StoreError
from bench.fsio import write_atomic
from bench.report import CSS, _png, method_labels, protocol
from bench.store import ResultStore, load

# A history line: one cell measured one way (``settings``: sample count and a hash of the rest).
CELL = ["matrix", "model", "method", "bits", "metric", "settings"]


def history(root: str | Path) -> pd.DataFrame:
    """One row per (matrix, model, method, bits, metric, commit): mean value over seeds, date."""
    root = Path(root)
    folders = sorted(p.parent for p in root.glob("*/runs"))
    if not folders:
        raise StoreError(f"no results under {root} (expected {root}/<matrix>/runs/); run a matrix first")
    frames = []
    failing: dict[tuple, str] = {}
    for folder in folders:
        if not any(ResultStore(folder).runs.glob("*.jsonl")):
            continue  # a first run stopped before it finished: nothing to show yet
        df = load(folder, latest=False)  # sorted by start time
        # A cell whose newest run failed must not show its last good value as current.
        newest = df.groupby(["config_hash", "metric"], sort=False).tail(1)
        newest = newest[(newest["kind"] == "quality") & (newest["status"] != "ok")]
        labelled = newest.assign(method=method_labels(newest)) if len(newest) else newest
        for r in labelled.itertuples():
            failing[(folder.name, r.model, r.method, r.bits, r.metric)] = (
                f"{r.status} at {str(r.git_sha)[:8]}"
            )
        df = df[(df["status"] == "ok") & (df["kind"] == "quality")]
        if df.empty:
            continue
        df = df.assign(method=method_labels(df), matrix=folder.name, commit=df["git_sha"].str[:8])
        # Rows measured under different settings (samples, sampling, budget, evaluation) are
        # different lines, never one averaged value.
        df["settings"] = [
            f"n={n} #{hashlib.sha256(p.encode()).hexdigest()[:6]}"
            for n, p in zip(df["n_samples"], protocol(df), strict=True)
        ]
        # The newest row of each run and metric at each commit (a rerun at one commit supersedes).
        df = df.sort_values("started_at").groupby(["config_hash", "metric", "commit"], sort=False).tail(1)
        frames.append(df)
    if not frames:
        raise StoreError(f"no ok quality rows under {root}")
    df = pd.concat(frames)
    cell = CELL
    out = (
        df.groupby([*cell, "commit"], sort=False)
        .agg(value=("value", "mean"), date=("started_at", "min"), unit=("unit", "first"))
        .reset_index()
    )
    order = df.groupby("commit")["started_at"].min().sort_values()
    out["order"] = out["commit"].map({c: i for i, c in enumerate(order.index)})
    out = out.sort_values([*cell, "order"]).reset_index(drop=True)
    out.attrs["failing"] = failing  # (matrix, model, method, bits, metric) → "error at <commit>"
    return out


def summary(hist: pd.DataFrame) -> pd.DataFrame:
    """Per cell: commits measured, first and latest value and commit, change."""
    rows = []
    for key, g in hist.groupby(CELL, sort=False):
        first, last = g.iloc[0], g.iloc[-1]
        rows.append({**dict(zip(CELL, key, strict=True)),
                     "commits": len(g), "first": first["value"], "first_commit": first["commit"],
                     "latest": last["value"], "latest_commit": last["commit"],
                     "change": last["value"] - first["value"]})  # fmt: skip
    return pd.DataFrame(rows)


def plots(hist: pd.DataFrame) -> list[tuple[str, str]]:
    """(caption, base64 PNG): per matrix, model and metric, a line per method and bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits = hist.drop_duplicates("commit").sort_values("order")
    labels = [f"{c}\n{d[:10]}" for c, d in zip(commits["commit"], commits["date"], strict=True)]
    out = []
    for (matrix, model, metric), g in hist.groupby(["matrix", "model", "metric"], sort=False):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for (method, bits, settings), line in g.groupby(["method", "bits", "settings"], sort=False):
            ax.plot(line["order"], line["value"], marker="o", label=f"{method} {bits} {settings}")
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_ylabel(f"{metric} ({g['unit'].iloc[0]})")
        ax.set_title(f"{matrix} / {model}: {metric} over commits")
        ax.legend(fontsize=6, ncol=2)
        out.append((f"{matrix} / {model}: {metric}", _png(fig)))
        plt.close(fig)
    return out


def write(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write ``history.md`` and ``history.html`` into ``out`` (default: the results root)."""
    hist = history(root)
    table = summary(hist)
    head = "| matrix | model | method | bits | metric | settings | commits | first | latest | change |"
    lines = [
        f"# Quality over commits: {root}",
        "",
        "First and latest value of every quality cell (mean over seeds); plots in history.html.",
        "",
        head,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    failing = hist.attrs.get("failing", {})
    for r in table.itertuples():
        newest = failing.get((r.matrix, r.model, r.method, r.bits, r.metric))
        latest = f"{r.latest:.4g} ({r.latest_commit})" + (f"; **newest run: {newest}**" if newest else "")
        lines.append(
            f"| {r.matrix} | {r.model} | {r.method} | {r.bits} | {r.metric} | {r.settings} | {r.commits} | "
            f"{r.first:.4g} ({r.first_commit}) | {latest} | {r.change:+.3g} |"
        )
    markdown = "\n".join(lines) + "\n"
    esc = html.escape
    figures = "".join(
        f'<h3>{esc(cap)}</h3><img alt="{esc(cap)}" src="data:image/png;base64,{b64}">'
        for cap, b64 in plots(hist)
    )
    title = f"Quality over commits: {esc(str(root))}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style></head><body><h1>{title}</h1>{figures}</body></html>"
    )
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    md, html_path = out / "history.md", out / "history.html"
    write_atomic(md, markdown)
    write_atomic(html_path, page)
    return md, html_path, markdown
