"""The asv suite: discoverable by asv, and its benchmarks run (GPU ones skip without CUDA)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import qdiff
from bench.provenance import REPO_ROOT


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_discovers_every_benchmark():
    out = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--python=same"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_step_benchmark_runs_and_gpu_ones_skip_without_cuda():
    from benchmarks.bench_step import DenoiserStep, GPUDenoiserStep

    bench = DenoiserStep()
    bench.setup("x86", "embedded")
    bench.time_step("x86", "embedded")
    assert type(bench.model.conv_in).__name__ == "X86Int8Layer"
    deployed = bench.track_deployed_mib("x86", "embedded")
    assert qdiff.resident_bytes(bench.model) / 2**20 < deployed < 200  # weights + one step's activations
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="needs CUDA"):
            GPUDenoiserStep().setup("int8", "cifar10-random")


def test_reconstruction_benchmark_reconstructs_one_block():
    from benchmarks.bench_quantization import Reconstruction

    bench = Reconstruction()
    cache = bench.setup_cache()
    bench.setup(cache, 5)
    bench.time_reconstruct_block(cache, 5)
    rounders = [m for m in bench.model.modules() if isinstance(m, qdiff.AdaRoundQuantizer)]
    assert rounders and all(r.hard for r in rounders)  # the block was reconstructed (AdaRound)
