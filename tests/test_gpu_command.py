"""The one GPU command (``.ci/gpu``) runs end to end on a machine without CUDA: its tests skip
with their reason and every GPU run becomes a ``skipped`` row naming the missing device, so a
GPU's few minutes never go to a plumbing mistake (a missing file, a matrix that fails to load,
a wrong flag)."""

import os
import subprocess
import sys

import pytest
import torch

from bench.provenance import REPO_ROOT
from bench.report import compile_modes
from bench.store import load


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, .ci/gpu does the real GPU work")
def test_the_gpu_command_runs_everything_but_the_cuda_work_here(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "QDIFF_GPU_RESULTS": str(tmp_path / "results"),
           "QDIFF_GPU_WHEELS": str(tmp_path / "no-wheels")}  # fmt: skip
    out = subprocess.run(
        [str(REPO_ROOT / ".ci" / "gpu")], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gpu: none (CUDA work will be skipped)" in out.stdout
    for matrix in ("perf-gpu-sd15-b1", "perf-gpu-sd15-b4"):
        rows = load(tmp_path / "results" / matrix)
        assert set(rows["status"]) == {"skipped"}
        assert rows["error"].str.contains("no CUDA device is available").all()
        # FP16 eager and compiled, and each quantized deployment: nothing silently dropped.
        labels = set(zip(rows["method"], rows["bits"], compile_modes(rows), strict=True))
        assert labels == {("fp", "FP", "off"), ("fp", "FP", "inductor"), ("linear", "W8A8", "off"),
                          ("linear", "W4A32", "off"), ("torchao-int8dq", "W8A8", "off")}  # fmt: skip
        assert set(rows["sampling"].map(lambda s: s["dtype"])) == {"float16"}
