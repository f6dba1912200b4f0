"""Per-cell comparison of two results folders (e.g. two commits), for regression gates.

Cells are matched by (model, method, bits, seed, metric) on the latest row of each. A cell
regresses when B is worse than A (in the metric's own direction) by more than the threshold,
or when it was ok in A and is not ok in B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.store import load

KEY = ["model", "method", "bits", "seed", "metric"]


class ThresholdError(ValueError):
    """A threshold that is neither a number nor a percentage."""


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

    def allows(self, worse_by: float, reference: float) -> bool:
        limit = self.amount * abs(reference) / 100 if self.relative else self.amount
        return worse_by <= limit + 1e-12


def compare(a: str | Path, b: str | Path, threshold: Threshold) -> pd.DataFrame:
    """One row per cell present in A or B: values, delta (B − A), and whether it regressed."""
    left, right = (load(p)[[*KEY, "value", "status", "error", "higher_is_better"]] for p in (a, b))
    merged = left.merge(right, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    records = []
    for r in merged.to_dict("records"):
        higher = (
            r["higher_is_better_a"] if isinstance(r["higher_is_better_a"], bool) else r["higher_is_better_b"]
        )
        delta = r["value_b"] - r["value_a"] if r["status_a"] == r["status_b"] == "ok" else math.nan
        if r["_merge"] != "both":
            note, regressed = (
                ("only in A" if r["_merge"] == "left_only" else "only in B"),
                r["_merge"] == "left_only",
            )
        elif r["status_a"] == "ok" and r["status_b"] != "ok":
            note, regressed = f"{r['status_b']} in B: {r['error_b']}", True
        elif r["status_a"] != "ok":
            note, regressed = f"{r['status_a']} in A", False
        else:
            worse_by = -delta if higher else delta
            regressed = not threshold.allows(worse_by, r["value_a"])
            note = "worse" if worse_by > 0 else "better" if worse_by < 0 else "same"
        records.append({**{k: r[k] for k in KEY}, "a": r["value_a"], "b": r["value_b"], "delta": delta,
                        "note": note, "regressed": regressed})  # fmt: skip
    return pd.DataFrame.from_records(records, columns=[*KEY, "a", "b", "delta", "note", "regressed"])


def to_markdown(table: pd.DataFrame, threshold: Threshold) -> str:
    limit = f"{threshold.amount:g}{'%' if threshold.relative else ''}"
    lines = [f"| {' | '.join(KEY)} | A | B | Δ (B − A) | note |", "|" + "---|" * (len(KEY) + 4)]
    for r in table.itertuples():
        flag = " **REGRESSION**" if r.regressed else ""
        cells = [str(getattr(r, k)) for k in KEY] + [_num(r.a), _num(r.b), _num(r.delta), r.note + flag]
        lines.append("| " + " | ".join(cells) + " |")
    n = int(table["regressed"].sum())
    lines.append(f"\n{n} regression(s) beyond threshold {limit} in {len(table)} cells.")
    return "\n".join(lines)


def _num(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
