"""Trends over commits: every quality cell of every matrix under a results root, per commit and
machine, and asv's speed and memory benchmarks per commit and machine.

Each row records the commit it was measured at (``git_sha``), when (``started_at``) and on what
(``cpu_model``, ``cpu_capability``, the device); the store keeps superseded rows, so the history
of a cell is its rows grouped by commit (seeds averaged, the newest row of a run and metric per
commit), commits ordered by their first row. A machine is part of a line's key: a rerun on
another CPU starts a line of its own rather than showing as a jump at its commit.

``qdiff-bench report --history results/`` writes ``history.md`` (first and latest value of each
line) and one self-contained ``history.html`` into ``qdiff-results/history/`` (``--out results``
replaces the committed ones): a plot per matrix, model and metric (a colour per method and bit
width, a marker per machine, the same on every plot, and tables that name the machines and the
settings hashes), and a plot per asv benchmark from ``.asv/results`` (read with asv's own loader;
a colour per parameter set, a marker per machine), so speed history needs neither asv's HTML nor
its scripts from a CDN.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import pandas as pd

from bench import markdown
from bench.errors import StoreError
from bench.fsio import write_atomic
from bench.provenance import REPO_ROOT
from bench.report.cells import machine_label, method_labels, protocol
from bench.report.html import CSS
from bench.report.plots import line_styles, png
from bench.store import ResultStore, load

# A history line: one cell measured one way (``settings``: sample count and a hash of the rest)
# on one machine.
CELL = ["matrix", "model", "method", "bits", "metric", "settings", "machine"]


def history(root: str | Path) -> pd.DataFrame:
    """One row per (matrix, model, method, bits, metric, commit): mean value over seeds, date."""
    root = Path(root)
    folders = sorted(p.parent for p in root.glob("*/runs"))
    if not folders:
        raise StoreError(f"no results under {root} (expected {root}/<matrix>/runs/); run a matrix first")
    frames = []
    failing: dict[tuple, str] = {}
    settings: dict[str, str] = {}
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
        df["machine"] = [machine_label(r) for r in df.to_dict("records")]
        # Rows measured under different settings (samples, sampling, budget, evaluation) are
        # different lines, never one averaged value.
        texts = protocol(df)
        df["settings"] = [
            f"n={n} #{hashlib.sha256(p.encode()).hexdigest()[:6]}"
            for n, p in zip(df["n_samples"], texts, strict=True)
        ]
        settings.update(zip(df["settings"], texts, strict=True))  # described once per label, below
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
    out.attrs["settings"] = {
        k: _describe(settings[k]) for k in sorted(out["settings"].unique())
    }  # label → what
    return out


def _describe(protocol_text: str) -> str:
    """A settings label's meaning, from the protocol text its hash was taken of."""
    key = json.loads(protocol_text)
    parts = [f"{part}: " + ", ".join(f"{k} {v}" for k, v in sorted(key[part].items()))
             for part in ("sampling", "budget", "evaluation") if key.get(part)]  # fmt: skip
    return f"{key.get('n')} samples; " + "; ".join(parts) if parts else f"{key.get('n')} samples"


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


MARKERS = "osD^vP*Xph"
# How each marker looks, for the tables that name the machines.
GLYPHS = ("● circle", "■ square", "◆ diamond", "▲ triangle", "▼ down triangle", "✚ plus", "★ star", "✖ cross",
          "⬟ pentagon", "⬢ hexagon")  # fmt: skip
MARKER_GLYPHS = dict(zip(MARKERS, GLYPHS, strict=True))


def short_machine(label: str) -> str:
    """A machine's label (:func:`bench.report.cells.machine_label`) short enough for a legend:
    its CPU without trademarks, the kernel-deciding feature it has (AMX, AVX-512 VNNI, AVX2)
    and its threads; a GPU's name as it is."""
    cpu, sep, rest = label.partition(" (")
    if not sep:
        return label
    flags, _, threads = rest.partition(")")
    cpu = " ".join(
        w for w in cpu.replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU")
    )
    feature = next(
        (name for flag, name in (("amx", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512", "AVX-512"),
                                 ("avx2", "AVX2")) if flag in flags.lower()),
        flags,
    )  # fmt: skip
    return f"{cpu}, {feature}{threads}"


def machine_names(machines) -> dict[str, str]:
    """Each machine's legend name: :func:`short_machine`, or its full label where two share one."""
    short = {m: short_machine(m) for m in machines}
    counts = pd.Series(list(short.values())).value_counts()
    return {m: s if counts[s] == 1 else m for m, s in short.items()}


def _over_commits(
    title: str,
    ylabel: str,
    ticks: list[str],
    series: list[tuple[str, str, list, list]],
    markers: dict[str, str],
    height: float,
) -> str:
    """A base64 PNG of values over commits. ``series`` holds ``(cell, machine, commit positions,
    values)``: a colour per cell, a marker per machine (``markers``, the same on every plot of a
    page), points of one cell on one machine joined; the colours' legend beside the axes (where
    there is more than one unnamed cell), the machines' below them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cells = list(dict.fromkeys(cell for cell, *_ in series))
    colour = {c: style["color"] for c, style in zip(cells, line_styles(len(cells)), strict=True)}
    fig, ax = plt.subplots(figsize=(8.5, height))
    for cell, machine, xs, ys in series:
        ax.plot(xs, ys, color=colour[cell], marker=markers[machine], markersize=6, linewidth=1.4)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set_xlim(-0.5, len(ticks) - 0.5)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(cells) > 1 or cells[0]:
        handles = [Line2D([], [], color=colour[c], linewidth=2.5, label=c or "—") for c in cells]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False,
                  title="colour", title_fontsize=8)  # fmt: skip
    used = list(dict.fromkeys(machine for _, machine, *_ in series))
    handles = [Line2D([], [], color="0.35", marker=markers[m], linestyle="none", markersize=7, label=m)
               for m in used]  # fmt: skip
    # A figure legend (an axes holds one), below the axes: both count in the saved image's bounds.
    fig.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
               ncol=min(3, len(used)), title="marker: machine", title_fontsize=8)  # fmt: skip
    image = png(fig)
    plt.close(fig)
    return image


def plots(hist: pd.DataFrame, names: dict[str, str], markers: dict[str, str]) -> list[tuple[str, str]]:
    """(caption, base64 PNG): per matrix, model and metric, a colour per method and bit width
    (and settings, where the plot mixes several) and a marker per machine."""
    out = []
    for (matrix, model, metric), g in hist.groupby(["matrix", "model", "metric"], sort=False):
        # This plot's commits only, in order: other matrices' commits would be empty columns.
        commits = g.sort_values("order").drop_duplicates("commit")
        ticks = [f"{c}\n{d[:10]}" for c, d in zip(commits["commit"], commits["date"], strict=True)]
        position = {c: i for i, c in enumerate(commits["commit"])}
        mixed = g["settings"].nunique() > 1
        series = [
            (f"{method} {bits}" + (f" {settings}" if mixed else ""), names[machine],
             list(line["commit"].map(position)), list(line["value"]))
            for (method, bits, settings, machine), line in g.groupby(
                ["method", "bits", "settings", "machine"], sort=False)
        ]  # fmt: skip
        title = f"{matrix} / {model}: {metric} over commits"
        png = _over_commits(title, f"{metric} ({g['unit'].iloc[0]})", ticks, series, markers, 4.2)
        out.append((f"{matrix} / {model}: {metric}", png))
    return out


ASV_UNITS = {"time": "s", "peakmem": "bytes", "mem": "bytes", "track": ""}


def speed_history(results: str | Path) -> pd.DataFrame:
    """asv's results (``.asv/results``, any machine) as rows: machine, benchmark, parameters,
    commit, date, value, unit. Empty when there are none."""
    import itertools

    from asv.results import iter_results

    rows = []
    for result in iter_results(str(results)) if Path(results).is_dir() else ():
        cpu = result.params.get("cpu")  # `asv machine --yes --machine NAME` records none
        machine = str(result.params.get("machine", "?")) + (f" ({cpu})" if cpu else "")
        for name in result.get_all_result_keys():
            params = result.get_result_params(name) or []
            values = result.get_result_value(name, params)
            values = values if isinstance(values, list) else [values]
            combos = list(itertools.product(*params)) if params else [()]
            kind = name.rsplit(".", 1)[-1].split("_", 1)[0]
            for combo, value in zip(combos, values, strict=False):
                if value is None or value != value:  # skipped (GPU benchmark on a CPU) or failed
                    continue
                shown = ", ".join(str(p).strip("'") for p in combo)
                rows.append({"machine": machine, "benchmark": name, "params": shown,
                             "commit": result.commit_hash[:8], "date": result.date, "value": float(value),
                             "unit": ASV_UNITS.get(kind, "")})  # fmt: skip
    columns = ["machine", "benchmark", "params", "commit", "date", "value", "unit"]
    return pd.DataFrame(rows, columns=columns).sort_values(["benchmark", "date"]).reset_index(drop=True)


def speed_plots(speed: pd.DataFrame) -> list[tuple[str, str]]:
    """(caption, base64 PNG): per asv benchmark, its value over commits, a colour per parameter
    set and a marker per machine."""
    machines = sorted(speed["machine"].unique())
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(machines)}
    out = []
    for name, g in speed.groupby("benchmark", sort=False):
        commits = g.sort_values("date").drop_duplicates("commit")["commit"].tolist()
        position = {c: i for i, c in enumerate(commits)}
        unit = g["unit"].iloc[0]
        scale, shown = (2**-20, "MiB") if unit == "bytes" else (1e3, "ms") if unit == "s" else (1, unit)
        series = [
            (params, machine, [position[c] for c in line["commit"]], list(line["value"] * scale))
            for (params, machine), line in g.groupby(["params", "machine"], sort=False)
        ]  # fmt: skip
        out.append((f"asv: {name}", _over_commits(name, shown, commits, series, markers, 3.6)))
    return out


def write(
    root: str | Path, out: str | Path | None = None, asv_results: str | Path | None = None
) -> tuple[Path, Path, str]:
    """Write ``history.md`` and ``history.html`` into ``out`` (default: the results root), with
    asv's speed history from ``asv_results`` (default: ``.asv/results`` of this checkout)."""
    hist = history(root)
    table = summary(hist)
    asv_results = Path(asv_results or REPO_ROOT / ".asv" / "results")
    speed = speed_history(asv_results)
    if asv_results.resolve().is_relative_to(REPO_ROOT):  # shown as the checkout's path, not this disk's
        asv_results = asv_results.resolve().relative_to(REPO_ROOT)
    head = ("matrix", "model", "method", "bits", "metric", "settings", "machine", "commits", "first",
            "latest", "change")  # fmt: skip
    failing = hist.attrs.get("failing", {})
    names = machine_names(sorted(hist["machine"].unique()))
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(names.values())}
    machines = [[MARKER_GLYPHS[markers[name]], name, label] for label, name in names.items()]
    settings = [[label, what] for label, what in hist.attrs.get("settings", {}).items()]
    rows = []
    for r in table.itertuples():
        newest = failing.get((r.matrix, r.model, r.method, r.bits, r.metric))
        latest = f"{r.latest:.4g} ({r.latest_commit})" + (f"; **newest run: {newest}**" if newest else "")
        rows.append([r.matrix, r.model, r.method, r.bits, r.metric, r.settings, names[r.machine], r.commits,
                     f"{r.first:.4g} ({r.first_commit})", latest, f"{r.change:+.3g}"])  # fmt: skip
    lines = [
        f"# Quality over commits: {root}",
        "",
        "First and latest value of every quality cell (mean over seeds) on each machine; plots in "
        "history.html. A cell measured with other settings or on another machine is a line of its own.",
        "",
        "Machines (the marker that stands for each in history.html's plots):",
        "",
        *markdown.table(("marker", "machine", "CPU flags and threads, or GPU"), machines),
        "",
        "Settings: `n=` is the sample count, `#` a hash of the rest of what the run measured with:",
        "",
        *markdown.table(("settings", "what they are"), settings),
        "",
        *markdown.table(head, rows),
    ]
    lines += ["", "## Speed and memory over commits (asv)", ""]
    if speed.empty:
        lines.append(f"No asv results at {asv_results}: `tox -e asv` measures this checkout.")
    else:
        rows = []
        for (name, params, machine), g in speed.groupby(["benchmark", "params", "machine"], sort=False):
            first, last = g.iloc[0], g.iloc[-1]
            rows.append([name, params or "—", machine, len(g), f"{first['value']:.4g} ({first['commit']})",
                         f"{last['value']:.4g} ({last['commit']})"])  # fmt: skip
        lines += markdown.table(("benchmark", "parameters", "machine", "commits", "first", "latest"), rows)
    text = "\n".join(lines) + "\n"
    esc = html.escape

    def figures(pairs) -> str:
        return "".join(f'<h3>{esc(cap)}</h3><img alt="{esc(cap)}" src="data:image/png;base64,{b64}">'
                       for cap, b64 in pairs)  # fmt: skip

    def html_table(head, body) -> str:
        cells = "".join(f"<th>{esc(h)}</th>" for h in head)
        rows = "".join(
            "<tr>" + "".join(f"<td class='name'>{esc(str(c).strip('`'))}</td>" for c in r) + "</tr>"
            for r in body
        )
        return f"<table><tr>{cells}</tr>{rows}</table>"

    speed_html = (
        f"<p>No asv results at <code>{esc(str(asv_results))}</code>: <code>tox -e asv</code> measures "
        "this checkout.</p>"
        if speed.empty
        else f"<p>From <code>{esc(str(asv_results))}</code> (time in ms, memory in MiB).</p>"
        + figures(speed_plots(speed))
    )
    title = f"Quality over commits: {esc(str(root))}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style></head><body><h1>{title}</h1>"
        "<p>One plot per matrix, model and metric; commits left to right in the order of their first "
        "row. A colour is a method at a bit width; a marker shape is a machine, the same on every "
        "plot; points of one colour and shape are joined. A rerun on another machine is a new shape, "
        "not a jump. Where a plot mixes settings, the colour's label names them.</p>"
        f"<h2>Machines</h2>{html_table(('marker', 'machine', 'CPU flags and threads, or GPU'), machines)}"
        "<h2>Settings</h2><p><code>n=</code> is the sample count, <code>#</code> a hash of the rest "
        f"of what the run measured with.</p>{html_table(('settings', 'what they are'), settings)}"
        f"<h2>Quality</h2>{figures(plots(hist, names, markers))}"
        f"<h2>Speed and memory over commits (asv)</h2>{speed_html}</body></html>"
    )
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    md, html_path = out / "history.md", out / "history.html"
    write_atomic(md, text)
    write_atomic(html_path, page)
    return md, html_path, text
