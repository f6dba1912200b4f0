"""The report's pictures: per model, the first samples of one noise seed for FP and every
method × bit width, side by side (cut from the grids ``run`` writes into ``samples/``).

Each row of the picture table shows the same initial noise and prompts, so a difference between
rows is the quantization's; the lowest seed and calibration seed of each cell are shown.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from bench import markdown
from bench.images import preview_name, strip
from bench.report.cells import FP, method_labels

SAMPLES = "samples"  # the folder beside runs/ that RunTask's previews go to
SHOWN = 8  # samples per row


@dataclass(frozen=True)
class Grid:
    model: str
    label: str  # the method (with its real-kernel backend) and bit width
    path: Path  # the full grid PNG
    seed: int


def grids(df: pd.DataFrame, results: Path) -> list[Grid]:
    """One grid per (model, method, backend, bits) whose PNG exists in ``results/samples``:
    FP first, then methods by name and bit widths from widest."""
    needed = {"status", "model", "method", "bits", "seed", "calib_seed"}
    if not (results / SAMPLES).is_dir() or not needed <= set(df.columns):
        return []
    ok = df[df["status"] == "ok"]
    runs = ok.assign(label=method_labels(ok))
    runs = runs.drop_duplicates(["model", "label", "bits", "seed", "calib_seed"])
    out = []
    for (model, label, bits), group in runs.groupby(["model", "label", "bits"], sort=False, dropna=False):
        first = group.sort_values(["seed", "calib_seed"], na_position="first").iloc[0]
        budget = first.get("budget")
        backend = budget.get("backend") if isinstance(budget, dict) else None
        calib = None if first["method"] == FP or pd.isna(first["calib_seed"]) else int(first["calib_seed"])
        name = preview_name(
            model,
            first["method"],
            None if backend in (None, "fake") else backend,
            bits,
            int(first["seed"]),
            calib,
        )
        path = results / SAMPLES / name
        if path.is_file():
            out.append(Grid(model, f"{label} {bits}", path, int(first["seed"])))
    widest = lambda g: (g.label.split()[0] != FP, g.model, g.label.rsplit(" ", 1)[0], _bits_order(g.label))  # noqa: E731
    return sorted(out, key=widest)


def _bits_order(label: str) -> tuple[int, int]:
    """W8A8 before W4A8 before W4A4; FP and unparsable labels first."""
    bits = label.rsplit(" ", 1)[-1]
    try:
        w, a = bits[1:].split("A")
        return -int(w), -int(a)
    except ValueError:
        return 0, 0


def to_markdown(shown: list[Grid], folder: Path) -> list[str]:
    """A "Samples" section linking each grid's PNG, relative to the report's ``folder``."""
    if not shown:
        return []
    rows = []
    for g in shown:
        link = quote(Path(os.path.relpath(g.path, folder)).as_posix())
        text = g.label.replace("[", "\\[").replace("]", "\\]")
        rows.append([g.model, f"[{text}]({link})", g.seed])
    intro = (
        "Each run's first samples as a PNG grid; within a model every grid starts from the same "
        "initial noise and prompts."
    )
    return ["", "## Samples", "", intro, "", *markdown.table(["model", "grid", "seed"], rows)]


def to_html(shown: list[Grid]) -> str:
    """Per model, a table of thumbnails (embedded, no external file): one row per run."""
    esc = html.escape
    parts = []
    for model in dict.fromkeys(g.model for g in shown):
        rows = []
        for g in (g for g in shown if g.model == model):
            png = strip(g.path, SHOWN)
            if png is None:
                continue
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            label = esc(g.label)
            rows.append(f"<tr><td class='name'>{label}</td><td><img alt='{label}' src='{src}'></td></tr>")
        if rows:
            seed = next(g.seed for g in shown if g.model == model)
            parts.append(f"<h3>{esc(model)} (seed {seed})</h3><table class='samples'>{''.join(rows)}</table>")
    if not parts:
        return ""
    return (
        f"<h2>Samples</h2><p>The first {SHOWN} samples of each run; within a model every row starts from "
        "the same initial noise and prompts, so differences between rows are the quantization's. "
        "Full grids: the samples/ folder beside the results.</p>" + "".join(parts)
    )
