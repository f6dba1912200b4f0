"""The committed embedded model and its metric: real checkpoints, real data, no downloads."""

import json

import pytest
import torch

import qdiff
from bench.embedded.data import load_digits_images, reference_split
from bench.embedded.model import ASSETS, load_classifier, load_unet
from bench.errors import AssetError
from bench.models.embedded import EmbeddedDigits
from bench.spec import Sampling


def test_assets_are_small_and_documented():
    files = list(ASSETS.rglob("*.safetensors"))
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) < 10 * 2**20
    log = json.loads((ASSETS / "unet_train.json").read_text())
    assert log["steps"] >= 1000


def test_classifier_recognises_real_digits():
    x, y = load_digits_images()
    with torch.no_grad():
        acc = (load_classifier()(x).argmax(1) == y).float().mean().item()
    assert acc > 0.97


def test_reference_halves_are_disjoint_and_fixed():
    a, b = reference_split()
    a2, _ = reference_split()
    assert len(a) + len(b) == 1797 and torch.equal(a, a2)


def test_fp_samples_look_like_digits_and_seeds_are_paired():
    adapter = EmbeddedDigits(Sampling(steps=10, batch_size=100, device="cpu"))
    unet = load_unet()
    images = adapter.sample(unet, 200, seed=3)
    assert images.shape == (200, 1, 16, 16) and images.dtype == torch.uint8
    # The same seed gives the same initial noise whatever the count, so samples are paired (up
    # to float round-off that depends on the batch size of the convolutions: one grey level).
    assert torch.equal(adapter.noise(200, 3)[:50], adapter.noise(50, 3))
    diff = images[:50].int() - adapter.sample(unet, 50, seed=3).int()
    assert diff.abs().max() <= 1
    noise_fd = adapter.frechet(adapter.noise(200, 3).clamp(-1, 1))
    floor, _ = adapter.real_floor(200, draws=2)
    fd = adapter.frechet(images)
    assert fd < 3 * floor < noise_fd


def test_calibration_data_comes_from_the_trajectory():
    adapter = EmbeddedDigits(Sampling(steps=10, device="cpu"))
    data = adapter.calibration_data(
        load_unet(), qdiff.CalibConfig("uniform", num_timesteps=3, samples_per_timestep=4)
    )
    assert len(data) == 12
    assert data.t.unique().numel() == 3 and data.t.max() == 999


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text((ASSETS / "unet" / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(AssetError, match=r"corrupt checkpoint .* retrain with"):
        load_unet(tmp_path)
    with pytest.raises(AssetError, match="missing"):
        load_unet(tmp_path / "nowhere")


def test_training_script_writes_loadable_checkpoints(tmp_path):
    from bench.embedded.train import train_classifier, train_unet

    log = train_unet(tmp_path, steps=2, batch=4, save_every=2)
    assert log["steps"] == 2 and (tmp_path / "unet_train.json").is_file()
    unet = load_unet(tmp_path / "unet")
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in load_unet().parameters())
    assert 0.0 <= train_classifier(tmp_path, epochs=1)["test_accuracy"] <= 1.0
    load_classifier(tmp_path / "classifier.safetensors")
