"""The one GPU command (``.ci/gpu``) runs end to end on a machine without CUDA: its tests skip
with their reason and every GPU run becomes a ``skipped`` row naming the missing device, so a
GPU's few minutes never go to a plumbing mistake (a missing file, a matrix that fails to load,
a wrong flag)."""

import os
import subprocess
import sys
import tarfile

import pytest
import torch

from bench.provenance import REPO_ROOT
from bench.report import compile_modes
from bench.store import load


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, .ci/gpu does the real GPU work")
def test_the_gpu_command_runs_everything_but_the_cuda_work_here(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "QDIFF_GPU_RESULTS": str(tmp_path / "results"),
           "QDIFF_GPU_WHEELS": str(tmp_path / "no-wheels"), "QDIFF_GPU_ARCHIVE": str(tmp_path / "gpu.tgz"),
           "QDIFF_BENCH_CACHE": str(tmp_path / "cache")}  # fmt: skip
    out = subprocess.run(
        [str(REPO_ROOT / ".ci" / "gpu")], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gpu: none (CUDA work will be skipped)" in out.stdout
    # FP16 eager and compiled, and each quantized deployment: nothing silently dropped.
    compiled = {("fp", "FP", "off", None), ("fp", "FP", "inductor", None)} | {
        (method, bits, "inductor", backend)
        for method, bits, backend in [("linear", "W8A8", "int8"), ("linear", "W8A8", "fp8"),
                                      ("linear", "W4A32", "w4a16"), ("torchao-int8dq", "W8A8", None),
                                      ("torchao-fp8dq-row", "W8A8", None)]
    }  # fmt: skip
    eager = {
        ("linear", "W8A8", "off", "int8"),
        ("linear", "W8A8", "off", "fp8"),
        ("linear", "W4A32", "off", "w4a16"),
    }
    for matrix in ("perf-gpu-sd15", "perf-gpu-pixart-sigma", "perf-gpu-sdxl", "perf-gpu-sd15-b4"):
        rows = load(tmp_path / "results" / matrix)
        assert set(rows["status"]) == {"skipped"}
        assert rows["error"].str.contains("no CUDA device is available").all()
        backends = rows["budget"].map(lambda b: b.get("backend") if isinstance(b, dict) else None)
        backends = [
            b if m.startswith("linear") else None for m, b in zip(rows["method"], backends, strict=True)
        ]
        labels = set(zip(rows["method"], rows["bits"], compile_modes(rows), backends, strict=True))
        assert labels == (compiled | eager if matrix == "perf-gpu-sd15" else compiled), matrix
        assert set(rows["sampling"].map(lambda s: s["dtype"])) == {"float16"}
    with tarfile.open(tmp_path / "gpu.tgz") as archive:  # what a lent machine sends back
        assert {n.split("/")[-1] for n in archive.getnames()} >= {"perf-gpu-sd15", "perf-gpu-sd15-b4"}
