"""Baseline PTQ methods: each one's distinguishing mechanism, and every registered baseline
through the harness on the tiny embedded matrix."""

from __future__ import annotations

import statistics

import pytest
from helpers import tiny_matrix

import qdiff
from baselines import BASELINES
from bench.matrix import load_matrix
from bench.methods import QDIFFUSION, Bits
from bench.registry import METHODS
from bench.runner import run_matrix


def test_ptq4dm_calibrates_on_its_normal_timestep_distribution():
    method = METHODS.get("ptq4dm")
    qconfig = method.qconfig(Bits(4, 8))
    calib = qconfig.calib
    assert calib.strategy == "normal" and not qconfig.split_shortcut and qconfig.recon.method == "brecq"
    # The sampler follows its configured normal (a case whose tails stay inside [0, 1]).
    steps = 1000
    picked = qdiff.select_steps(qdiff.CalibConfig("normal", 100, 1, 0.5, 0.1), steps)
    progress = [s / (steps - 1) for s in picked]
    assert len(picked) == 100 and statistics.mean(progress) == pytest.approx(0.5, abs=0.002)
    assert statistics.stdev(progress) == pytest.approx(0.1, rel=0.05)
    # At the harness's 25 steps, PTQ4DM's inputs sit late in denoising; Q-Diffusion's span it.
    few = qdiff.select_steps(qdiff.CalibConfig("normal", 10, 1, calib.normal_mean, calib.normal_std), 25)
    assert min(few) >= 12 and len(few) >= 6
    assert qdiff.select_steps(QDIFFUSION.qconfig(Bits(4, 8)).calib, 25)[0] == 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_runs_through_the_harness(name, tmp_path):
    matrix = load_matrix(tiny_matrix(tmp_path, methods=f"[{name}]", bits="[W8A8, W4A32]"))
    rows = run_matrix(matrix, tmp_path / "results", progress=False, log=lambda _: None)
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"]
    assert {r["bits"] for r in rows if r["method"] == name} == {"W8A8", "W4A32"}
