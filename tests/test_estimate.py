"""The time estimate ``validate`` prints, and the progress a long run reports."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import tiny_matrix

from bench import estimate as est
from bench import progress
from bench.matrix import load_matrix
from bench.provenance import REPO_ROOT


def test_estimate_counts_shared_work_once_and_scales_with_the_budget(monkeypatch):
    runs = load_matrix(REPO_ROOT / "configs" / "default.yaml").expand()
    monkeypatch.setattr(est, "step_rate", lambda spec: 1e-3)
    found = est.estimate(runs, workers=2)
    fp, qdiff = runs[0], next(r for r in runs if r.method == "qdiff")
    assert found.seconds > est.run_seconds(qdiff, 1e-3, set())
    shared: set = set()
    first = est.run_seconds(fp, 1e-3, shared)
    assert est.run_seconds(fp, 1e-3, shared) < first  # the FP samples are counted once
    longer = dataclasses.replace(qdiff, budget=dataclasses.replace(qdiff.budget, weight_iters=1000))
    assert est.run_seconds(longer, 1e-3, set()) > 2 * est.run_seconds(qdiff, 1e-3, set())
    linear = next(r for r in runs if r.method == "linear")
    assert est.run_seconds(linear, 1e-3, set()) < est.run_seconds(qdiff, 1e-3, set())
    assert est.estimate(runs, workers=1).seconds > found.seconds  # fewer workers, longer


def test_estimate_times_the_model_here(tmp_path):
    runs = load_matrix(tiny_matrix(tmp_path, methods="[qdiff]", bits="[W4A8]")).expand()
    found = est.estimate(runs, workers=1)
    (rate,) = found.rates.values()
    assert 0 < rate < 1 and 0 < found.seconds < 3600 and not found.unknown


def test_a_model_that_cannot_be_timed_is_named_not_guessed(tmp_path, monkeypatch):
    def fail(spec):
        raise RuntimeError("no CUDA here")

    monkeypatch.setattr(est, "step_rate", fail)
    runs = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")).expand()
    logged = []
    found = est.estimate(runs, workers=1, log=logged.append)
    assert found.seconds is None and found.unknown == ("embedded-digits",) and "no CUDA here" in logged[0]


def test_progress_lines_report_count_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    phase = progress.Tracker("lines", "digits qdiff W4A8").phase("reconstruction", "units")
    for done in range(1, 5):
        phase(done, 4)
    err = capsys.readouterr().err
    assert "  digits qdiff W4A8: reconstruction 2/4 units, " in err and "ETA" in err  # rate from the 1st
    assert "reconstruction done: 4 units in" in err
    assert progress.Tracker(None, "x").phase("sampling", "steps") is None
    with pytest.raises(ValueError, match="choose from bar, lines"):
        progress.Tracker("fancy", "x")


def test_reconstruction_reports_every_unit_up_to_its_total():
    import torch
    from helpers import calib_for

    import qdiff
    from bench.embedded.model import load_unet

    torch.manual_seed(0)
    unet = load_unet()
    data = calib_for(unet, n=8, timesteps=2)
    config = qdiff.QConfig(recon=qdiff.ReconConfig(weight_iters=1, act_iters=1, batch_size=4))
    calls = []
    qdiff.quantize(unet, config, data, batch_size=8, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert calls == [(i, total) for i in range(1, total + 1)] and total > 10


def test_estimatecheck_reads_every_complete_record_against_the_estimate(tmp_path, monkeypatch):
    import json

    from bench import estimatecheck

    monkeypatch.setattr(estimatecheck, "estimate", lambda runs, workers, log: est.Estimate(30.0, {}, ()))
    folder = tmp_path / "results" / "small" / "invocations"
    folder.mkdir(parents=True)
    record = {"matrix": "small", "started_at": "2026-01-01T00:00:00", "wall_s": 20.0, "runs": 2, "runs_ok": 2,
              "workers": 2, "threads_per_worker": 1, "peak_rss_main_mib": 1.0, "cache_files_at_start": 0,
              "git_sha": "abcdef0123", "cpu_model": "AMD EPYC", "cpu_flags": "avx2"}  # fmt: skip
    (folder / "a.json").write_text(json.dumps(record))
    (folder / "b.json").write_text(json.dumps({**record, "runs_ok": 1}))  # cut short: not compared
    out = tmp_path / "figures.json"
    estimatecheck.main([str(REPO_ROOT / "configs" / "small.yaml"), "--results", str(tmp_path / "results"),
                        "--out", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["records"]
    assert (row["estimate_s"], row["measured_s"], row["ratio"], row["measured_at"]) == (
        30.0,
        20.0,
        1.5,
        "abcdef0",
    )


def test_estimatecheck_names_a_bad_matrix_file_in_one_line_and_writes_nothing(tmp_path):
    from bench import estimatecheck

    out = tmp_path / "figures.json"
    with pytest.raises(SystemExit, match=r"estimatecheck: error: matrix file .*nosuch\.yaml does not exist"):
        estimatecheck.main([str(tmp_path / "nosuch.yaml"), "--out", str(out)])
    assert not out.exists()
