"""The leaderboard's cells, computed from a results store's rows and rendered by nothing here:
one per (model, method — with its backend, bits, compile mode, metric), averaged over the cell's
runs with its interval, its paired difference to FP, its rank among the methods of its column,
and for cost its ratio to the FP run it pairs with. :mod:`bench.report.text`,
:mod:`bench.report.html` and :mod:`bench.report.plots` render them; :mod:`bench.compare` and
:mod:`bench.history` read the same cells.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from bench import stats
from bench.errors import UnknownNameError
from bench.registry import METRICS

FP = "fp"


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


def machine_label(row: dict) -> str:
    """A row's machine: its GPU for CUDA runs, else its CPU model, the CPU flags that decide
    its kernels (VNNI, AMX, ...; torch's vector ISA where a row lacks them) and its threads."""

    def text(key: str) -> str:  # NaN where old rows lack the column
        value = row.get(key)
        return value if isinstance(value, str) and value else ""

    device = text("device")  # a GPU's name, or "cpu (<arch>, <n> threads)"
    if device and not device.startswith("cpu"):
        return device
    threads = device.partition(", ")[2].rstrip(")")
    isa = text("cpu_flags") or text("cpu_capability") or "?"
    return f"{text('cpu_model') or '?'} ({isa})" + (f", {threads}" if threads else "")


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


# A cost cell is also keyed by its machine (:func:`machine_label`; "" for quality cells, which
# must reproduce on any machine): cells of two machines stand side by side, never averaged, and
# no ratio is taken across them.
CELL = ["model", "method", "bits", "compile", "metric", "machine"]


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


# A ``latency_step`` row also carries that step's deployed memory (``step_peak_mib``) and, for a
# deployment whose layers chose their kernels on the device, the share of the step's
# multiply-accumulates that quantized kernels compute (``quantized_mac_share``): the boards show
# each as a cost metric of its own. Name → (row field, unit, higher is better, legend).
STEP_MEMORY = "step_memory"
QUANTIZED_MACS = "quantized_macs"
DERIVED = {
    STEP_MEMORY: ("step_peak_mib", "MiB", False,
                  "the deployed model's resident weights plus one latency_step call's working memory"),
    QUANTIZED_MACS: ("quantized_mac_share", "%", True,
                     "the share of one denoiser call's Linear, Conv and attention-matmul "
                     "multiply-accumulates that quantized kernels compute; the rest fell back to "
                     "the float kernel, stayed simulated or was left unquantized"),
}  # fmt: skip


def with_derived(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a row per :data:`DERIVED` metric taken from each ``latency_step`` row that
    carries its field."""
    extra = []
    for metric, (field, unit, higher, _) in DERIVED.items():
        if field not in df:
            continue
        steps = df[(df["metric"] == "latency_step") & df[field].notna()].copy()
        if not len(steps):
            continue
        steps["metric"], steps["unit"], steps["higher_is_better"] = metric, unit, higher
        steps["value"] = steps[field].astype(float) * (100 if unit == "%" else 1)
        for col in ("boot", "delta_boot", "delta"):
            if col in steps:
                steps[col] = None
        extra.append(steps)
    return pd.concat([df, *extra], ignore_index=True) if extra else df


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
    df = with_derived(df)
    df["method_name"] = df["method"]
    df["method"] = method_labels(df)
    df["compile"] = compile_modes(df)
    df["protocol"] = protocol(df)
    df["machine"] = [machine_label(r) if r.get("kind") == "cost" else "" for r in df.to_dict("records")]
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
    fp_value = {
        (r["config_hash"], r["metric"], r["machine"]): r["value"]
        for r in records
        if r["method"] == FP and r["status"] == "ok"
    }
    paired = [
        fp_value.get((r["reference_hash"], r["metric"], r["machine"]), math.nan)
        if r["status"] == "ok"
        else math.nan
        for r in records
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
    for (model, method, bits, compile_mode, metric, machine), g in df.groupby(CELL, sort=False):
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
                "method_name": first["method_name"],
                "bits": bits,
                "compile": compile_mode,
                "baseline": baseline_label(first.get("sampling"), compile_mode),
                "metric": metric,
                "machine": machine,
                "measured_at": g["started_at"].max(),
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
                "set_aside": int(set_aside.get((model, method, bits, compile_mode, metric, machine), 0)),
            }
        )
    cells = pd.DataFrame.from_records(records)
    cells["rank"] = _ranks(cells)
    cells["fastest_fp"], cells["fastest_ratio"] = _fastest_fp(cells)
    cells["reference"], cells["reference_ratio"] = _runtime_reference(cells)
    return cells


def _best(g: pd.DataFrame) -> pd.Series:
    """The row of ``g`` with the best value (its metric's direction)."""
    return g.loc[g["value"].idxmax() if g["higher_is_better"].iloc[0] else g["value"].idxmin()]


def _is_runtime_reference(method: str) -> bool:
    from bench.registry import METHODS

    try:
        return bool(getattr(METHODS.get(method), "runtime_reference", False))
    except UnknownNameError:  # a method since renamed or removed
        return False


def _runtime_reference(cells: pd.DataFrame) -> tuple[list, list]:
    """For quantized cost cells: the runtime's own PTQ deployment of the same model, bits,
    metric and machine (a method with ``runtime_reference``, e.g. NNCF on OpenVINO; its
    fastest if several) and each cell's ratio to it. None where the folder has none."""
    refs = {m: _is_runtime_reference(m) for m in cells["method_name"].unique()}
    ok = cells[(cells["kind"] == "cost") & (cells["status"] == "ok") & cells["method_name"].map(refs)]
    best: dict[tuple, tuple[str, float]] = {}
    for key, g in ok.groupby(["model", "bits", "metric", "machine"]):
        top = _best(g)
        best[key] = (top["method"], float(top["value"]))
    labels, ratios = [], []
    for c in cells.itertuples():
        label, value = best.get((c.model, c.bits, c.metric, c.machine), (None, math.nan))
        mine = label is not None and c.kind == "cost" and c.method not in (FP, label) and value > 0
        labels.append(label if mine else None)
        ratios.append(c.value / value if mine else math.nan)
    return labels, ratios


def _fastest_fp(cells: pd.DataFrame) -> tuple[list, list]:
    """For cost cells of a model measured against several FP baselines (eager and compiled):
    the best FP baseline's label and each cell's ratio to it, so that a quantized model timed
    eager is also read against compiled FP. None where the model has one FP baseline on the
    cell's machine (the baseline is always the same machine's)."""
    best: dict[tuple[str, str, str], tuple[str, float]] = {}
    fp = cells[(cells["method"] == FP) & (cells["kind"] == "cost") & (cells["status"] == "ok")]
    for (model, metric, machine), g in fp.groupby(["model", "metric", "machine"]):
        if g["compile"].nunique() > 1:
            top = _best(g)
            best[(model, metric, machine)] = (top["baseline"], float(top["value"]))
    labels, ratios = [], []
    for c in cells.itertuples():
        label, value = best.get((c.model, c.metric, c.machine), (None, math.nan))
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


def declared(metric: str, trait: str) -> bool:
    """A metric's declared ``trait`` (a :class:`bench.metrics.quality.Metric` class attribute,
    e.g. ``includes_bases``); False for a metric this code does not know (rows written by another
    version). What ``latency_step`` rows carry (:data:`DERIVED`) is a real-kernel cost as well."""
    if metric in DERIVED:
        return trait == "real_kernels_only"
    try:
        return bool(getattr(METRICS.get(metric), trait))
    except UnknownNameError:
        return False


def includes_bases(c) -> bool:
    """A cost that includes those of the models a method refines (its ``bases``, ``weights_from``)."""
    return declared(c.metric, "includes_bases") and isinstance(c.weights_from, str)


def best_quality(quant: pd.DataFrame) -> set[tuple[str, str, str, str]]:
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


def simulated(c) -> bool:
    """A real-deployment cost measured on the ``fake`` backend: the simulation's, not a kernel's."""
    return c.backend == "fake" and declared(c.metric, "real_kernels_only")


def best_cost(cells: pd.DataFrame) -> set[tuple[str, str, str, str, str, str]]:
    """Per (model, metric, machine): the quantized cells that improve on FP by more than
    :data:`REAL_IMPROVEMENT` and are within it of the best of them (none if none improves, if FP
    has no value to beat, or if every cell of the column ties)."""
    best = set()
    quant = cells[(cells["method"] != FP) & (cells["status"] == "ok")]
    for (model, metric, machine), column in quant.groupby(["model", "metric", "machine"]):
        g = column[[not simulated(c) for c in column.itertuples()]].dropna(subset=["ratio"])
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
            best.update((model, r.method, r.bits, r.compile, metric, machine) for r in tied.itertuples())
    return best


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
