"""Real-size quality smokes: Stable Diffusion 1.5 at its published shapes (random weights) through
the text encoder, UNet, VAE decoding at 512², then CLIP score, Inception (FID), LPIPS and PSNR,
FP and linear PTQ at W8A8. Their numbers mean nothing; they run every code path a real
text-to-image quality run takes, so that the next bug only real shapes show (a device, dtype or
memory mistake in sampling, decoding or a metric) is found in minutes, not an hour into a matrix.

- On the GPU: 16 images, 10 steps, float16, loaded from a saved float16 folder; ``.ci/gpu`` runs
  it with the other gpu-marked tests.
- On the CPU: 2 images, 2 steps, the ``init: random`` model itself (no folder), CLIP ViT-L/14 and
  FID against a folder of 512² references too. Marked ``realsize``: the suite's command skips it
  (pyproject's ``addopts``) and tox runs it as a step of its own, ``pytest -m realsize``
  (about 5 minutes on the 2-core machine: docs/text-to-image.md).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import random_inception_weights
from tiny_pipelines import save_sd_real_size

from bench.cache import cache_dir
from bench.matrix import load_matrix
from bench.runner import run_matrix

METRICS = ("clip_score", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp")


def run_smoke(
    root: Path, device: str, dtype: str, samples: int, steps: int, saved: bool = True,
    clip_model: str = "ViT-B-32", metrics: tuple[str, ...] = METRICS, settings: str = "",
) -> list[dict]:  # fmt: skip
    """Write the metrics' random weights under ``root`` (and, if ``saved``, the real-size
    pipeline as a folder; else the model is ``init: random``), run the smoke matrix there and
    return its rows."""
    import open_clip
    import torchvision

    model = f"source: {save_sd_real_size(root / 'sd-1.5-random')}" if saved else "init: random"
    torch.manual_seed(0)
    clip = root / f"clip-{clip_model}-random.pt"
    weights = open_clip.create_model(clip_model, pretrained=None).state_dict()
    torch.save({k: v.half() for k, v in weights.items()}, clip)  # loads into float32 as well
    alexnet = root / "alexnet-owt-7be5be79.pth"
    torch.save(
        {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, alexnet
    )
    inception = random_inception_weights(root / "weights-inception-2015-12-05-6726825d.pth")
    matrix = root / "smoke.yaml"
    matrix.write_text(
        f"name: smoke\nmodels: [{{name: sd-1.5, {model}}}]\nmethods: [linear]\nbits: [W8A8]\n"
        f"metrics: [{', '.join(metrics)}]\n"
        f"settings: {{device: {device}, dtype: {dtype}, samples: {samples}, batch_size: {min(samples, 8)}, "
        f"steps: {steps}, calib_timesteps: 2, calib_samples: 2, clip_model: {clip_model}, "
        f"clip_pretrained: {clip}, inception_weights: {inception}, lpips_weights: {alexnet}{settings}}}\n"
    )
    return run_matrix(load_matrix(matrix), root / "results", progress=False, log=lambda _: None)


def check(rows: list[dict], metrics: tuple[str, ...] = METRICS) -> None:
    got = {(r["method"], r["metric"]): r for r in rows}
    fp = {m for m in metrics if not m.endswith("_vs_fp")}
    assert set(got) == {*(("fp", m) for m in fp), *(("linear", m) for m in metrics)}, sorted(got)
    failed = {k: r["error"] for k, r in got.items() if r["status"] != "ok"}
    assert not failed, failed
    values = {k: r["value"] for k, r in got.items()}
    assert all(math.isfinite(v) for v in values.values()), values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")
def test_sd15_at_real_size_through_vae_clip_inception_and_lpips(tmp_path):
    check(run_smoke(tmp_path, "cuda", "float16", samples=16, steps=10))


@pytest.mark.realsize
@pytest.mark.slow
def test_sd15_at_real_size_end_to_end_on_the_cpu(tmp_path):
    """Two images, two steps, at SD-1.5's real shapes on this machine's CPU."""
    from PIL import Image

    references = tmp_path / "references"
    references.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        pixels = torch.randint(0, 256, (512, 512, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(references / f"{i}.png")
    metrics = ("clip_score", "fid", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp", "weight_bytes")
    try:
        rows = run_smoke(
            tmp_path, "cpu", "float32", samples=2, steps=2, saved=False, clip_model="ViT-L-14",
            metrics=metrics, settings=f", fid_reference: {references}",
        )  # fmt: skip
    finally:  # the cache holds 7 GB (the random UNet, its quantized checkpoint): not kept
        shutil.rmtree(cache_dir(), ignore_errors=True)
    check(rows, metrics)
    fp = next(r for r in rows if r["method"] == "fp" and r["metric"] == "clip_score")
    assert fp["prompt_sets"]["calibration"]["name"] == "parti-calibration"
