"""The runner: paired rows with provenance, isolation of failures, resume without loss or
duplicates, shared FP/calibration work, and dependency waves."""

from pathlib import Path

import pytest
from helpers import BOOM, INTERRUPT, registered, tiny_matrix

from bench.matrix import load_matrix
from bench.registry import METHODS
from bench.runner import (
    Interrupted,
    LocalExecutor,
    ProcessExecutor,
    dependencies,
    plan,
    run_matrix,
    waves,
)
from bench.runner.execute import execute
from bench.store import COLUMNS, ResultStore, load


def quiet(_msg):
    pass


def run(matrix, root, **kw):
    return run_matrix(matrix, root, progress=False, log=quiet, **kw)


@pytest.mark.slow
def test_rows_are_complete_paired_and_reproducible(tmp_path):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear, qdiff]", bits="[W8A8, W4A8, W4A32]"))
    rows = run(matrix, tmp_path / "results")
    assert all(set(COLUMNS) <= set(r) for r in rows)
    assert all(r["status"] == "ok" and r["git_sha"] and r["torch"] and r["device"] for r in rows)
    fp = [r for r in rows if r["method"] == "fp"]
    assert [r["metric"] for r in fp] == ["digits_fd"] and fp[0]["floor"] > 0
    quant = [r for r in rows if r["method"] != "fp"]
    assert {r["reference_hash"] for r in quant} == {fp[0]["config_hash"]}
    assert {r["metric"] for r in quant} == {"digits_fd", "psnr_vs_fp", "quantize_time"}
    q = {(r["method"], r["bits"]): r for r in quant if r["metric"] == "digits_fd"}
    assert q[("qdiff", "W4A8")]["qconfig"]["split_shortcut"] is True
    assert q[("qdiff", "W4A32")]["weights_from"] is None and q[("qdiff", "W4A8")]["weights_from"] is None
    # 8-bit linear quantization stays closer to FP images than 4-bit weights (paired PSNR).
    psnr = {(r["method"], r["bits"]): r["value"] for r in quant if r["metric"] == "psnr_vs_fp"}
    assert psnr[("linear", "W8A8")] > psnr[("linear", "W4A8")]
    assert (tmp_path / "results" / "tiny" / "samples" / "embedded-digits-qdiff-W4A8-s0c0.png").is_file()
    # Quality rows carry their interval, and quantized ones the paired delta with its own.
    fd = q[("qdiff", "W4A8")]
    assert fd["ci_low"] < fd["value"] < fd["ci_high"] and len(fd["boot"]) == fd["n_resamples"]
    assert fd["delta"] == pytest.approx(fd["value"] - fp[0]["value"])
    assert fd["delta_ci_low"] < fd["delta"] < fd["delta_ci_high"]
    # Reconstruction's record travels with the run: held-out eps error per timestep, reverts.
    recon = q[("qdiff", "W4A8")]["recon"]
    assert len(recon["eps_before"]) == len(recon["timesteps"]) and recon["units"] > 0
    assert q[("linear", "W4A8")]["recon"] is None

    # The estimate reads the plan the runner executes: the artefacts it charges once each are
    # the cache entries the runner built (samples, calibration inputs, checkpoints).
    from bench.cache import cache_dir
    from bench.runner.plan import artefacts

    kinds = list({a.key: a.kind for spec in matrix.runs for a in artefacts(spec)}.values())
    entries = {k: len([*(cache_dir() / k).glob("*.pt"), *(cache_dir() / k).glob("*.safetensors")])
               for k in ("samples", "calibration", "checkpoints")}  # fmt: skip
    assert entries["samples"] == kinds.count("fp-samples") + kinds.count("samples") == 7
    assert entries["calibration"] == kinds.count("calibration") > 0
    assert entries["checkpoints"] == kinds.count("checkpoint") == 6

    # A rerun adds nothing; --force recomputes from the caches and reproduces every value.
    assert run(matrix, tmp_path / "results") == []
    again = run(matrix, tmp_path / "results", force=True)
    assert values(again) == values(rows)


def test_eps_error_is_measured_per_sampler_step(tmp_path):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W4A8]", metrics="[eps_mse]"))
    (row,) = [r for r in run(matrix, tmp_path / "results") if r["method"] != "fp"]
    steps = matrix.expand()[-1].sampling.steps
    assert (
        len(row["timesteps"]) == len(row["per_step"]) == steps and row["timesteps"][0] > row["timesteps"][-1]
    )
    assert row["value"] == pytest.approx(sum(row["per_step"]) / steps, rel=1e-4) and row["value"] > 0
    assert row["ci_low"] < row["value"] < row["ci_high"]


def values(rows):
    return {(r["config_hash"], r["metric"]): r["value"] for r in rows if r["metric"] != "quantize_time"}


def test_failures_become_rows_and_the_matrix_goes_on(tmp_path, monkeypatch):
    registered(monkeypatch, METHODS, BOOM)
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[boom, linear]", bits="[W8A8]"))
    rows = run(matrix, tmp_path)
    errors = [r for r in rows if r["status"] == "error"]
    assert {r["metric"] for r in errors} == {"digits_fd", "psnr_vs_fp", "quantize_time"}
    assert all(r["value"] is None and "OutOfMemoryError: CUDA out of memory" in r["error"] for r in errors)
    assert any(r["method"] == "linear" and r["status"] == "ok" for r in rows)
    # Errors are not "done": the next run retries them (and only them).
    todo = [p.spec.method for p in plan(matrix, ResultStore(tmp_path / "tiny")) if p.state != "done"]
    assert todo == ["boom"]


def test_missing_model_weights_are_a_skipped_row(tmp_path):
    path = tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]", metrics="[psnr_vs_fp, quantize_time]")
    text = Path(path).read_text()
    Path(path).write_text(text.replace("[embedded-digits]", "[{name: ddim-cifar10, source: no-org/absent}]"))
    rows = run(load_matrix(path), tmp_path)
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert "not available offline" in rows[0]["error"] and "source: /local/dir" in rows[0]["error"]


def test_interrupted_matrix_resumes_without_lost_or_duplicated_rows(tmp_path, monkeypatch):
    registered(monkeypatch, METHODS, INTERRUPT)
    path = tiny_matrix(tmp_path, methods="[linear, interrupt, qdiff-no-recon]", bits="[W8A8]")
    with pytest.raises(Interrupted, match=r"2 run\(s\) finished and kept; 2 left"):
        run(load_matrix(path), tmp_path)
    store = ResultStore(tmp_path / "tiny")
    assert not list((store.runs / ".claims").iterdir())  # the unfinished runs are free again
    first = store.rows()
    assert {r["method"] for r in first} == {"fp", "linear"}  # finished runs kept, nothing partial
    # The user fixes the method (here: drops it) and resumes: only the rest runs.
    registered(monkeypatch, METHODS, METHODS.get("qdiff-no-split"), "interrupt")
    new = run(load_matrix(path), tmp_path)
    assert {r["method"] for r in new} == {"interrupt", "qdiff-no-recon"}
    rows = store.rows()
    keys = [(r["config_hash"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(first) + len(new)


def test_only_filters_and_fp_samples_are_shared_through_the_cache(tmp_path, monkeypatch):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear, qdiff-no-recon]", bits="[W8A8, W4A8]"))
    sampled = []
    from bench.models.embedded import EmbeddedDigits

    original, original_loop = EmbeddedDigits.sample, EmbeddedDigits.trajectories

    def counting(self, denoiser, n, seed, recorder=None, progress=False):
        quantized = any("Quant" in type(m).__name__ for m in denoiser.modules())
        sampled.append("quantized" if quantized else "fp")
        return original(self, denoiser, n, seed, recorder, progress)

    def counting_loop(self, denoiser, n, seed, recorder=None, progress=None, split="evaluation"):
        if recorder is not None:  # calibration runs the sampler loop alone
            sampled.append("calibration")
        return original_loop(self, denoiser, n, seed, recorder, progress, split)

    monkeypatch.setattr(EmbeddedDigits, "sample", counting)
    monkeypatch.setattr(EmbeddedDigits, "trajectories", counting_loop)
    rows = run(matrix, tmp_path, only={"method": ("qdiff*",), "bits": ("W4*",)})
    assert {(r["method"], r["bits"]) for r in rows} == {("qdiff-no-recon", "W4A8")}
    run(matrix, tmp_path)
    # FP sampled once for all runs; calibration once per strategy (final for linear, uniform).
    assert sampled.count("fp") == 1 and sampled.count("calibration") == 2 and sampled.count("quantized") == 4


def test_executor_is_an_interface(tmp_path):
    class Reversed(LocalExecutor):
        def map(self, fn, specs, needs):
            yield from super().map(fn, list(reversed(specs)), needs)

    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8, W4A32]"))
    rows = run(matrix, tmp_path, executor=Reversed())
    assert {r["status"] for r in rows} == {"ok"}
    df = load(tmp_path / "tiny")
    assert set(df["bits"]) == {"FP", "W8A8", "W4A32"}


def test_waves_put_fp_first_and_refining_runs_after_their_bases(tmp_path):
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[qdiff, linear, ptqd]", bits="[W4A32, W8A32, W4A8]"))
    labels = [[f"{s.method} {s.bits_label}" for s in wave] for wave in waves(matrix.expand())]
    assert labels == [
        ["fp FP"],
        ["qdiff W4A32", "qdiff W8A32", "qdiff W4A8", "linear W4A32", "linear W8A32", "linear W4A8"],
        ["ptqd W4A32", "ptqd W8A32", "ptqd W4A8"],  # ptqd refines qdiff's model at its bit width
    ]


@pytest.mark.slow
def test_process_executor_runs_side_by_side_and_survives_a_dead_worker(tmp_path):
    from concurrent.futures.process import BrokenProcessPool
    from functools import partial

    from helpers import die

    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8, W4A32]"))
    rows = run(matrix, tmp_path, executor=ProcessExecutor(workers=2, threads=1))
    assert {r["status"] for r in rows} == {"ok"} and len({r["config_hash"] for r in rows}) == 3
    specs = matrix.expand()[:2]
    dead = list(
        ProcessExecutor(workers=1, threads=1).map(partial(die, matrix="m"), specs, dependencies(specs))
    )
    assert len(dead) == 2 and all(isinstance(outcome, BrokenProcessPool) for _, outcome in dead)

    class Dying(LocalExecutor):
        def map(self, fn, specs, needs):
            for spec in specs:
                yield spec, BrokenProcessPool("A process in the process pool was terminated abruptly")

    rows = run(matrix, tmp_path / "dying", executor=Dying())
    assert rows and all(r["status"] == "error" and r["error"].startswith("worker died: Broken") for r in rows)


def test_execute_is_self_contained(tmp_path):
    spec = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W4A8]")).expand()[-1]
    rows = execute(spec, matrix="m")
    assert {r["metric"] for r in rows} == {"digits_fd", "psnr_vs_fp", "quantize_time"}
    assert all(r["matrix"] == "m" and r["config_hash"] == spec.hash for r in rows)


def test_a_metric_that_cannot_run_here_is_skipped_and_the_others_count(tmp_path):
    """FID on a model with no reference data set: a skipped row naming the setting; the
    run's other metrics are measured, and the run stays 'partial' for a later resume."""
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]", metrics="[digits_fd, fid]"))
    rows = run_matrix(matrix, tmp_path / "results", progress=False, log=lambda _: None)
    states = {(r["method"], r["metric"]): (r["status"], r["error"]) for r in rows}
    assert states["linear", "digits_fd"] == ("ok", None) and states["fp", "digits_fd"] == ("ok", None)
    status, error = states["linear", "fid"]
    assert status == "skipped" and "set fid_reference: /path/to/images" in error
    assert {p.state for p in plan(matrix, ResultStore(tmp_path / "results" / "tiny"))} == {"partial"}


def test_a_checkpoint_is_not_shared_between_samplings_that_calibrate_differently(tmp_path):
    """Calibration inputs come from the FP trajectories, so two matrices that sample the same
    model differently (here: steps; guidance scale likewise) calibrate, and quantize, apart."""
    rows = run(load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")), tmp_path / "a")
    (tmp_path / "b").mkdir()
    other = Path(tiny_matrix(tmp_path / "b", methods="[linear]", bits="[W8A8]"))
    other.write_text(other.read_text().replace("steps: 4", "steps: 3"))
    again = run(load_matrix(other), tmp_path / "a")  # same results root, same cache
    cached = {r["cached"] for r in again if r["metric"] == "quantize_time"}
    assert cached == {False} and {r["cached"] for r in rows if r["metric"] == "quantize_time"} == {False}


def test_quantizing_reports_its_peak_memory_with_the_fp_model_once(tmp_path):
    import qdiff
    from bench.embedded.model import load_unet

    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]",
                                     metrics="[quantize_time, quantize_peak_memory]"))  # fmt: skip
    rows = run(matrix, tmp_path / "results")
    peak = next(r for r in rows if r["metric"] == "quantize_peak_memory")
    assert peak["status"] == "ok" and peak["unit"] == "MiB"
    assert qdiff.resident_bytes(load_unet()) / 2**20 < peak["value"] < 4096
    # A second run reuses the checkpoint and reports its original peak.
    again = next(r for r in run(matrix, tmp_path / "again") if r["metric"] == "quantize_peak_memory")
    assert again["value"] == peak["value"] and again["cached"]


def test_progress_goes_in_lines_not_bars_where_stderr_is_a_log(tmp_path, capsys):
    """A bar's carriage returns would flood a log file or CI: off a terminal, the runs in this
    process report progress as the worker processes do, in plain lines."""
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]"))
    run_matrix(matrix, tmp_path / "r", progress=True, log=print)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "steps/s" not in captured.err
    assert "[2/2]" in captured.out  # the count of finished runs leads each run's line instead
