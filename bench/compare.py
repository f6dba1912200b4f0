"""Per-cell comparison of two results folders (e.g. two commits): the quality gate.

Cells are the leaderboard's (:func:`bench.report.cells.cell_table`): (model, method — with its
backend when not ``fake`` —, bits, metric), the latest row of each run averaged over sampling
and calibration seeds, with the t interval that includes the runs' spread
(:func:`bench.stats.combine`), so a method whose result moves with float rounding on another
machine (a reconstruction landing on other roundings) carries that in its interval, given
several calibration seeds (the default matrix runs three). A gated
cell regresses when it was ok in A and is not ok in B, or when B is worse than A (in the
metric's own direction, ``higher_is_better``) by more than its threshold beyond the noise of
the two values, judged over the whole matrix: each cell's one-sided p-value (its excess over
the threshold in units of the difference's standard error) goes through Holm's step-down
procedure, so that a clean rerun flags any cell at all with probability at most
:data:`FAMILY_ALPHA`, however many cells are gated. With one gated cell that is the plain rule
"worse by more than the threshold plus the combined 95 % interval". Quality cells are
gated; cost cells (latencies, memory) are noisy and belong to asv (``benchmarks/``), so they are
gated only when a per-metric threshold names them, and only within one machine.

A cost cell with several runs (a wall-clock time such as ``quantize_time``, which has no
bootstrap replicates) gets the t interval of its runs' mean. A cell without any interval (a
deterministic count such as ``weight_bytes``, one run) still gets a noise floor:
:data:`ROUNDING` of its value, so float rounding between two machines or library builds is
"within noise", never a regression.

Two numbers are compared only if they were measured alike: a cell whose sample count, sampling
settings, quantization budget or evaluation settings (FID backend, extractor, reference, ...)
differ between A and B is an error, as is a pair of folders that share no cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from bench import markdown
from bench.errors import IncomparableError, ThresholdError, UnknownNameError
from bench.registry import METRICS
from bench.report.cells import cell_table, compile_modes, machine_label, method_labels, protocol, with_derived
from bench.stats import LEVEL, holm
from bench.store import load

KEY = ["model", "method", "bits", "compile", "metric"]
# The smallest noise any cell has: float rounding (another ISA, BLAS or library build) moves a
# deterministic value by far less than 0.1 %, a real change of a method by far more.
ROUNDING = 1e-3
# How a compared cell's value moved (``note``): reproduced, or moved beyond its noise.
REPRODUCED = ("same", "within noise")
# The chance that a clean rerun flags any gated cell (Holm over the matrix's gated cells). One
# sided: only the worse direction is a regression, at the level the cells' two-sided 95 %
# intervals leave on that side.
FAMILY_ALPHA = (1 - LEVEL) / 2
PROCEDURE = f"Holm over all gated cells: false alarms <= {FAMILY_ALPHA:.1%} per matrix"
Z95 = stats.norm.ppf(0.5 + LEVEL / 2)
MOVED = ("worse", "better")


def matrix_folders(a: str | Path, b: str | Path) -> list[tuple[Path, Path]]:
    """The pairs of matrix folders to compare: each side is a matrix folder (``results/default``,
    holding ``runs/``) or a results root (``results``); a root is matched to the other side's
    matrix by name, and two roots pair every matrix they share.

    Raises:
        IncomparableError: a side holds no results, or two roots share no matrix.
    """
    a, b = Path(a), Path(b)

    def kind(p: Path) -> str:
        if (p / "runs").is_dir():
            return "folder"
        if any(p.glob("*/runs")):
            return "root"
        raise IncomparableError(
            f"no results at {p}: expected a matrix folder ({p}/runs/, e.g. results/default) or a "
            f"results root ({p}/<matrix>/runs/, e.g. results)"
        )

    ka, kb = kind(a), kind(b)
    if ka == kb == "folder":
        return [(a, b)]
    if ka == "folder" or kb == "folder":
        folder, root = (a, b) if ka == "folder" else (b, a)
        other = root / folder.name
        if not (other / "runs").is_dir():
            have = ", ".join(sorted(p.parent.name for p in root.glob("*/runs")))
            raise IncomparableError(
                f"{root} has no matrix {folder.name!r} to compare with {folder} (it has {have})"
            )
        return [(a, other)] if ka == "folder" else [(other, b)]
    names = sorted({p.parent.name for p in a.glob("*/runs")} & {p.parent.name for p in b.glob("*/runs")})
    if not names:
        raise IncomparableError(f"{a} and {b} share no matrix folder; name two matrix folders instead")
    return [(a / n, b / n) for n in names]


@dataclass(frozen=True)
class Threshold:
    """How much worse B may be than A: an absolute amount or a percentage of |A|."""

    amount: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Threshold:
        raw = text.strip()
        relative = raw.endswith("%")
        try:
            amount = float(raw.rstrip("%"))
        except ValueError:
            raise ThresholdError(
                f"threshold {text!r} is not a number or a percentage, e.g. 0.5 or 5%"
            ) from None
        if amount < 0 or math.isnan(amount):
            raise ThresholdError(f"threshold {text!r} must be >= 0")
        return cls(amount, relative)

    def amount_for(self, reference: float) -> float:
        """How much worse than ``reference`` is allowed."""
        return self.amount * abs(reference) / 100 if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.amount:g}{'%' if self.relative else ''}"


def parse_limits(items: list[str]) -> dict[str, Threshold]:
    """``["digits_fd=2", "latency_step=10%"]`` → per-metric thresholds (``--max-regression``)."""
    limits = {}
    for item in items:
        metric, sep, amount = item.partition("=")
        if not sep or not metric.strip():
            raise ThresholdError(
                f"--max-regression {item!r} is not METRIC=AMOUNT, e.g. digits_fd=2 or fid=5%"
            )
        try:
            METRICS.get(metric.strip())
        except UnknownNameError as exc:
            raise ThresholdError(f"--max-regression {item!r}: {exc}") from None
        limits[metric.strip()] = Threshold.parse(amount)
    return limits


def _cells(path: str | Path) -> pd.DataFrame:
    """The leaderboard's cells of one folder (:func:`bench.report.cells.cell_table`: runs averaged over
    sampling and calibration seeds, with the two-level interval), plus each cell's protocol
    without the machine and its machine."""
    df = load(path)
    # Each cell on the machine it was last measured on (a folder may hold several).
    cells = cell_table(df).sort_values("measured_at").groupby(KEY, sort=False).tail(1)
    # The cells' own rows, step memory (taken from latency_step's rows) included.
    df = with_derived(df)
    df["method"] = method_labels(df)
    df["compile"] = compile_modes(df)
    # The protocol without the machine: a cost cell measured on another machine is listed,
    # never compared; a quality cell must reproduce across machines.
    df["protocol"] = protocol(df, with_machine=False)
    df["machine"] = [machine_label(r) for r in df.to_dict("records")]
    newest = df.sort_values("started_at").groupby(KEY, sort=False)[["protocol", "machine"]].last()
    cells = cells.drop(columns="machine").merge(newest, left_on=KEY, right_index=True, how="left")
    cells["half_width"] = [_half_width(c) for c in cells.itertuples()]
    return cells[[*KEY, "value", "half_width", "seeds", "status", "error", "higher_is_better", "kind",
                  "protocol", "machine"]]  # fmt: skip


def _half_width(c) -> float:
    """A cell's 95 % half-width: its bootstrap interval's; for a cost cell (a wall-clock time: no
    bootstrap replicates) with several runs, the t interval of their mean (wide for two runs);
    else 0 (the rounding floor applies)."""
    if not math.isnan(c.low):
        return (c.high - c.low) / 2
    if c.kind == "cost" and c.seeds > 1 and not math.isnan(c.sd):
        return float(stats.t.ppf(0.975, c.seeds - 1) * c.sd / math.sqrt(c.seeds))
    return 0.0


def _check_comparable(merged: pd.DataFrame, a: Path, b: Path) -> None:
    both = merged[merged["_merge"] == "both"]
    if both.empty:
        raise IncomparableError(
            f"{a} and {b} share no cell (model, method, bits, metric); compare results of the same "
            "matrix, e.g. results/default from two commits"
        )
    differ = both[both["protocol_a"] != both["protocol_b"]]
    if len(differ):
        r = differ.iloc[0]
        cell = " ".join(str(r[k]) for k in KEY)
        raise IncomparableError(
            f"{len(differ)} cell(s) were measured differently in A and B (e.g. {cell}: "
            f"{r['protocol_a']} vs {r['protocol_b']}); rerun one side with the other's settings so "
            "that the numbers are comparable"
        )


def compare(
    a: str | Path, b: str | Path, threshold: Threshold, limits: dict[str, Threshold] | None = None
) -> pd.DataFrame:
    """One row per cell present in A or B: values, delta (B − A), its threshold, and whether it
    regressed.

    A gated cell regresses when B is worse than A by more than its threshold *plus* the
    combined half-width of the two values' 95 % intervals (√(h_A² + h_B²), the interval of a
    difference of independent estimates): a move inside the noise is listed, never flagged.

    Args:
        threshold: for quality cells without a metric of their own in ``limits``.
        limits: per-metric thresholds; a cost metric named here is gated too (within one
            machine: a cost cell measured on different machines is listed, not compared).

    Raises:
        IncomparableError: no shared cell, or a shared cell measured differently.
    """
    limits = limits or {}
    merged = _cells(a).merge(_cells(b), on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    _check_comparable(merged, Path(a), Path(b))
    records = []
    for r in merged.to_dict("records"):
        higher = (
            r["higher_is_better_a"] if isinstance(r["higher_is_better_a"], bool) else r["higher_is_better_b"]
        )
        kind = r["kind_a"] if isinstance(r["kind_a"], str) else r["kind_b"]
        limit = limits.get(r["metric"], threshold if kind != "cost" else None)
        gated = limit is not None
        delta = r["value_b"] - r["value_a"] if r["status_a"] == r["status_b"] == "ok" else math.nan
        noise = p = math.nan
        if r["_merge"] != "both":
            note = "only in A" if r["_merge"] == "left_only" else "only in B"
            regressed = gated and r["_merge"] == "left_only"
        elif r["status_a"] == "ok" and r["status_b"] != "ok":
            note, regressed = f"{r['status_b']} in B: {r['error_b']}", gated
        elif r["status_a"] != "ok":
            note, regressed = f"{r['status_a']} in A", False
        elif kind == "cost" and r["machine_a"] != r["machine_b"]:
            # Not compared, so not gated either: no limit, not counted among the gated cells.
            note, regressed, limit = "other machine: not compared", False, None
        else:
            worse_by = -delta if higher else delta
            noise = max(math.hypot(r["half_width_a"], r["half_width_b"]), ROUNDING * abs(r["value_a"]))
            if gated:
                p = p_worse(worse_by - limit.amount_for(r["value_a"]), noise)
            regressed = False  # decided over all gated cells below
            within = abs(delta) <= noise
            note = (
                "same" if delta == 0 else "within noise" if within else "worse" if worse_by > 0 else "better"
            )
        records.append({**{k: r[k] for k in KEY}, "a": r["value_a"], "b": r["value_b"], "delta": delta,
                        "noise": noise, "p": p, "limit": "—" if limit is None else str(limit), "note": note,
                        "regressed": regressed})  # fmt: skip
    tested = [i for i, rec in enumerate(records) if not math.isnan(rec["p"])]
    for i, rejected in zip(tested, holm([records[i]["p"] for i in tested], FAMILY_ALPHA), strict=True):
        records[i]["regressed"] = rejected
    columns = [*KEY, "a", "b", "delta", "noise", "p", "limit", "note", "regressed"]
    table = pd.DataFrame.from_records(records, columns=columns)
    table.attrs["machines"] = (_machines(merged, "a"), _machines(merged, "b"))
    return table


def p_worse(excess: float, noise: float) -> float:
    """One-sided p-value of "B is worse than A by more than allowed", given by how much it is
    (``excess``, negative when less) and the combined 95 % half-width of A and B (``noise``):
    the chance of an excess this large if the true difference were exactly the allowed one
    (normal errors; a cell without noise is a certainty either way)."""
    if noise <= 0:
        return 0.0 if excess > 1e-12 else 1.0
    return float(stats.norm.sf(excess / (noise / Z95)))


def _machines(merged: pd.DataFrame, side: str) -> list[str]:
    """The machines one side's cells were measured on (:func:`~bench.report.cells.machine_label`)."""
    return sorted(set(merged[f"machine_{side}"].dropna()))


def machine_note(table: pd.DataFrame) -> str | None:
    """Lines saying that the two sides were measured on different machines (or None)."""
    ma, mb = table.attrs.get("machines", ([], []))
    if not ma or not mb or ma == mb:
        return None
    return "\n".join([
        "note: A and B were measured on different machines:",
        f"  A: {'; '.join(ma)}",
        f"  B: {'; '.join(mb)}",
        "  quality cells are compared (they must reproduce on any machine), cost cells only where",
        "  both sides share a machine",
    ])  # fmt: skip


def to_markdown(table: pd.DataFrame) -> str:
    """The cells that moved (changed value or status, or present on one side only), regressions
    flagged, and a one-line verdict."""
    moved = table[~table["note"].isin(REPRODUCED)]
    # The compile mode is a column only where some cell was timed compiled.
    key = KEY if (table["compile"] != "off").any() else [k for k in KEY if k != "compile"]
    rows = []
    for r in moved.itertuples():
        flag = " **REGRESSION**" if r.regressed else ""
        cells = ["—" if getattr(r, k) is None else str(getattr(r, k)) for k in key] + [
            _num(r.a),
            _num(r.b),
            _num(r.delta),
            _num(r.noise),
            _p_text(r.p),
            r.limit,
            ("other machine" if r.note == "other machine: not compared" else r.note) + flag,
        ]
        rows.append(cells)
    header = [*key, "A", "B", "Δ (B − A)", "noise (±)", "p", "allowed", "note"]
    # A column with nothing to say in any row shown (no noise, p or limit: cost cells of other
    # machines) is left out, so that rows fit a terminal.
    keep = [
        i
        for i, h in enumerate(header)
        if h not in ("noise (±)", "p", "allowed") or any(r[i] != "—" for r in rows)
    ]
    lines = markdown.table([header[i] for i in keep], [[r[i] for i in keep] for r in rows])
    n = int(table["regressed"].sum())
    # Gated: a cell that can regress, so not one whose A failed (nothing to compare it with).
    gated = int(((table["limit"] != "—") & ~table["note"].str.endswith(" in A")).sum())
    beyond = int(table["note"].isin(MOVED).sum())
    within = int((table["note"] == "within noise").sum())
    same = int((table["note"] == "same").sum())
    elsewhere = int((table["note"] == "other machine: not compared").sum())
    lines.append(
        f"\n{len(table)} cells: {same} identical, {beyond} moved beyond their noise, {within} within it"
        + (f", {elsewhere} cost cells measured on another machine not compared" if elsewhere else "")
        + f"; {n} regression(s) among {gated} gated cells (quality cells, and cost metrics given a "
        "--max-regression). 'noise' is the combined 95 % interval of A and B; p is the one-sided "
        f"p-value of being worse by more than allowed; a cell regresses by {PROCEDURE}, or when it "
        "failed in B."
    )
    return "\n".join(lines)


def verdict(table: pd.DataFrame) -> str:
    """A few lines: which quality cells reproduce within their intervals and which do not, which
    failed on either side, and how the cost cells fared (compared only on the same machine)."""
    quality = table[table["limit"] != "—"]
    measured = quality["note"].isin(REPRODUCED + MOVED)
    shared = quality[measured]
    same = shared["note"].isin(REPRODUCED)
    lines = [f"{int(same.sum())} of {len(shared)} quality cells reproduce within their 95 % intervals"]
    for r in shared[~same].itertuples():
        what = f"{_num(r.a)} → {_num(r.b)} (Δ {_num(r.delta)}, noise ± {_num(r.noise)}, p {_p_text(r.p)})"
        label = "REGRESSION" if r.regressed else r.note
        lines.append(f"  {label}: {r.model} {r.method} {r.bits} {r.metric}: {what}")
    n = int(quality["regressed"].sum())
    lines.append(f"{n} regression(s) among {len(quality)} gated cells ({PROCEDURE})")
    for r in quality[~measured].itertuples():
        lines.append(f"  not compared: {r.model} {r.method} {r.bits} {r.metric}: {r.note}")
    cost = table[table["limit"] == "—"]
    elsewhere = int((cost["note"] == "other machine: not compared").sum())
    compared = cost[cost["note"].isin(REPRODUCED + MOVED)]
    if len(cost):
        moved = int(compared["note"].isin(MOVED).sum())
        lines.append(f"cost cells: {len(compared)} compared on the same machine ({moved} moved beyond noise)")
        if elsewhere:
            lines.append(f"  {elsewhere} cost cells measured on another machine not compared")
    return "\n".join(lines)


def _p_text(p: float) -> str:
    return "—" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _num(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
