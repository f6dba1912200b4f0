"""Leaderboards and comparisons from a hand-made fixture store (every number known)."""

import math
import re

import numpy as np
import pytest
import torch
from helpers import fixture_store
from scipy import stats

from bench import report
from bench.compare import Threshold, compare, parse_limits, to_markdown
from bench.errors import IncomparableError, StoreError, ThresholdError


def test_leaderboard_cells_deltas_best_and_errors(tmp_path):
    built = report.build(fixture_store(tmp_path / "r"))
    board = report.leaderboard(built.cells)
    assert list(board.columns.get_level_values(0).unique()) == ["W8A8", "W4A8"]
    # Rows without bootstrap replicates (written before intervals existed): mean (sd over seeds)
    # and the mean paired delta to FP of the same seed, no interval and so no rank.
    assert str(board.loc[("embedded-digits", "qdiff"), ("W8A8", "digits_fd")]) == "15.50 (sd 0.71) (+0.50)"
    assert str(board.loc[("embedded-digits", "linear"), ("W8A8", "digits_fd")]) == "40.50 (sd 0.71) (+25.50)"
    assert (
        str(board.loc[("embedded-digits", "fp"), ("W4A8", "digits_fd")]) == "15.00 (sd 1.41)"
    )  # FP in every column
    # Cost cells: (method, bits) × metric; none is highlighted without an FP value to beat.
    cost = report.cost_board(built.cells[built.cells["kind"] == "cost"])
    assert (
        str(cost.loc[("embedded-digits", "linear", "W8A8"), "quantize_time (fd)"]) == "0.500"
    )  # fixture unit
    assert str(board.loc[("embedded-digits", "linear"), ("W4A8", "digits_fd")]) == "error: RuntimeError: boom"
    md = built.markdown
    assert (
        "| embedded-digits | linear |" in md
        and "error [1]" in md
        and "[1] embedded-digits linear: error: RuntimeError: boom" in md
    )
    assert "floor 10.00 ± 1.00 at the same sample count" in md and "| git commit | abc123 |" in md


def test_html_is_self_contained_with_plots_and_hover_errors(tmp_path):
    md, page, _ = report.write(fixture_store(tmp_path / "r"), tmp_path / "out")
    text = page.read_text()
    assert md.is_file() and text.startswith("<!doctype html>")
    assert not re.search(r"""src=["'](?!data:)""", text)  # nothing loaded from outside
    assert re.findall(r"""href=["']([^"']+)""", text) == []  # no link that may not exist offline
    assert text.count("data:image/png;base64,") == 3  # digits_fd and psnr by bits, one Pareto plot
    assert 'class="error" title="error: RuntimeError: boom"' in text


def test_pareto_front():
    # lower cost and better (lower) quality dominate
    assert report.pareto([1, 2, 3, 4], [5.0, 3.0, 4.0, 1.0], higher_is_better=False) == [0, 1, 3]
    assert report.pareto([1, 2, 3], [1.0, 0.5, 2.0], higher_is_better=True) == [0, 2]


def test_compare_flags_regressions_beyond_threshold(tmp_path):
    a = fixture_store(tmp_path / "a")
    b = fixture_store(tmp_path / "b", qdiff_w4=21.0)  # qdiff W4A8 one FD worse
    table = compare(a, b, Threshold.parse("0.5"))
    flagged = table[table["regressed"]]
    assert set(zip(flagged["method"], flagged["bits"], flagged["metric"], strict=True)) == {
        ("qdiff", "W4A8", "digits_fd")
    }
    assert not compare(a, b, Threshold.parse("10%"))["regressed"].any()  # 1/20 = 5% allowed
    assert compare(a, a, Threshold.parse("0"))["regressed"].sum() == 0
    with pytest.raises(ThresholdError, match="not a number or a percentage"):
        Threshold.parse("five")


def test_quality_gate_fails_on_a_planted_regression_and_passes_noise(tmp_path):
    a = fixture_store(tmp_path / "a")
    noise = fixture_store(tmp_path / "noise", qdiff_w4=20.4)  # within 0.5 FD: noise
    planted = fixture_store(tmp_path / "planted", qdiff_w4=26.0)  # 6 FD worse
    limits = parse_limits(["digits_fd=0.5"])
    assert not compare(a, noise, Threshold.parse("0"), limits)["regressed"].any()
    table = compare(a, planted, Threshold.parse("0"), limits)
    assert table["regressed"].sum() == 1  # the qdiff W4A8 cell (its two seeds averaged)
    text = to_markdown(table)
    assert (
        "| embedded-digits | qdiff | W4A8 | digits_fd | 20.5 | 26.5 | 6 | 0.0205 | < 0.001 | 0.5 | "
        "worse **REGRESSION** |" in text
    )
    assert "1 regression(s)" in text and "W8A8" not in text  # only the cells that moved are listed


def test_cost_cells_are_gated_only_when_named(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    a.append([row("qdiff", "W8A8", "quantize_time", 10.0)])
    b.append([row("qdiff", "W8A8", "quantize_time", 30.0)])  # three times slower
    assert not compare(a.root, b.root, Threshold.parse("0"))["regressed"].any()
    assert compare(a.root, b.root, Threshold.parse("0"), parse_limits(["quantize_time=50%"]))[
        "regressed"
    ].all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_samples": 50}, '"n": 100.* vs .*"n": 50'),
        ({"evaluation": {"fid_backend": "clean-fid"}}, "evaluation"),
    ],
)
def test_cells_measured_differently_are_not_compared(tmp_path, change, message):
    from helpers import row

    from bench.store import ResultStore

    metric = "fid"
    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    a.append([row("qdiff", "W8A8", metric, 10.0, evaluation={"fid_backend": "torch-fidelity"})])
    b.append(
        [row("qdiff", "W8A8", metric, 10.0, **{"evaluation": {"fid_backend": "torch-fidelity"}, **change})]
    )
    with pytest.raises(IncomparableError, match=message):
        compare(a.root, b.root, Threshold.parse("0"))


def test_folders_without_a_shared_cell_are_not_compared(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    a.append([row("qdiff", "W8A8", "digits_fd", 10.0)])
    b.append([row("linear", "W8A8", "digits_fd", 10.0)])
    with pytest.raises(IncomparableError, match="share no cell"):
        compare(a.root, b.root, Threshold.parse("0"))


def test_time_split_between_generating_and_measuring(tmp_path):
    import pandas as pd
    from helpers import row

    df = pd.DataFrame([
        row("fp", "FP", "digits_fd", 14.0, sample_s=12.0, metric_s=0.5),
        row("qdiff", "W8A8", "digits_fd", 15.0, sample_s=None, metric_s=0.25),
        row("qdiff", "W8A8", "psnr_vs_fp", 30.0, sample_s=None, metric_s=2.0),
    ])  # fmt: skip
    assert report.time_split(df) == [
        ("embedded-digits fp FP", "12.0", "0.5", "digits_fd (0.5)"),
        ("embedded-digits qdiff W8A8", "cached", "2.2", "psnr_vs_fp (2.0)"),
    ]
    assert report.time_split(df.drop(columns="metric_s")) == []  # rows from before timings existed


def test_history_follows_each_quality_cell_over_commits(tmp_path):
    from helpers import row

    from bench import history
    from bench.store import ResultStore

    store = ResultStore(tmp_path / "results" / "default")
    for day, sha, fd in ((1, "aaaa1111", 20.0), (2, "bbbb2222", 22.0), (3, "cccc3333", 21.0)):
        for seed in (0, 1):
            store.append([
                row("qdiff", "W4A8", "digits_fd", fd + seed, seed, git_sha=sha,
                    started_at=f"2026-01-0{day}T00:00:0{seed}", run_id=f"{sha}-{seed}"),
                row("qdiff", "W4A8", "quantize_time", 9.0, seed, git_sha=sha,
                    started_at=f"2026-01-0{day}T00:00:0{seed}", run_id=f"{sha}-{seed}"),
            ])  # fmt: skip
    hist = history.history(tmp_path / "results")
    assert list(hist["commit"]) == ["aaaa1111", "bbbb2222", "cccc3333"]  # quality only, in order
    assert list(hist["value"]) == [20.5, 22.5, 21.5]  # mean over seeds
    (cell,) = history.summary(hist).itertuples()
    assert (cell.commits, cell.first, cell.latest, cell.change) == (3, 20.5, 21.5, 1.0)
    _, page, text = history.write(tmp_path / "results", asv_results=tmp_path / "no-asv")
    assert re.search(
        r"\| default \| embedded-digits \| qdiff \| W4A8 \| digits_fd \| n=100 #\w{6} \| [^|]+ \| 3 \| "
        r"20\.5 \(aaaa1111\) \| 21\.5 \(cccc3333\) \|",
        text,
    )
    assert page.read_text().count("data:image/png;base64,") == 1
    # Every code the page uses is explained: the machine's marker and the settings hash.
    (settings,) = hist["settings"].unique()
    assert re.search(rf"\| {settings} \| 100 samples; sampling: ", text)
    assert re.search(r"\| ● circle \| [^|]+ \| \? \(\?\) \|", text)
    with pytest.raises(StoreError, match="no results under"):
        history.history(tmp_path / "empty")


def test_history_from_the_command_line_leaves_the_results_root_alone(tmp_path, monkeypatch):
    """The committed history changes only when named (--out results)."""
    from helpers import row

    from bench.cli import main
    from bench.store import ResultStore

    ResultStore(tmp_path / "results" / "default").append([row("qdiff", "W4A8", "digits_fd", 20.0)])
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--history", "results", "--asv", "none"]) == 0
    assert (tmp_path / "qdiff-results" / "history" / "history.html").is_file()
    assert not list((tmp_path / "results").glob("history.*"))
    assert main(["report", "--history", "results", "--asv", "none", "--out", "results"]) == 0
    assert (tmp_path / "results" / "history.md").is_file()


def test_short_machine_names():
    from bench.history import machine_names, short_machine

    xeon = "Intel(R) Xeon(R) Processor (avx2 fma avx512f avx512_vnni amx_tile amx_int8), 2 threads"
    assert short_machine(xeon) == "Intel Xeon, AMX, 2 threads"
    assert short_machine("AMD EPYC (avx2 fma), 1 thread") == "AMD EPYC, AVX2, 1 thread"
    assert short_machine("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    twins = ["AMD EPYC (avx2 fma avx512_vnni), 1 thread", "AMD EPYC (avx2 avx512_vnni avx512_bf16), 1 thread"]
    assert machine_names(twins) == {m: m for m in twins}  # one short name for two: the full labels


def _with_interval(value, half, delta=None, delta_half=None):
    """Row extras of a measurement with a (symmetric) interval and replicates that match it."""
    z = 1.959963984540054
    boot = list(value + np.linspace(-1, 1, 201) * half / z / np.std(np.linspace(-1, 1, 201), ddof=1))
    extra = {"ci_low": value - half, "ci_high": value + half, "boot": boot}
    if delta is not None:
        dboot = list(
            delta + np.linspace(-1, 1, 201) * delta_half / z / np.std(np.linspace(-1, 1, 201), ddof=1)
        )
        extra.update({"delta": delta, "delta_ci_low": delta - delta_half, "delta_ci_high": delta + delta_half,
                      "delta_boot": dboot})  # fmt: skip
    return extra


def test_cells_show_intervals_within_noise_and_tied_ranks(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    store = ResultStore(tmp_path / "r")
    store.append([row("fp", "FP", "digits_fd", 14.0, **_with_interval(14.0, 2.0))])
    store.append([row("linear", "W8A8", "digits_fd", 40.0, **_with_interval(40.0, 4.0, 26.0, 3.0))])
    store.append([row("qdiff", "W8A8", "digits_fd", 15.0, **_with_interval(15.0, 2.0, 1.0, 1.5))])
    store.append([row("smoothquant", "W8A8", "digits_fd", 16.0, **_with_interval(16.0, 2.0, 2.0, 1.5))])
    board = report.leaderboard(report.build(store.root).cells)
    cell = lambda method: str(board.loc[("embedded-digits", method), ("W8A8", "digits_fd")])  # noqa: E731
    assert cell("fp") == "14.00 ± 2.00"
    # qdiff and smoothquant overlap: tied first (bold), both within noise of FP or not by their Δ.
    assert cell("qdiff") == "**15.00 ± 2.00 (+1.00 ± 1.50, ≈FP) #1**"
    assert cell("smoothquant") == "**16.00 ± 2.00 (+2.00 ± 1.50) #1**"
    assert cell("linear") == "40.00 ± 4.00 (+26.00 ± 3.00) #3"


def test_report_never_averages_rows_measured_with_other_settings(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    store = ResultStore(tmp_path / "r")
    # A killed 500-sample run left rows beside the newer 100-sample ones.
    store.append([row("fp", "FP", "digits_fd", 60.0, n_samples=500, started_at="2026-01-01T00:00:00")])
    store.append([row("fp", "FP", "digits_fd", 14.0, seed=1, started_at="2026-01-02T00:00:00")])
    cells = report.build(store.root).cells
    (fp,) = cells.itertuples()
    assert fp.value == 14.0 and fp.seeds == 1 and fp.set_aside == 1
    text = str(report.leaderboard(cells).iloc[0, 0])
    assert "14.00" in text and "1 older row(s) with other settings not averaged in" in text


def test_compare_gates_beyond_the_combined_interval(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    def store(name, value, half):
        s = ResultStore(tmp_path / name)
        s.append([row("qdiff", "W4A8", "digits_fd", value, **_with_interval(value, half))])
        return s.root

    a = store("a", 20.0, 3.0)
    noise = store("noise", 24.0, 3.0)  # 4 worse, inside √(3² + 3²) = 4.24
    planted = store("planted", 29.0, 3.0)  # 9 worse: beyond the noise and a threshold of 1
    assert not compare(a, noise, Threshold.parse("0"))["regressed"].any()
    assert compare(a, noise, Threshold.parse("0"))["note"].tolist() == ["within noise"]
    table = compare(a, planted, Threshold.parse("1"))
    assert table["regressed"].tolist() == [True]
    assert table["noise"].iloc[0] == pytest.approx(math.hypot(3.0, 3.0))
    assert not compare(a, planted, Threshold.parse("5"))["regressed"].any()  # 9 <= 5 + 4.24


def test_compare_reads_the_step_memory_cells_of_two_cost_folders(tmp_path):
    """A step's deployed memory is a cell of its own, taken from latency_step's rows: two
    folders of the same cost matrix compare it like any cost cell (it was once refused as
    "measured differently", its protocol never looked up)."""
    from helpers import row

    from bench.store import ResultStore

    def store(name, ms, mib):
        s = ResultStore(tmp_path / name)
        s.append([row("fp", "FP", "latency_step", ms, unit="ms", kind="cost", step_peak_mib=mib)])
        return s.root

    table = compare(store("a", 100.0, 50.0), store("b", 101.0, 55.0), Threshold.parse("0"))
    memory = table.set_index("metric").loc["step_memory"]
    assert (memory["a"], memory["b"]) == (50.0, 55.0) and memory["note"] == "worse"


def test_history_keeps_rows_measured_differently_on_separate_lines(tmp_path):
    from helpers import row

    from bench import history
    from bench.store import ResultStore

    store = ResultStore(tmp_path / "results" / "default")
    store.append([row("qdiff", "W4A8", "digits_fd", 40.0, n_samples=250, run_id="a", git_sha="aaaa1111")])
    store.append([row("qdiff", "W4A8", "digits_fd", 20.0, n_samples=1000, run_id="b", git_sha="bbbb2222",
                      started_at="2026-01-02T00:00:00")])  # fmt: skip
    hist = history.history(tmp_path / "results")
    assert sorted(hist["value"]) == [20.0, 40.0] and hist["settings"].nunique() == 2
    assert len(history.summary(hist)) == 2  # two cells, never one "changed by −20" line


def test_compare_judges_cells_so_a_run_that_landed_elsewhere_is_not_a_regression(tmp_path):
    """Float rounding on another CPU can send one calibration seed's reconstruction elsewhere;
    the cell (mean over calibration seeds, interval with their spread) is what must hold."""
    from helpers import row

    from bench.store import ResultStore

    def store(name, values):
        s = ResultStore(tmp_path / name)
        for calib, v in enumerate(values):
            s.append([row("qdiff", "W4A8", "eps_mse", v, calib_seed=calib, run_id=f"{name}{calib}",
                          config_hash=f"q{calib}", **_with_interval(v, 0.02))])  # fmt: skip
        return s.root

    a = store("a", [1.60, 1.70, 1.65])
    moved = store("moved", [1.75, 1.62, 1.65])  # one run 0.15 worse: far outside its own ±0.02
    assert compare(a, moved, Threshold.parse("0"))["note"].tolist() == ["within noise"]
    worse = store("worse", [1.90, 2.00, 1.95])  # every run worse: the cell moved
    assert compare(a, worse, Threshold.parse("0"))["regressed"].tolist() == [True]


def test_terminal_summary_wraps_bit_widths_to_the_width(tmp_path):
    from bench.report import build, summary_text

    cells = build(fixture_store(tmp_path / "a")).cells
    text = summary_text(cells, width=30)
    tables = text.split("\n\n", 1)[1]  # after the legend line
    assert all(len(line) <= 30 for line in tables.splitlines() if not line.startswith(("embedded", "error")))
    assert "qdiff" in tables and "(+" in tables and "error" in tables  # Δ to FP; a failed cell
    wide = summary_text(cells, width=200)
    assert len(wide.splitlines()) < len(text.splitlines())  # both bit widths on one line


def test_compare_takes_roots_tolerates_rounding_and_names_machines(tmp_path):
    import json

    from bench.compare import machine_note, matrix_folders, verdict
    from bench.errors import IncomparableError

    a = fixture_store(tmp_path / "a" / "m")
    b = fixture_store(tmp_path / "b" / "m", qdiff_w4=20.0 + 1e-5)  # float dust: no interval here
    assert matrix_folders(tmp_path / "a", b) == [(a, b)]
    assert matrix_folders(tmp_path / "a", tmp_path / "b") == [(a, b)]
    with pytest.raises(IncomparableError, match="expected a matrix folder"):
        matrix_folders(tmp_path / "nothing", b)
    table = compare(a, b, Threshold.parse("0"))
    assert not table["regressed"].any() and "worse" not in set(table["note"])
    assert "7 of 7 quality cells reproduce" in verdict(table)
    assert "not compared: embedded-digits linear W4A8 digits_fd: error in A" in verdict(table)
    assert machine_note(table) is None  # one machine

    for path in (b / "runs").glob("*.jsonl"):  # the candidate measured on another CPU
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "cpu_model": "Other CPU"}) + "\n" for r in rows))
    table = compare(a, b, Threshold.parse("0"))
    assert "Other CPU" in machine_note(table)
    assert "measured on another machine not compared" in verdict(table)
    # A cost limit gates cost cells of one machine only: the summary counts the cells it compared.
    gated = compare(a, b, Threshold.parse("0"), {"quantize_time": Threshold.parse("10%")})
    assert "among 7 gated cells" in to_markdown(gated)
    assert all(len(line) <= 100 for line in [*machine_note(table).splitlines(), *verdict(table).splitlines()])


def test_history_keys_lines_by_machine_and_draws_asv_results(tmp_path):
    from helpers import row, write_asv_results

    from bench import history
    from bench.store import ResultStore

    store = ResultStore(tmp_path / "results" / "default")
    store.append([row("qdiff", "W4A8", "digits_fd", 20.0, run_id="a", git_sha="aaaa1111")])
    # A rerun on another CPU at a later commit: its own line, not a jump of the first one.
    store.append([row("qdiff", "W4A8", "digits_fd", 30.0, run_id="b", git_sha="bbbb2222",
                      started_at="2026-01-02", cpu_model="AMD EPYC", cpu_capability="AVX2")])  # fmt: skip
    table = history.summary(history.history(tmp_path / "results"))
    assert len(table) == 2 and set(table["change"]) == {0.0}
    assert set(table["machine"]) == {"AMD EPYC (AVX2)", "? (?)"}  # the fixture's rows name no CPU

    asv = write_asv_results(tmp_path / "asv")
    speed = history.speed_history(asv)
    assert set(speed["params"]) == {"", "fp, embedded"}  # the skipped x86 value is left out
    _, page, text = history.write(tmp_path / "results", asv_results=asv)
    assert "| bench_step.DenoiserStep.time_step | fp, embedded | m1 (Xeon) | 2 | 0.5 (aaaaaaaa) | 0.6" in text
    html_text = page.read_text()
    assert "asv: bench_harness.Harness.time_load" in html_text and "http" not in html_text  # offline
    _, _, text = history.write(tmp_path / "results", asv_results=tmp_path / "none")
    assert "No asv results at" in text and "tox -e asv" in text


def test_cost_cells_are_bold_only_when_they_beat_fp_and_simulated_latency_is_labelled(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    store = ResultStore(tmp_path / "r")
    fp = row("fp", "FP", "latency_step", 100.0, unit="ms", kind="cost", backend="fp")
    store.append([{**fp, "higher_is_better": False}])
    for method, backend, ms in (("linear", "x86", 70.0), ("qdiff", "x86", 98.0), ("slow", "fake", 60.0)):
        r = row(method, "W8A8", "latency_step", ms, unit="ms", kind="cost", backend=backend)
        store.append([{**r, "higher_is_better": False, "run_id": method, "config_hash": method}])
    cells = report.build(store.root).cells
    board = report.cost_board(cells)
    cell = lambda m: str(board.loc[("embedded-digits", m, "W8A8"), "latency_step (ms)"])  # noqa: E731
    assert cell("linear") == "**70.00 (1.43× faster than FP32 eager)**"  # beats FP by more than 5 %
    assert cell("qdiff") == "98.00 (1.02× faster than FP32 eager)"  # within 5 % of FP: not an improvement
    # A fake-quant latency: never best.
    assert cell("slow") == "60.00 (1.67× faster than FP32 eager) (simulated)"
    assert report.plots(cells) == []  # no front through simulated latencies or a single point


def test_cost_cells_name_their_fp_baseline_and_the_fastest_one(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    store = ResultStore(tmp_path / "r")
    for mode, fp_ms, int8_ms in (("off", 280.0, 240.0), ("inductor", 230.0, 145.0)):
        evaluation = {"compile": mode}
        fp = row("fp", "FP", "latency_step", fp_ms, unit="ms", kind="cost", backend="fp",
                 evaluation=evaluation)  # fmt: skip
        store.append([{**fp, "higher_is_better": False, "run_id": f"fp-{mode}", "config_hash": f"fp-{mode}"}])
        q = row("linear", "W8A8", "latency_step", int8_ms, unit="ms", kind="cost", backend="x86",
                evaluation=evaluation, budget={"backend": "x86"})  # fmt: skip
        store.append([{**q, "higher_is_better": False, "run_id": f"q-{mode}", "config_hash": f"q-{mode}",
                       "reference_hash": f"fp-{mode}"}])  # fmt: skip
    board = report.cost_board(report.build(store.root).cells)
    assert board.index.names == ["model", "method", "bits", "compile"]
    cell = lambda mode: str(board.loc[("embedded-digits", "linear [x86]", "W8A8", mode), "latency_step (ms)"])  # noqa: E731
    assert cell("off") == "240.0 (1.17× faster than FP32 eager) (1.04× slower than FP32 inductor)"
    assert cell("inductor") == "**145.0 (1.59× faster than FP32 inductor)**"


def test_a_timed_cost_cell_gets_the_t_interval_of_its_runs(tmp_path):
    from helpers import row

    from bench.store import ResultStore

    def store(name, seconds):
        s = ResultStore(tmp_path / name)
        for seed, value in enumerate(seconds):
            s.append([row("qdiff", "W4A8", "digits_fd", 20.0, seed),
                      row("qdiff", "W4A8", "quantize_time", value, seed, unit="s")])  # fmt: skip
        return s.root

    # Two runs 10 s apart: the mean is known to ±63 s (t, 1 degree of freedom), so 5 s is noise.
    table = compare(store("a", [70.0, 80.0]), store("b", [76.0, 84.0]), Threshold.parse("0"))
    (cell,) = table[table["metric"] == "quantize_time"].itertuples()
    assert cell.note == "within noise" and 60 < cell.noise < 100
    # One run each: no interval, only the rounding floor, so the 5 s move is listed.
    table = compare(store("c", [70.0]), store("d", [75.0]), Threshold.parse("0"))
    (cell,) = table[table["metric"] == "quantize_time"].itertuples()
    assert cell.note == "worse" and cell.noise == pytest.approx(0.07)


def test_a_cost_is_paired_with_an_fp_run_only_on_the_same_machine_type(tmp_path):
    """On a cluster a quantized run and its FP reference may land on different nodes: a latency
    ratio across two machine types means nothing, so that pair gets none."""
    from helpers import row

    from bench.report import cell_table
    from bench.store import ResultStore, load

    store = ResultStore(tmp_path)
    store.append([row("fp", "FP", "latency_step", 100.0, unit="ms", kind="cost", device="NVIDIA H100")])
    for method, device in (("linear", "NVIDIA H100"), ("qdiff", "NVIDIA A100")):
        r = row(method, "W8A8", "latency_step", 50.0, unit="ms", kind="cost", device=device)
        store.append([{**r, "run_id": method, "config_hash": method}])
    cells = cell_table(load(tmp_path)).set_index(["method", "bits"])
    assert cells.loc[("linear", "W8A8"), "ratio"] == pytest.approx(0.5)
    assert math.isnan(cells.loc[("qdiff", "W8A8"), "ratio"])
    assert math.isnan(cells.loc[("qdiff", "W8A8"), "delta"])


def test_cost_cells_of_two_machines_get_a_table_each_and_no_ratio_across_them(tmp_path):
    """A folder whose cells were timed on two CPUs (the committed perf-cpu-real once mixed an
    AMD EPYC and an Intel Xeon in one table): each machine's cells stand in their own table and
    are read only against that machine's FP, never against a faster machine's compiled FP."""
    from helpers import row

    from bench.report import build
    from bench.store import ResultStore

    store = ResultStore(tmp_path)
    epyc = {"cpu_model": "AMD EPYC", "cpu_flags": "avx2 avx512_vnni"}
    xeon = {"cpu_model": "Intel Xeon", "cpu_flags": "avx2 avx512_vnni amx_int8"}
    timed = [  # (machine, method, bits, compile, ms): eager on the EPYC, compiled on the Xeon
        (epyc, "fp", "FP", "off", 100.0), (epyc, "linear", "W8A8", "off", 60.0),
        (xeon, "fp", "FP", "inductor", 40.0), (xeon, "linear", "W8A8", "inductor", 20.0),
    ]  # fmt: skip
    for where, method, bits, compiled, ms in timed:
        r = row(method, bits, "latency_step", ms, unit="ms", kind="cost", device="cpu (x86_64, 2 threads)",
                evaluation={"compile": compiled}, **where)  # fmt: skip
        name = f"{method}-{compiled}"
        store.append([{**r, "run_id": name, "config_hash": name, "reference_hash": f"fp-{compiled}"}])
    report = build(tmp_path)
    cells = report.cells[report.cells["method"] == "linear"].set_index("compile")
    assert cells.loc["off", "ratio"] == pytest.approx(0.6)
    assert cells.loc["inductor", "ratio"] == pytest.approx(0.5)
    # Each machine has one FP baseline: no "fastest FP" is taken from the other machine (the
    # EPYC's eager 60 ms against the Xeon's compiled 40 ms would read 1.5x).
    assert cells["fastest_ratio"].isna().all()
    for cpu in (
        "AMD EPYC (avx2 avx512_vnni), 2 threads",
        "Intel Xeon (avx2 avx512_vnni amx_int8), 2 threads",
    ):
        assert f"## Cost on {cpu}" in report.markdown
    assert report.markdown.count("## Cost on ") == 2


def test_cost_cells_read_against_the_runtimes_own_ptq_on_the_same_machine(tmp_path):
    """NNCF on OpenVINO is what a CPU deployer runs without this suite (``runtime_reference``):
    every other quantized cost cell of its model, bits and machine also reads as a ratio to it,
    and nothing reads against another machine's NNCF."""
    from helpers import row

    from bench.report import build
    from bench.store import ResultStore

    store = ResultStore(tmp_path)
    timed = [("AMD EPYC", "fp", "FP", 100.0), ("AMD EPYC", "nncf-ptq", "W8A8", 40.0),
             ("AMD EPYC", "linear", "W8A8", 50.0), ("Intel Xeon", "qdiff", "W8A8", 30.0)]  # fmt: skip
    for cpu, method, bits, ms in timed:
        r = row(method, bits, "latency_step", ms, unit="ms", kind="cost", cpu_model=cpu, cpu_flags="avx2")
        store.append([{**r, "run_id": method, "config_hash": method, "reference_hash": "fp"}])
    report = build(tmp_path)
    cells = report.cells.set_index("method")
    assert cells.loc["linear", "reference"] == "nncf-ptq"
    assert cells.loc["linear", "reference_ratio"] == pytest.approx(1.25)
    assert cells.loc[["fp", "nncf-ptq", "qdiff"], "reference"].isna().all()
    assert "1.25× slower than nncf-ptq" in report.markdown


def test_the_gate_holds_its_false_alarm_rate_over_a_matrix_and_catches_a_planted_regression():
    """10,000 synthetic clean reruns of the committed default matrix's gated quality cells, each
    cell moving run to run by the spread its interval measured (normal, sd = half-width / 1.96),
    go through the gate's decision (per-cell p-values, Holm over the matrix). Clean reruns may
    flag a cell at most 5 % of the time (per-cell 95 % rules flag one in most reruns); one cell
    planted worse by twice its combined 95 % interval is caught at least 80 % of the time, as
    Holm's first step predicts for this many cells (the simulation must agree with it)."""
    from pathlib import Path

    from bench.compare import FAMILY_ALPHA, Z95, _cells, p_worse
    from bench.stats import holm

    cells = _cells(Path(__file__).resolve().parent.parent / "results" / "default")
    quality = cells[(cells["kind"] == "quality") & (cells["status"] == "ok")]
    sd = quality["half_width"].to_numpy() / Z95
    m = len(sd)
    assert m >= 12 and (sd > 0).all()
    draws = 10_000
    rng = np.random.default_rng(0)
    noise = Z95 * np.sqrt(2) * sd  # the combined interval compare() computes for A and B
    worse_by = rng.normal(0, sd, (draws, m)) - rng.normal(0, sd, (draws, m))  # B − A, worse side
    p = stats.norm.sf(worse_by / (noise / Z95))
    assert p[0, 0] == pytest.approx(p_worse(worse_by[0, 0], noise[0]))  # the gate's own p
    planted = p.copy()
    planted[:, 0] = stats.norm.sf((worse_by[:, 0] + 2 * noise[0]) / (noise[0] / Z95))
    holm_alarms = sum(any(holm(row, FAMILY_ALPHA)) for row in p)
    caught = sum(holm(row, FAMILY_ALPHA)[0] for row in planted)
    plain = (worse_by > noise).any(axis=1).sum()
    assert holm_alarms <= 0.05 * draws and plain > 0.2 * draws
    # Holm rejects the planted cell at least when its p clears alpha / m: the power of that step.
    first_step = stats.norm.sf(stats.norm.isf(FAMILY_ALPHA / m) - 2 * Z95)
    assert first_step >= 0.80
    assert abs(caught / draws - first_step) < 0.02 and caught >= 0.80 * draws


@pytest.mark.parametrize(
    ("qdiff_gap", "linear_gap", "linear_half", "side"),
    [(2.0, 10.0, 1.0, "below"), (4.0, 10.0, 1.0, "above"), (2.5, 10.0, 6.0, "undecided")],
)
def test_the_papers_ratio_carries_a_paired_interval(tmp_path, qdiff_gap, linear_gap, linear_half, side):
    """Q-Diffusion's gap as a fraction of linear PTQ's: the ratio of the cell means, its interval
    from replicates that draw the same images for both, and which side of ¼ it is on."""
    from helpers import row

    from bench import claims
    from bench.store import ResultStore, load

    store = ResultStore(tmp_path / "r")
    for method, gap, half in (("qdiff", qdiff_gap, 0.1), ("linear", linear_gap, linear_half)):
        store.append([row(method, "W4A8", "digits_fd", 20 + gap, **_with_interval(20 + gap, 1.0, gap, half))])
    [(model, bits, metric, ratio, interval, found)] = claims.gap_ratios(load(store.root))
    assert (model, bits, metric) == ("embedded-digits", "W4A8", "digits_fd")
    assert float(ratio) == pytest.approx(qdiff_gap / linear_gap, abs=0.01) and found == side
    low, high = map(float, interval.split(" – "))
    assert low < float(ratio) < high
    assert "## Q-Diffusion against naive PTQ" in report.build(store.root).markdown


def test_report_shows_each_runs_first_samples_from_the_same_noise(warm_caches, tmp_path):
    """report.html embeds, per model, the first samples of FP and of each method × bits as
    thumbnails cut from the run's grid; report.md links the grids, relative to where it lies."""
    import base64
    import io
    from urllib.parse import unquote

    from PIL import Image

    results = warm_caches("[linear, qdiff-no-recon]", "[W8A8]")[1]
    md, page, _ = report.write(results, tmp_path / "out")
    section = page.read_text().split("<h2>Samples</h2>", 1)[1].split("<h2>", 1)[0]
    shown = re.findall(
        r"<tr><td class='name'>([^<]*)</td><td><img alt='[^']*' src='data:image/png;base64,([^']*)'>", section
    )
    assert [label for label, _ in shown] == ["fp FP", "linear W8A8", "qdiff-no-recon W8A8"]
    for _, data in shown:
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert 0 < thumb.height <= 96 and thumb.width > 4 * thumb.height  # a row of samples
    # The FP row is the first samples of FP's own grid, no other run's.
    fp_grid = next((results / "samples").glob("embedded-digits-fp-FP-s0.png"))
    assert base64.b64decode(shown[0][1]) == report.samples.strip(fp_grid, report.samples.SHOWN)
    text = md.read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", text.split("## Samples", 1)[1])
    assert len(links) == 3 and all((md.parent / unquote(link)).is_file() for link in links)


def test_a_grid_strip_is_its_first_samples_and_a_bad_grid_no_picture(tmp_path):
    from PIL import Image

    from bench.images import save_grid, strip

    images = torch.randint(
        0, 256, (10, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    path = save_grid(images, tmp_path / "g.png", columns=4)
    import io

    cut = Image.open(io.BytesIO(strip(path, count=3, height=1000)))
    assert cut.size == (3 * 65 + 1, 66)  # three 64² tiles with their 1-px borders, unscaled
    pixels = torch.from_numpy(np.array(cut)).permute(2, 0, 1)
    for i in range(3):
        assert torch.equal(pixels[:, 1:65, 1 + 65 * i : 65 + 65 * i], images[i])
    Image.fromarray(np.zeros((40, 400, 3), np.uint8)).save(tmp_path / "plain.png")  # no layout
    assert Image.open(io.BytesIO(strip(tmp_path / "plain.png", count=2, height=10))).size == (
        20,
        2,
    )  # 2 × 10 wide
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    assert strip(tmp_path / "bad.png") is None and strip(tmp_path / "none.png") is None
