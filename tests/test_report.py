"""Leaderboards and comparisons from a hand-made fixture store (every number known)."""

import re

import pytest
from helpers import fixture_store

from bench import report
from bench.compare import IncomparableError, Threshold, ThresholdError, compare, parse_limits, to_markdown
from bench.store import StoreError


def test_leaderboard_cells_deltas_best_and_errors(tmp_path):
    built = report.build(fixture_store(tmp_path / "r"))
    board = report.leaderboard(built.cells)
    assert list(board.columns.get_level_values(0).unique()) == ["W8A8", "W4A8"]
    # mean ± sd over two seeds, and the mean paired delta to FP of the same seed
    assert board.loc[("embedded-digits", "qdiff"), ("W8A8", "digits_fd")] == "**15.50 ± 0.71 (+0.50)**"
    assert board.loc[("embedded-digits", "linear"), ("W8A8", "digits_fd")] == "40.50 ± 0.71 (+25.50)"
    assert board.loc[("embedded-digits", "qdiff"), ("W8A8", "psnr_vs_fp")].startswith(
        "**30.00"
    )  # higher wins
    assert board.loc[("embedded-digits", "fp"), ("W4A8", "digits_fd")] == "15.00 ± 1.41"  # FP in every column
    assert board.loc[("embedded-digits", "linear"), ("W4A8", "digits_fd")] == "error: RuntimeError: boom"
    md = built.markdown
    assert (
        "| embedded-digits | linear |" in md
        and "error [1]" in md
        and "[1] embedded-digits linear: error: RuntimeError: boom" in md
    )
    assert "real-vs-real floor 10.00 ± 1.00" in md and "| git commit | abc123 |" in md


def test_html_is_self_contained_with_plots_and_hover_errors(tmp_path):
    md, page, _ = report.write(fixture_store(tmp_path / "r"), tmp_path / "out")
    text = page.read_text()
    assert md.is_file() and text.startswith("<!doctype html>")
    assert not re.search(r"""src=["'](?!data:)""", text)  # nothing loaded from outside
    assert re.findall(r"""href=["']([^"']+)""", text) == ["../../.asv/html/index.html"]  # asv's graphs
    assert text.count("data:image/png;base64,") == 3  # digits_fd and psnr by bits, one Pareto plot
    assert 'class="error" title="error: RuntimeError: boom"' in text and 'class="best"' in text


def test_pareto_front():
    # lower cost and better (lower) quality dominate
    assert report._pareto([1, 2, 3, 4], [5.0, 3.0, 4.0, 1.0], higher_is_better=False) == [0, 1, 3]
    assert report._pareto([1, 2, 3], [1.0, 0.5, 2.0], higher_is_better=True) == [0, 2]


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
    assert table["regressed"].sum() == 2  # qdiff W4A8 at both seeds
    text = to_markdown(table)
    assert (
        "| embedded-digits | qdiff | W4A8 | 0 | digits_fd | 20 | 26 | 6 | 0.5 | worse **REGRESSION** |"
        in text
    )
    assert "2 regression(s)" in text and "W8A8" not in text  # only the cells that moved are listed


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
        ({"n_samples": 50}, "n_samples: 100 vs 50"),
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
    _, page, text = history.write(tmp_path / "results")
    assert (
        "| default | embedded-digits | qdiff | W4A8 | digits_fd | 3 | 20.5 (aaaa1111) | 21.5 (cccc3333) |"
        in text
    )
    assert page.read_text().count("data:image/png;base64,") == 1
    with pytest.raises(StoreError, match="no results under"):
        history.history(tmp_path / "empty")
