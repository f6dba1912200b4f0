"""A real-size quality smoke on the GPU: Stable Diffusion 1.5 at its published shapes (random
weights) generating 16 images through VAE decoding, then CLIP score, Inception (FID to FP's own
samples), LPIPS and PSNR, FP and linear PTQ at W8A8, float16. Its numbers mean nothing; it runs
every code path a real text-to-image quality run takes on a GPU, so that the next bug only a GPU
shows (a device, dtype or memory mistake in sampling, decoding or a metric) is found in a
minute, not an hour into a matrix. ``.ci/gpu`` runs it with the other gpu-marked tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import random_inception_weights
from tiny_pipelines import save_sd_real_size

from bench.matrix import load_matrix
from bench.runner import run_matrix

METRICS = ("clip_score", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp")


def run_smoke(root: Path, device: str, dtype: str, samples: int, steps: int) -> list[dict]:
    """Save the real-size pipeline and the metrics' random weights under ``root``, run the
    smoke matrix there and return its rows."""
    import open_clip
    import torchvision

    source = save_sd_real_size(root / "sd-1.5-random")
    torch.manual_seed(0)
    clip = root / "clip-vit-b-32-random.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), clip)
    alexnet = root / "alexnet-owt-7be5be79.pth"
    torch.save(
        {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, alexnet
    )
    inception = random_inception_weights(root / "weights-inception-2015-12-05-6726825d.pth")
    matrix = root / "gpu-smoke.yaml"
    matrix.write_text(
        f"name: gpu-smoke\nmodels: [{{name: sd-1.5, source: {source}}}]\nmethods: [linear]\nbits: [W8A8]\n"
        f"metrics: [{', '.join(METRICS)}]\n"
        f"settings: {{device: {device}, dtype: {dtype}, samples: {samples}, batch_size: {min(samples, 8)}, "
        f"steps: {steps}, calib_timesteps: 2, calib_samples: 2, clip_model: ViT-B-32, "
        f"clip_pretrained: {clip}, inception_weights: {inception}, lpips_weights: {alexnet}}}\n"
    )
    return run_matrix(load_matrix(matrix), root / "results", progress=False, log=lambda _: None)


def check(rows: list[dict]) -> None:
    got = {(r["method"], r["metric"]): r for r in rows}
    assert set(got) == {("fp", "clip_score"), *(("linear", m) for m in METRICS)}, sorted(got)
    failed = {k: r["error"] for k, r in got.items() if r["status"] != "ok"}
    assert not failed, failed
    values = {k: r["value"] for k, r in got.items()}
    assert all(math.isfinite(v) for v in values.values()), values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")
def test_sd15_at_real_size_through_vae_clip_inception_and_lpips(tmp_path):
    check(run_smoke(tmp_path, "cuda", "float16", samples=16, steps=10))
