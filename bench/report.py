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
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench import claims, stats
from bench.fsio import write_atomic
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


# What must be equal for rows to be averaged into one cell or compared across folders: sample
# count, sampling, the quantization budget (the calibration seed aside: it is an axis), the
# evaluation settings the metric reads — and, for cost cells, the machine.
MACHINE = ("device", "cpu_model", "cpu_capability")


def protocol(df: pd.DataFrame, with_machine: bool = True) -> list[str]:
    """Each row's measurement protocol as canonical text (see the comment above); without the
    machine for comparing folders, where a cost cell's machine is checked on its own."""
    from bench.errors import UnknownNameError
    from bench.registry import METRICS

    def settings(metric: str) -> tuple[str, ...] | None:
        try:
            return METRICS.get(metric).settings
        except UnknownNameError:  # a metric since renamed or removed: all its settings count
            return None

    def one(r: dict) -> str:
        sampling = r.get("sampling") if isinstance(r.get("sampling"), dict) else {}
        sampling = {k: v for k, v in sampling.items() if (k, v) != ("dtype", "float32")}
        budget = r.get("budget") if isinstance(r.get("budget"), dict) else None
        if budget is not None:
            budget = {k: v for k, v in budget.items() if k not in ("calib_seed", "backend")}
        evaluation = r.get("evaluation") if isinstance(r.get("evaluation"), dict) else {}
        used = settings(r["metric"])
        if used is not None:
            evaluation = {k: v for k, v in evaluation.items() if k in used}
        key = {"n": r.get("n_samples"), "sampling": sampling, "budget": budget, "evaluation": evaluation}
        if with_machine and r.get("kind") == "cost":
            key["machine"] = [r.get(c) for c in MACHINE]
        return json.dumps(key, sort_keys=True, default=str)

    return [one(r) for r in df.to_dict("records")]


CELL = ["model", "method", "bits", "compile", "metric"]
DTYPE_LABELS = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def compile_modes(df: pd.DataFrame) -> list[str]:
    """Each row's ``torch.compile`` mode as its metric read it (``off`` where it reads none)."""
    evaluations = df["evaluation"] if "evaluation" in df else [None] * len(df)
    return [e.get("compile", "off") if isinstance(e, dict) else "off" for e in evaluations]


def baseline_label(sampling: dict | None, compile_mode: str) -> str:
    """The FP run a cost ratio is taken against, in words: ``FP32 eager``, ``FP16 inductor``."""
    dtype = sampling.get("dtype", "float32") if isinstance(sampling, dict) else "float32"
    return f"{DTYPE_LABELS.get(dtype, dtype)} {'eager' if compile_mode == 'off' else compile_mode}"


def _interval(values: pd.Series, boots: pd.Series) -> tuple[float, float, float]:
    """Mean and t interval of a cell's runs (:func:`bench.stats.combine`); NaN bounds when a run has no
    replicates (rows written before intervals existed)."""
    values = values.astype(float)
    if not len(values):
        return math.nan, math.nan, math.nan
    if any(not isinstance(b, list) or not b for b in boots):
        return float(values.mean()), math.nan, math.nan
    ci = stats.combine(list(values), list(boots))
    return ci.estimate, ci.low, ci.high


# A ``latency_step`` row also carries that step's deployed memory (``step_peak_mib``): the
# boards show it as a cost metric of its own.
STEP_MEMORY = "step_memory"


def with_step_memory(df: pd.DataFrame) -> pd.DataFrame:
    if "step_peak_mib" not in df:
        return df
    steps = df[(df["metric"] == "latency_step") & df["step_peak_mib"].notna()].copy()
    if not len(steps):
        return df
    steps["metric"], steps["unit"], steps["higher_is_better"] = STEP_MEMORY, "MiB", False
    steps["value"] = steps["step_peak_mib"]
    for col in ("boot", "delta_boot", "delta"):
        if col in steps:
            steps[col] = None
    return pd.concat([df, steps], ignore_index=True)


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the latest rows over seeds: one row per (model, method, bits, metric).

    A cell averages its runs (sampling seeds × calibration seeds) measured alike: where rows
    of one cell were measured under different protocols (another sample count, budget,
    sampling, evaluation setting or, for cost, machine), only the newest protocol's rows
    count and the others are counted in ``set_aside``. Columns: value (mean), low/high (its
    95 % interval), sd, seeds (runs), delta (mean paired difference to FP) and
    delta_low/delta_high, within_noise (the delta's interval holds 0), rank (ties where
    intervals overlap), status, error, unit, higher_is_better, kind, extras of the FP row.
    """
    df = with_step_memory(df)
    df["method"] = method_labels(df)
    df["compile"] = compile_modes(df)
    df["protocol"] = protocol(df)
    newest = df.sort_values("started_at").groupby(CELL, sort=False)["protocol"].last()
    current = [
        newest[tuple(k)] == p for k, p in zip(df[CELL].itertuples(index=False), df["protocol"], strict=True)
    ]
    set_aside = df[[not c for c in current]].groupby(CELL, sort=False).size()
    df = df[current]
    for col in ("boot", "delta_boot", "delta", "floor", "floor_sd"):
        if col not in df:
            df[col] = None
    # A cost is paired with its FP run's only when both were measured on one machine type (a
    # cluster may place the two runs on different nodes): a ratio across machines means nothing.
    records = df.to_dict("records")
    machine = [tuple(r.get(c) for c in MACHINE) if r.get("kind") == "cost" else () for r in records]
    fp_value = {
        (r["config_hash"], r["metric"], m): r["value"]
        for r, m in zip(records, machine, strict=True)
        if r["method"] == FP and r["status"] == "ok"
    }
    paired = [
        fp_value.get((r["reference_hash"], r["metric"], m), math.nan) if r["status"] == "ok" else math.nan
        for r, m in zip(records, machine, strict=True)
    ]
    # Rows that measured their own paired delta (same resampled images) keep it.
    own = [isinstance(d, int | float) and not pd.isna(d) for d in df["delta"]]
    values = df["value"].astype(float)
    df["delta"] = [d if o else v - p for d, o, v, p in zip(df["delta"], own, values, paired, strict=True)]
    df["ratio"] = df["value"].astype(float) / paired
    # Columns from least to most aggressive: W8A8, W4A32, W4A8, ...
    precision = {r.bits: (-(r.w_bits or 32), -(r.a_bits or 32)) for r in df.itertuples() if r.bits != "FP"}
    bits_order = ["FP", *sorted(precision, key=precision.get)]
    records = []
    for (model, method, bits, compile_mode, metric), g in df.groupby(CELL, sort=False):
        good = g[g["status"] == "ok"]
        bad = g[g["status"] != "ok"]
        first = g.iloc[0]
        value, low, high = _interval(good["value"], good["boot"])
        if method != FP and good["delta_boot"].map(lambda b: isinstance(b, list)).all() and len(good):
            delta, d_low, d_high = _interval(good["delta"], good["delta_boot"])
        else:
            delta = good["delta"].astype(float).mean() if len(good) else math.nan
            d_low = d_high = math.nan
        records.append(
            {
                "model": model,
                "method": method,
                "bits": bits,
                "compile": compile_mode,
                "baseline": baseline_label(first.get("sampling"), compile_mode),
                "metric": metric,
                "value": value,
                "low": low,
                "high": high,
                "sd": good["value"].astype(float).std() if len(good) > 1 else math.nan,
                "seeds": len(good),
                "delta": delta,
                "delta_low": d_low,
                "delta_high": d_high,
                "within_noise": bool(d_low <= 0 <= d_high) if not math.isnan(d_low) else False,
                "ratio": good["ratio"].mean() if len(good) else math.nan,
                "status": bad.iloc[-1]["status"] if len(bad) else "ok",
                "error": bad.iloc[-1]["error"] if len(bad) else None,
                "unit": first["unit"],
                "higher_is_better": bool(first["higher_is_better"]),
                "kind": first.get("kind", "quality") if isinstance(first.get("kind"), str) else "quality",
                "weights_from": _first(good, "weights_from"),
                "backend": _first(good, "backend"),  # cost rows: what ran ("fake": simulated)
                "floor": good["floor"].astype(float).mean() if good["floor"].notna().any() else math.nan,
                "floor_sd": good["floor_sd"].astype(float).mean()
                if good["floor_sd"].notna().any()
                else math.nan,
                "bits_rank": bits_order.index(bits),
                "set_aside": int(set_aside.get((model, method, bits, compile_mode, metric), 0)),
            }
        )
    cells = pd.DataFrame.from_records(records)
    cells["rank"] = _ranks(cells)
    cells["fastest_fp"], cells["fastest_ratio"] = _fastest_fp(cells)
    return cells


def _fastest_fp(cells: pd.DataFrame) -> tuple[list, list]:
    """For cost cells of a model measured against several FP baselines (eager and compiled):
    the best FP baseline's label and each cell's ratio to it, so that a quantized model timed
    eager is also read against compiled FP. None where the model has one FP baseline."""
    best: dict[tuple[str, str], tuple[str, float]] = {}
    fp = cells[(cells["method"] == FP) & (cells["kind"] == "cost") & (cells["status"] == "ok")]
    for (model, metric), g in fp.groupby(["model", "metric"]):
        if g["compile"].nunique() > 1:
            top = g.loc[g["value"].idxmax() if g["higher_is_better"].iloc[0] else g["value"].idxmin()]
            best[(model, metric)] = (top["baseline"], float(top["value"]))
    labels, ratios = [], []
    for c in cells.itertuples():
        label, value = best.get((c.model, c.metric), (None, math.nan))
        labels.append(label)
        ratios.append(c.value / value if label is not None and c.method != FP else math.nan)
    return labels, ratios


def _ranks(cells: pd.DataFrame) -> list[float]:
    """Rank of each quantized quality cell among the methods of its (model, bits, metric),
    tied where intervals overlap: by the paired delta's interval where every method has one
    (the FP run's own noise is common to all), else by the value's."""
    ranks = pd.Series(math.nan, index=cells.index)
    quality = cells[(cells["method"] != FP) & (cells["kind"] == "quality") & (cells["status"] == "ok")]
    for _, g in quality.groupby(["model", "bits", "metric"], sort=False):
        if len(g) < 2:
            continue
        cols = (
            ("delta", "delta_low", "delta_high") if g["delta_low"].notna().all() else ("value", "low", "high")
        )
        if g[cols[1]].isna().any():
            continue
        intervals = list(zip(*(g[c] for c in cols), strict=True))
        ranks[g.index] = stats.tie_ranks(intervals, bool(g["higher_is_better"].iloc[0]))
    return list(ranks)


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
# Costs that include those of the models a method refines (its ``bases``, ``weights_from``).
INCLUDES_BASES = ("quantize_time",)


def boards(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One board per metric kind present: (heading, board), quality first. Quality is method ×
    (bit width, metric); cost is (method, bit width) × metric, a handful of columns however
    many bit widths a matrix has."""
    out = []
    if (cells["kind"] == "quality").any():
        out.append(("Quality", leaderboard(cells[cells["kind"] == "quality"])))
    if (cells["kind"] == "cost").any():
        out.append(("Cost", cost_board(cells[cells["kind"] == "cost"])))
    return out


def cost_board(cells: pd.DataFrame) -> pd.DataFrame:
    """Index (model, method, bits[, compile]), one column per cost metric (``metric (unit)``);
    FP first. The ``compile`` level appears when runs were timed both eager and compiled."""
    best = _best_cost(cells)
    metrics = list(dict.fromkeys(cells["metric"]))
    units = dict(zip(cells["metric"], cells["unit"], strict=True))
    columns = [f"{m} ({units[m]})" for m in metrics]
    several = cells["compile"].nunique() > 1
    table: dict[tuple[str, ...], dict[str, str]] = {}
    for c in cells.sort_values("bits_rank").itertuples():
        text = _cell_text(c, is_best=(c.model, c.method, c.bits, c.compile, c.metric) in best)
        key = (c.model, c.method, c.bits, c.compile) if several else (c.model, c.method, c.bits)
        table.setdefault(key, {})[f"{c.metric} ({units[c.metric]})"] = text
    # A stable sort keeps the bit-width order the rows were added in.
    names = ["model", "method", "bits", "compile"] if several else ["model", "method", "bits"]
    index = pd.MultiIndex.from_tuples(sorted(table, key=lambda k: (k[0], k[1] != FP)), names=names)
    return pd.DataFrame(
        [[table[i].get(col, "—") for col in columns] for i in index], index=index, columns=columns
    )


def _best(quant: pd.DataFrame) -> set[tuple[str, str, str, str]]:
    """Per (model, bits, metric): quality cells ranked first where the ranks separate at least
    two groups (all tied: nothing is best)."""
    best = set()
    quality = quant[(quant["status"] == "ok") & (quant["kind"] == "quality")]
    for (model, bits, metric), g in quality.groupby(["model", "bits", "metric"]):
        if len(g) >= 2 and g["rank"].notna().all() and g["rank"].max() > 1:
            best.update((model, bits, metric, m) for m in g[g["rank"] == 1]["method"])
    return best


# A cost cell is highlighted only when it beats its paired FP run by more than this (timing
# noise between repeated runs is a few per cent), and only if it was measured on a real backend.
REAL_IMPROVEMENT = 0.05
SIMULATED_COSTS = (
    "latency_step",
    "latency_e2e",
    "peak_memory",
    STEP_MEMORY,
)  # meaningless on the fake backend


def _simulated(c) -> bool:
    return c.metric in SIMULATED_COSTS and c.backend == "fake"


def _best_cost(cells: pd.DataFrame) -> set[tuple[str, str, str, str, str]]:
    """Per (model, metric): the quantized cells that improve on FP by more than
    :data:`REAL_IMPROVEMENT` and are within it of the best of them (none if none improves, if FP
    has no value to beat, or if every cell of the column ties)."""
    best = set()
    quant = cells[(cells["method"] != FP) & (cells["status"] == "ok")]
    for (model, metric), column in quant.groupby(["model", "metric"]):
        g = column[[not _simulated(c) for c in column.itertuples()]].dropna(subset=["ratio"])
        g = g[g["ratio"] > 1 + REAL_IMPROVEMENT] if g["higher_is_better"].any() else g[
            g["ratio"] < 1 - REAL_IMPROVEMENT]  # fmt: skip
        if not len(g):
            continue
        # Cells within REAL_IMPROVEMENT of the best tie with it; when the whole column ties,
        # nothing stands out and nothing is bold.
        sign = 1 if g["higher_is_better"].iloc[0] else -1
        top = (sign * g["value"]).max()
        tied = g[sign * g["value"] >= top - REAL_IMPROVEMENT * abs(top)]
        if len(tied) < len(column) or len(column) == 1:
            best.update((model, r.method, r.bits, r.compile, metric) for r in tied.itertuples())
    return best


def _fmt(v: float, like: float | None = None) -> str:
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
    return f"{'+' if v >= 0 else '−'}{_fmt(abs(v), like)}"


def _ratio_text(ratio: float, unit: str, baseline: str) -> str:
    if unit in TIME_UNITS:
        how = f"{1 / ratio:.2f}× faster" if ratio <= 1 else f"{ratio:.2f}× slower"
        return f"{how} than {baseline}"
    return f"{ratio:.2f}× {baseline}"


def _cell_text(c, is_best: bool) -> str:
    """Quality: ``mean ± half-width (Δ ± half-width vs FP) #rank``, ``≈FP`` when the paired
    Δ's interval holds 0; cost: the value and its ratio to FP."""
    if c.status != "ok":
        return f"{c.status}: {c.error}"
    text = _fmt(c.value) + _half_width_text(c)
    if math.isnan(c.low) and c.seeds > 1 and c.sd > 0:
        text += f" (sd {_fmt(c.sd, c.value)})"
    if c.kind == "cost":
        # Cost reads as a ratio to the paired FP run, which it names (dtype, compile mode), and
        # to the fastest FP baseline where there are several: a time as faster/slower, a size
        # as a fraction.
        if c.method != FP and c.ratio > 0:
            text += f" ({_ratio_text(c.ratio, c.unit, c.baseline)})"
            fastest = getattr(c, "fastest_fp", None)
            if isinstance(fastest, str) and fastest != c.baseline and c.fastest_ratio > 0:
                text += f" ({_ratio_text(c.fastest_ratio, c.unit, fastest)})"
        if _simulated(c):
            text += " (simulated)"
    else:
        text += _paired_text(c)
    if c.metric in INCLUDES_BASES and isinstance(c.weights_from, str):
        text += f" (includes {c.weights_from})"
    if c.set_aside:
        text += f" [{c.set_aside} older row(s) with other settings not averaged in]"
    return f"**{text}**" if is_best else text


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
    return _fmt(c.value) + _half_width_text(c) + _paired_text(c)


def _half_width_text(c) -> str:
    """`` ± half-width`` of a cell's interval, or nothing without one."""
    return "" if math.isnan(c.low) else f" ± {_fmt((c.high - c.low) / 2, c.value)}"


def _paired_text(c) -> str:
    """A quantized quality cell's `` (Δ ± half-width[, ≈FP]) #rank``, each part where known."""
    text = ""
    if c.method != FP and not math.isnan(c.delta):
        delta = _signed(c.delta, c.value)
        if not math.isnan(c.delta_low):
            delta += f" ± {_fmt((c.delta_high - c.delta_low) / 2, c.value)}"
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
    "where FP was also timed another way, to the fastest FP; in bold only where it beats its paired "
    "FP by more than 5 %; memory is the deployed model's (its resident weights plus the sampling's "
    "working memory, nothing else the benchmark holds); latency and memory of simulated "
    "(fake-quant) models are marked 'simulated': they say nothing about deployment."
)


def _column(column) -> str:
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
        calib = first["budget"].get("calib_seed") if isinstance(first.get("budget"), dict) else None
        out.append((
            f"{first['model']} {first['method']} {first['bits']}" + ("" if calib is None else f" c{calib}"),
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
        what = ": the deployed model's resident weights plus one latency_step call's working memory"
        out.append(f"`{metric}` ({g['unit'].iloc[0]}, {arrow}{what if metric == STEP_MEMORY else ''})")
    return out


def _floors(cells: pd.DataFrame) -> list[str]:
    fp = cells[(cells["method"] == FP) & cells["floor"].notna()]
    return [
        f"{r.model} `{r.metric}`: floor {_fmt(r.floor)} ± {_fmt(r.floor_sd, r.floor)} at the same sample "
        "count (what a perfect model of the training data scores)"
        for r in fp.itertuples()
    ]


def to_markdown(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str, ratios: list[tuple[str, ...]],
) -> str:  # fmt: skip
    notes: list[str] = []
    lines = [f"# {title}", "", CELLS_LEGEND, ""]
    lines.append("Metrics: " + "; ".join(_metric_legend(cells)) + ".")
    lines.extend(["", *[f"- {f}" for f in _floors(cells)]])
    for heading, board in tables:
        header = [*board.index.names, *map(_column, board.columns)]
        lines.extend(["", f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        for key, values in board.iterrows():
            shown = []
            for text in values:
                if text.startswith(("error:", "skipped:")):
                    notes.append(f"{' '.join(key)}: {text}")
                    text = f"{text.split(':')[0]} [{len(notes)}]"
                shown.append(text.replace("|", "\\|"))
            lines.append("| " + " | ".join([*key, *shown]) + " |")
    if notes:
        lines.extend(["", *[f"[{i}] {n}" for i, n in enumerate(notes, 1)]])
    lines.extend(claims.to_markdown(ratios))
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


# Where the history of these numbers lives: one self-contained page, nothing linked that may not
# exist (asv's own HTML needs `asv publish` and loads its scripts from a CDN).
TRENDS_MD = (
    "Quality of every cell over commits and machines, and asv's speed and memory benchmarks over "
    "commits (`tox -e asv` measures them): `qdiff-bench report --history results/` writes "
    "history.md and a self-contained history.html into the results root."
)
TRENDS_HTML = (
    "Quality of every cell over commits and machines, and asv's speed and memory benchmarks over "
    "commits (<code>tox -e asv</code> measures them): <code>qdiff-bench report --history "
    "results/</code> writes history.md and a self-contained history.html into the results root."
)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def line_styles(n: int) -> list[dict]:
    """``n`` distinguishable line styles: 20 colours (tab20's ten hues, then their light shades),
    with markers and dashes that vary too, so no two lines of a plot look alike."""
    import matplotlib

    pairs = matplotlib.colormaps["tab20"].colors  # dark/light pairs of 10 hues: the 10 hues first
    colours = pairs[0::2] + pairs[1::2]
    markers, dashes = "osD^vP*X", ("-", "--", ":", "-.")
    return [
        {"color": colours[i % 20], "marker": markers[(i // 20 + i) % len(markers)],
         "linestyle": dashes[(i // 20) % len(dashes)], "markersize": 4, "linewidth": 1.2}
        for i in range(n)
    ]  # fmt: skip


def _label_points(ax, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Labels beside their markers, on a white ground, stepped apart where points crowd (within
    4 % of the axes of a point labelled before), so none hides under a marker or another label."""
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, int]] = []
    for x, y, text in sorted(zip(xs, ys, labels, strict=True)):
        crowd = sum(abs(x - px) < 0.04 * x_span and abs(y - py) < 0.04 * y_span for px, py, _ in placed)
        placed.append((x, y, crowd))
        ground = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}
        ax.annotate(
            text, (x, y), xytext=(6, 4 - 9 * crowd), textcoords="offset points", fontsize=7, bbox=ground
        )


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
            fig, ax = plt.subplots(figsize=(7, 3.8))
            groups = list(g.groupby("method", sort=False))
            for i, ((method, mg), style) in enumerate(zip(groups, line_styles(len(groups)), strict=True)):
                # Methods side by side within a bit width, so their intervals do not overlap.
                xs = [labels.index(b) + 0.06 * (i - len(groups) / 2) for b in mg["bits"]]
                err = [mg["value"] - mg["low"], mg["high"] - mg["value"]] if mg["low"].notna().all() else None
                ax.errorbar(xs, mg["value"], yerr=err, capsize=2, label=method, **style)
            fp = mcells[(mcells["method"] == FP) & (mcells["metric"] == metric)]
            if len(fp):
                ax.axhline(fp["value"].iloc[0], color="black", ls="--", lw=1, label="fp")
                if fp["floor"].notna().any():
                    ax.axhline(fp["floor"].iloc[0], color="grey", ls=":", lw=1, label="floor")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.set_ylabel(f"{metric} ({g['unit'].iloc[0]})")
            ax.set_title(f"{model}: {metric} vs bit width")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
            out.append((f"{model}: {metric} by bit width and method", _png(fig)))
            plt.close(fig)
        costs = quant[quant["kind"] == "cost"]["metric"].unique()
        qualities = quant[quant["kind"] == "quality"]["metric"].unique()
        # Latency and memory of simulated models say nothing about deployment: a front drawn
        # through them would rank methods by how slowly they simulate.
        real = quant[[not _simulated(c) for c in quant.itertuples()]]
        for cost in costs:
            for quality in qualities[:1]:
                pts = real.pivot_table(index=["method", "bits"], columns="metric", values="value")
                if cost not in pts or quality not in pts:
                    continue
                pts = pts[[cost, quality]].dropna()
                spread = pts[cost].max() - pts[cost].min() if len(pts) else 0.0
                if len(pts) < 2 or spread <= REAL_IMPROVEMENT * abs(pts[cost].mean()):
                    continue  # one point, or costs within 5 % of each other: no trade-off to draw
                hib = bool(quant[quant["metric"] == quality]["higher_is_better"].iloc[0])
                fig, ax = plt.subplots(figsize=(7, 4))
                ax.scatter(pts[cost], pts[quality], color="tab:blue", zorder=3)
                _label_points(ax, list(pts[cost]), list(pts[quality]), [f"{m} {b}" for m, b in pts.index])
                front = _pareto(pts[cost].tolist(), pts[quality].tolist(), hib)
                ax.plot([pts[cost].iloc[i] for i in front], [pts[quality].iloc[i] for i in front], "r-", lw=1)
                unit = dict(zip(quant["metric"], quant["unit"], strict=True))
                ax.set_xlabel(f"{cost} ({unit[cost]})")
                ax.set_ylabel(f"{quality} ({unit[quality]})")
                ax.set_title(f"{model}: {quality} vs {cost} (red: Pareto front)")
                out.append((f"{model}: {quality} vs {cost}", _png(fig)))
                plt.close(fig)
    return out


def eps_plots(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(caption, base64 PNG): per model and bit width, each method's ε error against FP per
    sampler step (``eps_mse`` rows, mean over runs): where along the trajectory a method loses
    accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "per_step" not in df:
        return []
    rows = df[(df["metric"] == "eps_mse") & (df["status"] == "ok") & df["per_step"].notna()]
    out = []
    for (model, bits), g in rows.assign(method=method_labels(rows)).groupby(["model", "bits"], sort=False):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        groups = list(g.groupby("method", sort=False))
        for (method, mg), style in zip(groups, line_styles(len(groups)), strict=True):
            curve = np.mean([np.asarray(p, dtype=float) for p in mg["per_step"]], axis=0)
            ax.plot(mg["timesteps"].iloc[0], curve, label=f"{method} ({len(mg)} run(s))", **style)
        ax.set_yscale("log")
        ax.set_xlabel("timestep t (sampling runs from right to left)")
        ax.set_ylabel("ε MSE vs FP")
        ax.invert_xaxis()
        ax.set_title(f"{model} {bits}: noise-prediction error along the trajectory")
        ax.legend(fontsize=7)
        out.append((f"{model} {bits}: ε error per sampler step (held-out FP trajectories)", _png(fig)))
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
div.wide td{white-space:nowrap} div.wide td.error,div.wide td.skipped{white-space:normal;max-width:20em}
div.wide{overflow-x:auto;max-width:100%} span.sub{font-size:.85em;color:#444}
img{max-width:100%;display:block;margin:.5em 0 1.5em}
"""


def to_html(
    tables: list[tuple[str, pd.DataFrame]], cells: pd.DataFrame, df: pd.DataFrame, invocations: list[dict],
    title: str, ratios: list[tuple[str, ...]],
) -> str:  # fmt: skip
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
            for text in values:
                cls = "ref" if method == FP else ""
                if text.startswith(("error:", "skipped:")):
                    notes.append(f"{' '.join(key)}: {text}")
                    status = text.split(":")[0]
                    tds.append(f'<td class="{status}" title="{esc(text)}">{status} [{len(notes)}]</td>')
                    continue
                if text.startswith("**"):
                    cls, text = "best", text.strip("*")
                # The value on one line, its Δ or ratio (and rank) under it: a narrow column.
                value, sep, rest = text.partition(" (")
                shown = esc(value) + (f"<br><span class='sub'>({esc(rest)}</span>" if sep else "")
                tds.append(f'<td class="{cls}">{shown}</td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        sections.append(
            f"<h2>{esc(heading)}</h2><div class='wide'><table><tr>{names}{head}</tr>"
            f"{''.join(body)}</table></div>"
        )
    legend = "; ".join(_metric_legend(cells)).replace("`", "")
    floors = "".join(f"<li>{esc(f.replace('`', ''))}</li>" for f in _floors(cells))
    note_list = "".join(f"<li>{esc(n)}</li>" for n in notes)
    figures = "".join(
        f'<h3>{esc(cap)}</h3><img alt="{esc(cap)}" src="data:image/png;base64,{b64}">'
        for cap, b64 in [*plots(cells), *eps_plots(df)]
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
        f"</head><body><h1>{esc(title)}</h1><p>{esc(CELLS_LEGEND)} Metrics: {esc(legend)}.</p>"
        f"<ul>{floors}</ul>"
        f"{''.join(sections)}<ol>{note_list}</ol>{claims.to_html(ratios)}"
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
    ratios = claims.gap_ratios(df)  # bootstraps: once for both formats
    return Report(
        to_markdown(tables, cells, df, invocations, title, ratios),
        to_html(tables, cells, df, invocations, title, ratios),
        cells,
    )


def write(results: str | Path, out: str | Path | None = None) -> tuple[Path, Path, Report]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: the results folder)."""
    report = build(results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    write_atomic(md, report.markdown)
    write_atomic(page, report.html)
    return md, page, report
