"""The paper's central ratio, with its interval: Q-Diffusion's gap to FP as a fraction of naive
(linear) PTQ's, per model, bit width and metric, from the same images.

A gap is what the metric says quantization cost: the paired difference to FP for a metric of
the images against real data (``digits_fd``), or the value itself for a distance to FP's own
samples (``fd_to_fp``, ``lpips_vs_fp``, ``eps_mse``: 0 is FP). Both methods' gaps are cell
means over their runs (:func:`bench.stats.combine`: their replicates scaled to the t interval
that holds the runs' spread), whose replicates draw the same images (one seed for every run's
resampling) and the same run positions, so the ratio of the two replicates is a paired
bootstrap of the ratio. Its interval is the percentile
one: a ratio's replicates are skewed, and its bias concern (a Fréchet distance's upward
bias under resampling) cancels in the ratio of two resampled distances.

The paper claims Q-Diffusion keeps W4A8 within a small fraction of naive PTQ's damage; the
README quotes "≤ ¼". A row says ``below``/``above`` that when its whole interval is on one
side, else ``undecided``.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from bench import markdown, stats
from bench.registry import METRICS

METHOD, BASELINE = "qdiff", "linear"
CLAIM = 0.25  # "within a quarter of naive PTQ's gap"
EXPLAINED = (
    "Q-Diffusion's gap to FP as a fraction of linear PTQ's, from the same images (paired bootstrap "
    "over images and runs, percentile interval); 'vs ¼': the whole interval below or above "
    f"{CLAIM:g}, else undecided."
)
HEADER = ("model", "bits", "metric", "Q-Diffusion's gap / linear PTQ's", "95 % interval", "vs ¼")


def _gap(rows: pd.DataFrame) -> stats.Interval | None:
    """The cell's gap (mean over runs) with its bootstrap replicates, or None without them."""
    metric = METRICS.get(rows["metric"].iloc[0])
    if "delta_boot" in rows and rows["delta_boot"].map(lambda b: isinstance(b, list) and len(b) > 1).all():
        values, boots = rows["delta"], rows["delta_boot"]
        sign = -1.0 if metric.higher_is_better else 1.0  # a gap is a loss in the metric's direction
    elif (
        metric.quantized_only
        and not metric.higher_is_better
        and rows["boot"].map(lambda b: isinstance(b, list) and len(b) > 1).all()
    ):
        values, boots, sign = rows["value"], rows["boot"], 1.0
    else:
        return None
    return stats.combine([sign * float(v) for v in values], [[sign * x for x in b] for b in boots])


def gap_ratios(df: pd.DataFrame) -> list[tuple[str, ...]]:
    """One row of :data:`HEADER` per (model, bits, metric) where both methods have a gap with
    replicates (latest ok rows of the default ``fake`` backend)."""
    if "boot" not in df:
        return []
    budgets = df["budget"] if "budget" in df else [None] * len(df)
    simulated = np.array([not isinstance(b, dict) or b.get("backend") in (None, "fake") for b in budgets])
    ok = df[(df["status"] == "ok") & simulated & df["method"].isin([METHOD, BASELINE])]
    out = []
    for (model, bits, metric), g in ok.groupby(["model", "bits", "metric"], sort=False):
        gaps = {m: _gap(g[g["method"] == m]) for m in (METHOD, BASELINE) if (g["method"] == m).any()}
        if len(gaps) < 2 or None in gaps.values():
            continue
        ours, naive = gaps[METHOD], gaps[BASELINE]
        if naive.low <= 0:
            noise = f"linear PTQ's gap {naive.estimate:.3g} is inside the noise"
            out.append((model, bits, metric, "—", noise, "undecided"))
            continue
        b = min(len(ours.replicates), len(naive.replicates))
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = ours.replicates[:b] / naive.replicates[:b]
        reps = reps[np.isfinite(reps)]
        low, high = np.percentile(reps, [100 * (1 - stats.LEVEL) / 2, 100 * (1 + stats.LEVEL) / 2])
        side = "below" if high < CLAIM else "above" if low > CLAIM else "undecided"
        ratio = ours.estimate / naive.estimate
        out.append((model, bits, metric, f"{ratio:.2f}", f"{low:.2f} – {high:.2f}", side))
    return out


def to_markdown(rows: list[tuple[str, ...]]) -> list[str]:
    """The report's section (empty without rows)."""
    if not rows:
        return []
    return ["", "## Q-Diffusion against naive PTQ", "", EXPLAINED, "", *markdown.table(HEADER, rows)]


def to_html(rows: list[tuple[str, ...]]) -> str:
    """The same section as HTML (empty without rows)."""
    if not rows:
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td class='name'>{esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (f"<h2>Q-Diffusion against naive PTQ</h2><p>{esc(EXPLAINED)}</p>"
            f"<table><tr>{head}</tr>{body}</table>")  # fmt: skip
