"""The leaderboard as text: boards of cell texts (quality: method × (bits, metric); cost:
(method, bits[, compile]) × metric), the Markdown report and the terminal summary."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from bench import claims, markdown
from bench.report.cells import DERIVED, FP, best_cost, best_quality, includes_bases, simulated, time_split


class Shown(NamedTuple):
    """One board cell: what it says, its ``status`` (``ok``, ``error`` or ``skipped`` with the
    message as ``text``; ``missing`` where no run made it) and whether it is its column's best.
    Markdown and HTML each render it; nothing parses a rendering back."""

    text: str
    status: str = "ok"
    best: bool = False

    @property
    def failed(self) -> bool:
        return self.status in ("error", "skipped")

    def __str__(self) -> str:
        """The Markdown form."""
        if self.failed:
            return f"{self.status}: {self.text}"
        return f"**{self.text}**" if self.best else self.text


MISSING = Shown("—", "missing")


def leaderboard(cells: pd.DataFrame) -> pd.DataFrame:
    """The pivot: index (model, method), columns (bits, metric), values :class:`Shown` cells."""
    quant = cells[cells["method"] != FP]
    bits_labels = list(quant.sort_values("bits_rank")["bits"].drop_duplicates()) or ["FP"]
    metrics = list(dict.fromkeys(cells["metric"]))
    best = best_quality(quant)
    table: dict[tuple[str, str], dict[tuple[str, str], Shown]] = {}
    for c in cells.itertuples():
        row = table.setdefault((c.model, c.method), {})
        targets = bits_labels if c.method == FP else [c.bits]  # FP is every column's reference
        for bits in targets:
            row[(bits, c.metric)] = cell_text(c, is_best=(c.model, bits, c.metric, c.method) in best)
    columns = pd.MultiIndex.from_tuples(
        [(b, m) for b in bits_labels for m in metrics], names=["bits", "metric"]
    )
    index = pd.MultiIndex.from_tuples(
        sorted(table, key=lambda k: (k[0], k[1] != FP, k[1])), names=["model", "method"]
    )
    return pd.DataFrame(
        [[table[i].get(col, MISSING) for col in columns] for i in index], index=index, columns=columns
    )


TIME_UNITS = ("ms", "s")


def boards(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One board per metric kind present: (heading, board), quality first. Quality is method ×
    (bit width, metric); cost is (method, bit width) × metric, a handful of columns however
    many bit widths a matrix has, one board per machine (costs of two machines never share a
    table: a ratio between them would mean nothing)."""
    out = []
    if (cells["kind"] == "quality").any():
        out.append(("Quality", leaderboard(cells[cells["kind"] == "quality"])))
    cost = cells[cells["kind"] == "cost"]
    for machine, g in cost.groupby("machine", sort=False):
        out.append((f"Cost on {machine}", cost_board(g)))
    return out


def cost_board(cells: pd.DataFrame) -> pd.DataFrame:
    """Index (model, method, bits[, compile]), one column per cost metric (``metric (unit)``);
    FP first. The ``compile`` level appears when runs were timed both eager and compiled."""
    best = best_cost(cells)
    metrics = list(dict.fromkeys(cells["metric"]))
    units = dict(zip(cells["metric"], cells["unit"], strict=True))
    columns = [f"{m} ({units[m]})" for m in metrics]
    several = cells["compile"].nunique() > 1
    table: dict[tuple[str, ...], dict[str, Shown]] = {}
    for c in cells.sort_values("bits_rank").itertuples():
        text = cell_text(c, is_best=(c.model, c.method, c.bits, c.compile, c.metric, c.machine) in best)
        key = (c.model, c.method, c.bits, c.compile) if several else (c.model, c.method, c.bits)
        table.setdefault(key, {})[f"{c.metric} ({units[c.metric]})"] = text
    # A stable sort keeps the bit-width order the rows were added in.
    names = ["model", "method", "bits", "compile"] if several else ["model", "method", "bits"]
    index = pd.MultiIndex.from_tuples(sorted(table, key=lambda k: (k[0], k[1] != FP)), names=names)
    return pd.DataFrame(
        [[table[i].get(col, MISSING) for col in columns] for i in index], index=index, columns=columns
    )


def fmt(v: float, like: float | None = None) -> str:
    """``v`` with the decimals that suit the magnitude of ``like`` (default: ``v`` itself), so a
    cell's sd and delta read at the precision of its value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v if like is None else like)
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    # Below 1: three significant digits of ``like``, and ``v`` at the same decimals.
    return f"{v:.{2 - math.floor(math.log10(a))}f}"


def _signed(v: float, like: float) -> str:
    return f"{'+' if v >= 0 else '−'}{fmt(abs(v), like)}"


def _ratio_text(ratio: float, unit: str, baseline: str) -> str:
    if unit in TIME_UNITS:
        how = f"{1 / ratio:.2f}× faster" if ratio <= 1 else f"{ratio:.2f}× slower"
        return f"{how} than {baseline}"
    return f"{ratio:.2f}× {baseline}"


def cell_text(c, is_best: bool) -> Shown:
    """Quality: ``mean ± half-width (Δ ± half-width vs FP) #rank``, ``≈FP`` when the paired
    Δ's interval holds 0; cost: the value and its ratio to FP."""
    if c.status != "ok":
        return Shown(str(c.error), c.status)
    text = fmt(c.value) + _half_width_text(c)
    if math.isnan(c.low) and c.seeds > 1 and c.sd > 0:
        text += f" (sd {fmt(c.sd, c.value)})"
    if c.kind == "cost":
        # Cost reads as a ratio to the paired FP run, which it names (dtype, compile mode), and
        # to the fastest FP baseline where there are several: a time as faster/slower, a size
        # as a fraction.
        if c.method != FP and c.ratio > 0:
            text += f" ({_ratio_text(c.ratio, c.unit, c.baseline)})"
            fastest = getattr(c, "fastest_fp", None)
            if isinstance(fastest, str) and fastest != c.baseline and c.fastest_ratio > 0:
                text += f" ({_ratio_text(c.fastest_ratio, c.unit, fastest)})"
            reference = getattr(c, "reference", None)
            if isinstance(reference, str) and c.reference_ratio > 0:
                text += f" ({_ratio_text(c.reference_ratio, c.unit, reference)})"
        if simulated(c):
            text += " (simulated)"
    else:
        text += _paired_text(c)
    if includes_bases(c):
        text += f" (includes {c.weights_from})"
    if c.set_aside:
        text += f" [{c.set_aside} older row(s) with other settings not averaged in]"
    return Shown(text, best=is_best)


def summary_text(cells: pd.DataFrame, width: int = 100) -> str:
    """The quality leaderboard for a terminal: per model and quality metric, method × bit width,
    ``mean ± half-width (Δ to FP ± half-width) #rank``, bit-width columns wrapped to ``width``
    characters. Cost and the rest are in the report files."""
    quality = cells[cells["kind"] == "quality"]
    out = []
    for (model, metric), g in quality.groupby(["model", "metric"], sort=False):
        quant = g[g["method"] != FP].sort_values("bits_rank")
        bits = list(dict.fromkeys(quant["bits"])) or ["FP"]
        methods = list(dict.fromkeys(g.sort_values("method", key=lambda m: m != FP)["method"]))
        text = {}
        for c in g.itertuples():
            cell = _plain(c)
            for b in bits if c.method == FP else [c.bits]:
                text[(c.method, b)] = cell
        name_w = max(len("method"), *map(len, methods))
        col_w = max(len(t) for t in [*bits, *text.values()])
        per_line = max(1, (width - name_w) // (col_w + 2))
        arrow = "higher" if g["higher_is_better"].iloc[0] else "lower"
        out.append(f"{model}: {metric} ({g['unit'].iloc[0]}, {arrow} is better)")
        for i in range(0, len(bits), per_line):
            chunk = bits[i : i + per_line]
            out.append(f"{'method':<{name_w}}" + "".join(f"  {b:<{col_w}}" for b in chunk).rstrip())
            for m in methods:
                row = "".join(f"  {text.get((m, b), '—'):<{col_w}}" for b in chunk)
                out.append(f"{m:<{name_w}}{row}".rstrip())
        out.append("")
    failed = cells[cells["status"] != "ok"].drop_duplicates("error")
    for c in failed.head(FAILURES_SHOWN).itertuples():
        out.append(f"{c.status}: {c.model} {c.method} {c.bits}: {c.error}")  # whole: it says the fix
    if len(failed) > FAILURES_SHOWN:
        out.append(f"… and {len(failed) - FAILURES_SHOWN} more failure(s): see the report")
    legend = (
        "mean ± 95 % half-width (bootstrap over images; Student's t over several runs)\n"
        "(Δ to FP on the same noise ± half-width); #rank, tied within noise"
    )
    return "\n".join([legend, "", *out]).rstrip() + "\n"


FAILURES_SHOWN = 5  # distinct failure messages under the terminal summary


def _plain(c) -> str:
    """A terminal cell: the value, its interval, the paired Δ and the rank; a failed cell says
    its status only (the message is in the report)."""
    if c.status != "ok":
        return c.status
    return fmt(c.value) + _half_width_text(c) + _paired_text(c)


def _half_width_text(c) -> str:
    """`` ± half-width`` of a cell's interval, or nothing without one."""
    return "" if math.isnan(c.low) else f" ± {fmt((c.high - c.low) / 2, c.value)}"


def _paired_text(c) -> str:
    """A quantized quality cell's `` (Δ ± half-width[, ≈FP]) #rank``, each part where known."""
    text = ""
    if c.method != FP and not math.isnan(c.delta):
        delta = _signed(c.delta, c.value)
        if not math.isnan(c.delta_low):
            delta += f" ± {fmt((c.delta_high - c.delta_low) / 2, c.value)}"
        text += f" ({delta}{', ≈FP' if c.within_noise else ''})"
    if c.method != FP and not math.isnan(c.rank):
        text += f" #{int(c.rank)}"
    return text


CELLS_LEGEND = (
    "Quality cells: mean ± 95 % interval half-width over the cell's runs (sampling seeds × "
    "calibration seeds; a bootstrap over images for one run, Student's t on the runs' spread for "
    "several), then the paired Δ to the FP run from "
    "the same noise ± its half-width, '≈FP' where that interval holds 0, and the rank among the "
    "column's methods, tied where intervals overlap (#1 in bold where the ranks separate). "
    "Cost cells: the value and its ratio to the paired FP run (named: its dtype and compile mode) and, "
    "where FP was also timed another way, to the fastest FP, and, where the folder holds a runtime's "
    "own PTQ deployment (NNCF on OpenVINO), to that on the same machine; in bold only where it "
    "beats its paired FP by more than 5 %; memory is the deployed model's (its resident weights "
    "plus the sampling's working memory, nothing else the benchmark holds); latency and memory of simulated "
    "(fake-quant) models are marked 'simulated': they say nothing about deployment."
)


def column_text(column) -> str:
    """A board column's heading: ``W4A8 digits_fd`` (quality) or ``latency_step (ms)`` (cost)."""
    return " ".join(column) if isinstance(column, tuple) else str(column)


def _invocation_text(inv: dict) -> str:
    if inv.get("executor") == "ray":  # workers are the cluster's processes: their RSS is not ours
        how = (
            f"on Ray ({inv.get('address')}, {len(inv.get('run_nodes') or [])} node(s)), "
            f"{inv['threads_per_worker']} thread(s) per CPU run, "
            f"peak RSS {inv['peak_rss_main_mib']:.0f} MiB (driver)"
        )
    else:
        how = (
            f"{inv['workers']} worker(s) × {inv['threads_per_worker']} thread(s), peak RSS "
            f"{inv['peak_rss_main_mib']:.0f} MiB (main) / "
            f"{inv['peak_rss_worker_mib']:.0f} MiB (largest worker)"
        )
    return (
        f"{inv['started_at'][:19]}: {inv['runs']} runs in {inv['wall_s']:.0f} s wall, {how}, "
        f"{inv['cache_files_at_start']} cache files at start, commit {inv['git_sha'][:12]}"
    )


def provenance(df: pd.DataFrame, invocations: list[dict]) -> list[tuple[str, str]]:
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
        (
            "hosts (Ray nodes)",
            values("host") + (f" ({values('node')})" if "node" in df and df["node"].notna().any() else ""),
        ),
        (
            "CPU (vector ISA flags; torch's kernels)",
            f"{values('cpu_model')} ({values('cpu_flags')}; {values('cpu_capability')})",
        ),
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


TIME_HEADER = ("run", "generate (s)", "measure (s)", "slowest metric (s)")


def metric_legend(cells: pd.DataFrame) -> list[str]:
    out = []
    for metric, g in cells.groupby("metric", sort=False):
        arrow = "higher is better" if g["higher_is_better"].iloc[0] else "lower is better"
        what = f": {DERIVED[metric][3]}" if metric in DERIVED else ""
        out.append(f"`{metric}` ({g['unit'].iloc[0]}, {arrow}{what})")
    return out


def floors(cells: pd.DataFrame) -> list[str]:
    fp = cells[(cells["method"] == FP) & cells["floor"].notna()]
    return [
        f"{r.model} `{r.metric}`: floor {fmt(r.floor)} ± {fmt(r.floor_sd, r.floor)} at the same sample "
        "count (what a perfect model of the training data scores)"
        for r in fp.itertuples()
    ]


def to_markdown(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str, ratios: list[tuple[str, ...]], pictures: list[str] = (),
) -> str:  # fmt: skip
    """The report as Markdown; ``pictures``: its "Samples" section's lines."""
    notes: list[str] = []
    lines = [f"# {title}", "", CELLS_LEGEND, ""]
    lines.append("Metrics: " + "; ".join(metric_legend(cells)) + ".")
    lines.extend(["", *[f"- {f}" for f in floors(cells)]])
    for heading, board in tables:
        rows = []
        for key, values in board.iterrows():
            shown = []
            for cell in values:
                text = str(cell)
                if cell.failed:
                    notes.append(f"{' '.join(key)}: {text}")
                    text = f"{cell.status} [{len(notes)}]"
                shown.append(text)
            rows.append([*key, *shown])
        header = [*board.index.names, *map(column_text, board.columns)]
        lines.extend(["", f"## {markdown.line(heading)}", "", *markdown.table(header, rows)])
    if notes:
        lines.extend(["", *[f"[{i}] {markdown.line(n)}" for i, n in enumerate(notes, 1)]])
    lines.extend(claims.to_markdown(ratios))
    lines.extend(pictures)
    split = time_split(df)
    if split:
        lines.extend(["", "## Where the time went", "", *markdown.table(TIME_HEADER, split)])
    lines.extend(["", "## Over commits", "", TRENDS_MD])
    lines.extend(["", "## Provenance", "", *markdown.table(["", ""], provenance(df, invocations))])
    return "\n".join(lines) + "\n"


# Where the history of these numbers lives: one self-contained page, nothing linked that may not
# exist (asv's own HTML needs `asv publish` and loads its scripts from a CDN).
TRENDS_MD = (
    "Quality of every cell over commits and machines, and asv's speed and memory benchmarks over "
    "commits (`tox -e asv` measures them): `qdiff-bench report --history results/` writes "
    "history.md and a self-contained history.html into the results root."
)
