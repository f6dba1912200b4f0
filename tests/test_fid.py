"""FID, KID and Inception Score through torch-fidelity and clean-fid, checked against each
library's own folder-to-folder output on the same images (tiny extractors, no downloads)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error

import numpy as np
import pytest
import torch
from helpers import random_inception_weights
from PIL import Image

from bench import cli
from bench.errors import AvailabilityError, ImageError
from bench.frechet import feature_stats, frechet_distance
from bench.metrics import fid, inception
from bench.spec import Evaluation

TF_EXTRACTOR = "fid_extractors:TinyTorchFidelity"
CF_EXTRACTOR = "fid_extractors:TinyCleanFID"
TF = Evaluation(fid_backend="torch-fidelity", fid_extractor=TF_EXTRACTOR)


def images(n: int, seed: int, shift: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, size, size), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def save(batch: torch.Tensor, folder) -> str:
    folder.mkdir()
    for i, img in enumerate(batch):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return str(folder)


@pytest.fixture
def pair(tmp_path):
    """Two different image sets, in memory and as folders of PNGs (in the same order)."""
    a, b = images(40, 0), images(36, 1, shift=40)
    return a, b, save(a, tmp_path / "a"), save(b, tmp_path / "b")


@pytest.fixture(autouse=True)
def _fresh_backends():
    inception.backend.cache_clear()


def test_torch_fidelity_from_memory_equals_its_folder_output(pair):
    import torch_fidelity

    a, b, dir_a, dir_b = pair
    ours = fid.compute(TF, a, b, kid=True, isc=True)
    from_folder = fid.compute(TF, dir_a, dir_b, kid=True, isc=True)
    theirs = torch_fidelity.calculate_metrics(
        input1=dir_a, input2=dir_b, cuda=False, fid=True, kid=True, isc=True, kid_subset_size=36,
        feature_extractor=TF_EXTRACTOR, cache=False, verbose=False, save_cpu_ram=True,
    )  # fmt: skip
    for scores in (ours, from_folder):
        assert scores.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
        assert scores.kid == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
        assert scores.isc == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours.fid > 0.1  # the sets differ
    assert ours.info["fid_backend"] == "torch-fidelity" and ours.info["feature_extractor"] == TF_EXTRACTOR
    assert ours.info["n_gen"] == 40 and ours.info["n_ref"] == 36 and ours.info["kid_subset_size"] == 36
    assert ours.info["feature_dims"] == 16 and ours.info["warning"] is None


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_clean_fid_from_memory_equals_its_folder_output(pair, mode):
    from cleanfid import fid as cleanfid
    from fid_extractors import TinyCleanFID

    a, b, dir_a, dir_b = pair
    evaluation = Evaluation(fid_backend="clean-fid", fid_mode=mode, fid_extractor=CF_EXTRACTOR)
    ours = fid.compute(evaluation, a, b, kid=True)
    extractor = TinyCleanFID().eval()
    theirs = cleanfid.compute_fid(
        dir_a, dir_b, mode=mode, custom_feat_extractor=extractor, device=torch.device("cpu"),
        num_workers=0, batch_size=16, verbose=False,
    )  # fmt: skip
    assert ours.fid == pytest.approx(theirs, rel=1e-5)
    cpu = torch.device("cpu")
    features = [
        cleanfid.get_folder_features(d, extractor, num_workers=0, device=cpu, mode=mode, verbose=False)
        for d in (dir_a, dir_b)
    ]
    np.random.seed(inception.KID_SEED)  # clean-fid draws KID subsets from numpy's global RNG
    assert ours.kid == pytest.approx(cleanfid.kernel_distance(*features), rel=1e-5)
    assert ours.info["fid_mode"] == mode and ours.info["feature_dims"] == 16


def test_every_frechet_implementation_agrees():
    """Ours (the embedded model's digits_fd) and both libraries' formulas, on the same statistics."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 12)), rng.normal(0.2, 1.3, size=(300, 12))
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours == pytest.approx(cleanfid_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_reference_features_are_computed_once_and_cached(pair, tmp_path):
    a, _, _, dir_b = pair
    evaluation = Evaluation(fid_backend="clean-fid", fid_extractor=CF_EXTRACTOR)
    first = fid.compute(evaluation, a, dir_b, ref_key="ref-1")
    for path in sorted((tmp_path / "b").iterdir())[:10]:  # change the folder behind the key
        path.unlink()
    assert fid.compute(evaluation, a, dir_b, ref_key="ref-1").fid == first.fid  # from the cache
    assert fid.compute(evaluation, a, dir_b).fid != first.fid  # recomputed without the key

    tf_first = fid.compute(TF, a, dir_b, ref_key="ref-tf")
    assert list((tmp_path / "cache" / "torch-fidelity").rglob("*ref-tf*"))  # torch-fidelity's own cache
    assert fid.compute(TF, a, dir_b, ref_key="ref-tf").fid == tf_first.fid


def test_a_reference_folder_is_compared_at_the_samples_resolution(pair, tmp_path):
    """clean-fid: references of another shape are centre-cropped to the samples' aspect and
    resized to their resolution first (a wide 16×24 image whose centre is B counts as B), and
    their cached features are kept apart per resolution."""
    a, b, _, dir_b = pair
    noise = images(len(b), 9)[..., :4]
    wide = save(torch.cat([noise, b, noise], dim=-1), tmp_path / "wide")  # 16 × 24, centre = b
    evaluation = Evaluation(fid_backend="clean-fid", fid_extractor=CF_EXTRACTOR)
    direct = fid.compute(evaluation, a, dir_b).fid
    assert fid.compute(evaluation, a, wide, ref_key="wide").fid == pytest.approx(direct, rel=1e-9)
    small = fid.compute(evaluation, a[..., ::2, ::2].contiguous(), wide, ref_key="wide").fid
    assert small != pytest.approx(direct, rel=1e-3)  # 8² samples: the references fitted to 8²
    assert fid.compute(evaluation, a, wide, ref_key="wide").fid == pytest.approx(direct, rel=1e-9)


def test_fewer_samples_than_feature_dims_warns_and_records_it():
    with pytest.warns(UserWarning, match="n=8 samples < 16 feature dimensions"):
        scores = fid.compute(TF, images(8, 0), images(20, 1))
    assert "unreliable" in scores.info["warning"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(4, 3, 16, 16), "must be uint8 with values 0-255"),
        (torch.zeros(4, 4, 16, 16, dtype=torch.uint8), r"shape \(N, 1 or 3, H, W\)"),
        (torch.zeros(3, 16, 16, dtype=torch.uint8), r"got torch.uint8 \(3, 16, 16\)"),
    ],
)
def test_images_of_the_wrong_type_or_shape_are_a_clear_error(bad, message):
    with pytest.raises(ImageError, match=message):
        fid.compute(TF, bad, images(8, 0))


def test_grayscale_images_are_measured_as_rgb():
    gray = images(20, 0)[:, :1]
    assert fid.compute(TF, gray, images(20, 1)).fid == pytest.approx(
        fid.compute(TF, gray.expand(-1, 3, -1, -1).clone(), images(20, 1)).fid
    )


def test_folder_problems_are_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        fid.compute(TF, str(tmp_path / "empty"), images(8, 0))
    with pytest.raises(ImageError, match="is not a folder of images"):
        fid.compute(TF, str(tmp_path / "missing"), images(8, 0))


def test_local_inception_weights_are_used_without_network(tmp_path, monkeypatch):
    """torch-fidelity's real Inception-v3 from a local (random) weights file."""
    import torch_fidelity
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # A random state dict with Inception's keys (built with loading disabled).
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    random_inception_weights(weights)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)

    a, b = images(6, 0, size=32), images(6, 1, shift=40, size=32)
    with pytest.warns(UserWarning, match="< 2048 feature dimensions"):
        ours = fid.compute(Evaluation(inception_weights=str(weights)), a, b)
    theirs = torch_fidelity.calculate_metrics(
        input1=inception._Images(a), input2=inception._Images(b), cuda=False, fid=True, verbose=False,
        cache=False, feature_extractor_weights_path=str(weights), save_cpu_ram=True,
    )  # fmt: skip
    assert ours.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert (
        ours.info["inception_weights"] == str(weights)
        and ours.info["feature_extractor"] == "inception-v3-compat"
    )


@pytest.mark.parametrize(
    "backend, mode", [("torch-fidelity", "clean"), ("clean-fid", "clean"), ("clean-fid", "legacy_pytorch")]
)
def test_missing_weights_offline_name_the_file_and_the_flag(backend, mode, monkeypatch):
    import cleanfid.inception_pytorch
    import cleanfid.inception_torchscript
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", offline)
    monkeypatch.setattr(cleanfid.inception_pytorch, "load_state_dict_from_url", offline)
    evaluation = Evaluation(fid_backend=backend, fid_mode=mode)
    with pytest.raises(AvailabilityError) as info:
        fid.compute(evaluation, images(4, 0), images(4, 1))
    wanted = inception.WEIGHT_FILES[(backend, None if backend == "torch-fidelity" else mode)]
    assert f"--inception-weights /path/to/{wanted}" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"--inception-weights /nope\.pth: no such file"):
        fid.compute(
            dataclasses.replace(evaluation, inception_weights="/nope.pth"), images(4, 0), images(4, 1)
        )


def test_fid_command_on_folders(pair, capsys):
    _, _, dir_a, dir_b = pair
    assert (
        cli.main(["fid", dir_a, dir_b, "--extractor", TF_EXTRACTOR, "--kid", "--isc", "--device", "cpu"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] == pytest.approx(fid.compute(TF, dir_a, dir_b).fid)
    assert {"kid", "isc", "fid_backend", "n_gen", "n_ref"} <= set(out)
    code = cli.main(["fid", dir_a, dir_b, "--backend", "clean-fid", "--isc"])
    assert code == 2 and "--isc needs --backend torch-fidelity" in capsys.readouterr().err
    assert cli.main(["fid", dir_a, "/no/such/dir", "--extractor", TF_EXTRACTOR]) == 2
    assert "is neither a folder of images nor a torch-fidelity data set" in capsys.readouterr().err


def test_a_registered_data_set_that_cannot_download_says_to_set_a_folder(monkeypatch):
    import torch_fidelity

    def offline(**kwargs):
        assert kwargs["input2"] == "cifar10-train" and kwargs["datasets_root"]  # downloads into our cache
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", offline)
    with pytest.raises(
        AvailabilityError, match=r"the cifar10-train data set .* set fid_reference: /path/to/images"
    ):
        fid.compute(TF, images(4, 0), "cifar10-train")
