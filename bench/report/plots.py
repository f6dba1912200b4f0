"""The report's figures (matplotlib, embedded as base64 PNG): quality against bit width per
metric, quality against cost, and ε error per timestep."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd

from bench.report.cells import FP, REAL_IMPROVEMENT, method_labels, simulated


def png(fig) -> str:
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
            out.append((f"{model}: {metric} by bit width and method", png(fig)))
            plt.close(fig)
        costs = quant[quant["kind"] == "cost"]["metric"].unique()
        qualities = quant[quant["kind"] == "quality"]["metric"].unique()
        # Latency and memory of simulated models say nothing about deployment: a front drawn
        # through them would rank methods by how slowly they simulate.
        real = quant[[not simulated(c) for c in quant.itertuples()]]
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
                front = pareto(pts[cost].tolist(), pts[quality].tolist(), hib)
                ax.plot([pts[cost].iloc[i] for i in front], [pts[quality].iloc[i] for i in front], "r-", lw=1)
                unit = dict(zip(quant["metric"], quant["unit"], strict=True))
                ax.set_xlabel(f"{cost} ({unit[cost]})")
                ax.set_ylabel(f"{quality} ({unit[quality]})")
                ax.set_title(f"{model}: {quality} vs {cost} (red: Pareto front)")
                out.append((f"{model}: {quality} vs {cost}", png(fig)))
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
        out.append((f"{model} {bits}: ε error per sampler step (held-out FP trajectories)", png(fig)))
        plt.close(fig)
    return out


def pareto(cost: list[float], quality: list[float], higher_is_better: bool) -> list[int]:
    """Indices of non-dominated points (lower cost, better quality), sorted by cost."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -sign * quality[i]))
    front, best = [], -math.inf
    for i in order:
        if sign * quality[i] > best:
            front.append(i)
            best = sign * quality[i]
    return front
