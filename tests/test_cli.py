"""The command line: user errors are one clear line; a small real run writes complete rows."""

import json

import pytest

from bench.cli import main
from bench.methods import Bits, BitsError

SCHEMA = {
    "run_id",
    "matrix",
    "model",
    "method",
    "w_bits",
    "a_bits",
    "seed",
    "metric",
    "value",
    "unit",
    "higher_is_better",
    "n_samples",
    "status",
    "error",
    "device",
    "torch",
    "cuda",
    "git_sha",
    "config_hash",
    "started_at",
    "duration_s",
}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--methods", "qdif"], "unknown method 'qdif' (did you mean 'qdiff'?); valid: linear, qdiff"),
        (["run", "--bits", "W1A8"], "weight bits 1 are out of range; use 2–16, or 32 for full precision"),
        (["run", "--bits", "4bit"], "not of the form W<bits>A<bits>"),
        (["run", "--samples", "5000"], "n_samples=5000 must be in 2–899"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_bits_labels():
    assert Bits.parse("w4a32") == Bits(4, None) and Bits(4, None).label == "W4A32"
    with pytest.raises(BitsError, match="quantizes nothing"):
        Bits.parse("W32A32")


def test_ls_lists_methods(capsys):
    assert main(["ls"]) == 0
    assert "linear" in capsys.readouterr().out


def test_small_run_writes_paired_rows_and_a_table(capsys, tmp_path):
    argv = [
        "run",
        "--methods",
        "linear",
        "--bits",
        "W8A8,W4A32",
        "--samples",
        "40",
        "--steps",
        "10",
        "--threads",
        "2",
        "--results",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| linear |" in out and "W4A32" in out and "real data (floor)" in out
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "rows.jsonl").read_text().splitlines()]
    assert all(set(r) >= SCHEMA for r in rows)
    fd = {(r["method"], r["w_bits"], r["a_bits"]): r["value"] for r in rows if r["metric"] == "digits_fd"}
    assert set(fd) == {("real-data", None, None), ("fp", None, None), ("linear", 8, 8), ("linear", 4, None)}
    assert all(r["status"] == "ok" and r["seed"] == 0 and r["n_samples"] == 40 for r in rows)
    # Paired with FP on the same noise: 8 bits stays closer to FP than 4-bit weights.
    assert abs(fd[("linear", 8, 8)] - fd[("fp", None, None)]) < abs(
        fd[("linear", 4, None)] - fd[("fp", None, None)]
    )
    # A second run appends (never rewrites) and reuses the cached FP samples.
    assert main(argv) == 0
    lines = (tmp_path / "smoke" / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(rows)
    assert json.loads(lines[len(rows) + 1])["cached"] is True


def test_missing_checkpoint_is_one_clear_line(capsys, tmp_path, monkeypatch):
    import bench.embedded.model

    monkeypatch.setattr(bench.embedded.model, "ASSETS", tmp_path / "assets")
    assert main(["run", "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qdiff-bench: error: missing") and "python -m bench.embedded.train" in err
    assert "\n" not in err


def test_qdiff_runs_share_the_weight_phase_between_w4a8_and_w4a32(tmp_path):
    from bench.models.embedded import SamplerConfig
    from bench.run import Budget, ExperimentConfig, run_experiment

    config = ExperimentConfig(
        name="share", methods=("qdiff",), bits=("W4A8", "W4A32"), n_samples=20,
        sampler=SamplerConfig(steps=4),
        budget=Budget(calib_timesteps=2, calib_samples=4, weight_iters=3, act_iters=2),
    )  # fmt: skip
    rows = run_experiment(config, tmp_path, log=lambda _: None)
    fd = {r["a_bits"]: r for r in rows if r["metric"] == "digits_fd" and r["method"] == "qdiff"}
    assert fd[8]["status"] == fd[None]["status"] == "ok"
    assert fd[None]["weights_from"] == "W4A8" and "weights_from" not in fd[8]
    assert fd[8]["qconfig"]["calib"]["strategy"] == "uniform" and fd[None]["qconfig"]["act"] is None
    assert (tmp_path / "share" / "samples" / "qdiff-W4A32.png").is_file()
