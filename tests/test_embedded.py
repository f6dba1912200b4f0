"""The committed embedded model and its metric: real checkpoints, real data, no downloads."""

import json

import pytest
import torch

import qdiff
from bench.embedded.data import load_digits_images, reference_split
from bench.embedded.model import ASSETS, load_classifier, load_dit, load_unet
from bench.errors import AssetError
from bench.models.embedded import EmbeddedDigits, EmbeddedDiT
from bench.spec import Sampling


def test_assets_are_small_and_documented():
    files = list(ASSETS.rglob("*.safetensors"))
    assert len(files) == 3  # the UNet, the DiT and the classifier
    assert all(f.stat().st_size <= 10 * 10**6 for f in files)
    assert sum(f.stat().st_size for f in files) < 16 * 2**20
    for model in ("unet", "dit"):
        log = json.loads((ASSETS / f"{model}_train.json").read_text())
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


@pytest.mark.parametrize("what,load", [("unet", load_unet), ("dit", load_dit)])
def test_training_script_writes_loadable_checkpoints(tmp_path, what, load):
    from bench.embedded.train import train_denoiser

    log = train_denoiser(tmp_path, what, steps=2, batch=4, save_every=2)
    assert log["steps"] == 2 and (tmp_path / f"{what}_train.json").is_file()
    model = load(tmp_path / what)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in load().parameters())


def test_training_script_writes_a_loadable_classifier(tmp_path):
    from bench.embedded.train import train_classifier

    assert 0.0 <= train_classifier(tmp_path, epochs=1)["test_accuracy"] <= 1.0
    load_classifier(tmp_path / "classifier.safetensors")


def test_retraining_leaves_the_committed_assets_alone_unless_asked(tmp_path, monkeypatch, capsys):
    """A retrain is a close model, not the committed one: it goes to a scratch folder."""
    from bench.embedded.model import ASSETS
    from bench.embedded.train import main

    before = {p: p.stat().st_mtime_ns for p in ASSETS.glob("classifier*")}
    monkeypatch.chdir(tmp_path)
    main(["classifier", "--epochs", "1"])
    assert (tmp_path / "embedded-assets" / "classifier.safetensors").is_file()
    assert {p: p.stat().st_mtime_ns for p in ASSETS.glob("classifier*")} == before
    assert "--replace writes over the committed assets" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["classifier", "--replace", "--out", "x"])


def _dit(guidance_scale: float = 1.5, steps: int = 10) -> EmbeddedDiT:
    return EmbeddedDiT(Sampling(steps=steps, batch_size=100, device="cpu"), guidance_scale=guidance_scale)


def test_conditional_dit_draws_the_digit_it_is_asked_for():
    """The committed DiT: recognisable digits of the requested class, far above chance (10 %),
    with and without guidance; guidance doubles the batch and changes the samples."""
    guided, plain = _dit(1.5), _dit(1.0)
    model = guided.denoiser()
    images = guided.sample(model, 100, seed=5)
    wanted = guided.class_labels(100).numpy()
    plain_images = plain.sample(model, 100, seed=5)
    assert (guided.predicted_classes(images) == wanted).mean() > 0.9
    assert (plain.predicted_classes(plain_images) == wanted).mean() > 0.9
    assert not torch.equal(images, plain_images)
    assert guided.frechet(images) < 3 * guided.real_floor(100, draws=2)[0]
    x, _, cond = guided.step_inputs(4, 0)
    assert len(x) == 8 and cond["class_labels"].tolist() == [10, 10, 10, 10, 0, 1, 2, 3]
    x, _, cond = plain.step_inputs(4, 0)
    assert len(x) == 4 and cond["class_labels"].tolist() == [0, 1, 2, 3]
    assert guided.identity() != plain.identity()  # the scale is part of what caches key on
    # FP and quantized images made on other devices never pair through a shared cache.
    plain.device = torch.device("cuda")
    assert plain.identity()["device"] == "cuda" and guided.identity()["device"] == "cpu"


def test_class_accuracy_metric_pairs_with_fp_and_reports_the_ceiling():
    from bench.metrics.quality import CLASS_ACCURACY, EvalContext

    adapter = _dit()
    images = adapter.sample(adapter.denoiser(), 60, seed=0)
    fp = CLASS_ACCURACY(EvalContext(spec=None, adapter=adapter, images=images, fp_images=None))
    assert 0 <= fp.value <= 100 and fp.extra["classifier_accuracy"] > 97 and "delta" not in fp.extra
    assert fp.extra["ci_low"] <= fp.value <= fp.extra["ci_high"]
    # A model that ignores the class: shuffled images hit about one in ten, and the paired Δ says so.
    shuffled = images[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    worse = CLASS_ACCURACY(EvalContext(spec=None, adapter=adapter, images=shuffled, fp_images=images))
    assert worse.value < fp.value and worse.extra["delta"] == pytest.approx(worse.value - fp.value)
    assert worse.extra["delta_ci_high"] < 0


def test_guidance_scale_below_one_is_refused_when_the_matrix_loads():
    assert EmbeddedDiT.arg_problems({"guidance_scale": 0.5}) == [
        "guidance_scale=0.5; give a number ≥ 1 (1: no guidance)"
    ]
    assert EmbeddedDiT.arg_problems({"guidance_scale": 2}) == []


def test_fd_to_fp_is_zero_for_fp_itself_and_grows_with_the_damage():
    """The paired distribution distance: FP's own samples score 0 (every resample takes the same
    images from both sets); noisier copies of them score more, and more noise more."""
    from bench.metrics.quality import FD_TO_FP, EvalContext

    adapter = EmbeddedDigits(Sampling(steps=10, device="cpu"))
    fp, _ = reference_split()
    fp = fp[:400]
    gen = torch.Generator().manual_seed(0)

    def measure(images):
        return FD_TO_FP(EvalContext(None, adapter, images, fp))

    same = measure(fp)
    assert same.value == pytest.approx(0, abs=1e-4) and same.extra["ci_high"] < 1e-4
    mild, heavy = (measure((fp + s * torch.randn(fp.shape, generator=gen)).clamp(-1, 1)) for s in (0.2, 0.6))
    assert mild.extra["ci_low"] > same.extra["ci_high"] and heavy.extra["ci_low"] > mild.extra["ci_high"]
    assert FD_TO_FP(EvalContext(None, adapter, fp, None)) is None  # the FP run has no row


def test_lpips_vs_fp_with_a_random_alexnet_backbone(alexnet_features, tmp_path, monkeypatch):
    """The real lpips package and heads; a seeded random AlexNet saved as torchvision's state
    dict stands in for the ImageNet weights (offline). FP against itself is 0; blur is worse
    than a one-level change; a missing weights file is one clear error."""
    from bench.errors import AvailabilityError
    from bench.metrics.lpips_metric import LPIPS_VS_FP, backbone_file
    from bench.metrics.quality import EvalContext
    from bench.spec import Evaluation, RunSpec

    weights = alexnet_features
    spec = RunSpec("embedded-digits", "qdiff", 8, 8, 0, Sampling(device="cpu"), None, ("lpips_vs_fp",), {},
                   Evaluation(lpips_weights=str(weights)))  # fmt: skip
    fp, _ = reference_split()
    fp = ((fp[:64] + 1) * 127.5).round().to(torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(fp.float(), 3, 1, 1).round().to(torch.uint8)

    def measure(images):
        return LPIPS_VS_FP(EvalContext(spec, None, images, fp))

    assert measure(fp).value == pytest.approx(0, abs=1e-6)
    nudged, blur = measure((fp.int() + 1).clamp(0, 255).to(torch.uint8)), measure(blurred)
    assert 0 < nudged.value < blur.value and blur.extra["ci_low"] > nudged.extra["ci_high"]
    assert LPIPS_VS_FP.check(Evaluation(lpips_weights=str(tmp_path / "none.pth")))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(AvailabilityError, match="set lpips_weights"):
        backbone_file("")
