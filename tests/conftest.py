"""Shared fixtures: tiny seeded diffusers models, no downloads, explicit CPU threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (read when a kernel is defined,
# so before anything imports qdiff.backends.triton_kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: torch's default threading oversubscribes badly when both are busy.
THREADS = int(os.environ.get("QDIFF_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # Every test starts with the same thread count: a run in the test process sets its own
    # (api.run), and results rounded on other thread counts differ (a cached reference built by
    # one test, compared by another, would not match).
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def warm_caches(tmp_path_factory):
    """``build(methods, bits)`` -> ``(cache, results)`` of a tiny matrix run once per pytest
    process (each xdist worker builds its own), in a cache of its own."""
    from helpers import tiny_matrix

    from bench.matrix import load_matrix
    from bench.runner import run_matrix

    built = {}

    def build(methods: str, bits: str):
        if (methods, bits) not in built:
            root = tmp_path_factory.mktemp("warm")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("QDIFF_BENCH_CACHE", str(root / "cache"))
                path = tiny_matrix(root, methods=methods, bits=bits)
                run_matrix(load_matrix(path), root / "results", progress=False, log=lambda _msg: None)
            built[methods, bits] = root / "cache", root / "results" / "tiny"
        return built[methods, bits]

    return build


@pytest.fixture
def warm_cache(warm_caches):
    """``fill(methods, bits)``: this test's cache starts as a copy of that tiny matrix's warm one,
    for tests that need a filled cache but do not test how it is filled."""
    import shutil

    from bench.cache import cache_dir

    def fill(methods: str, bits: str) -> None:
        shutil.copytree(warm_caches(methods, bits)[0], cache_dir(), dirs_exist_ok=True)

    return fill


@pytest.fixture
def tiny_unet():
    """A small random UNet2DModel with skip concatenations and attention at the lowest level."""
    from tiny_pipelines import unet2d

    torch.manual_seed(0)
    return unet2d(in_channels=1, sample_size=8).eval()


@pytest.fixture
def tiny_cond_unet():
    """A small random UNet2DConditionModel with cross-attention (Stable Diffusion's layout)."""
    from tiny_pipelines import cond_unet

    torch.manual_seed(0)
    return cond_unet().eval()


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny random pipelines of every diffusers adapter, saved as local directories."""
    from tiny_pipelines import save_ddpm, save_flux, save_ldm, save_pixart, save_sd, save_sd3, save_sdxl

    root = tmp_path_factory.mktemp("pipelines")
    return {
        "ddim-cifar10": save_ddpm(root / "ddpm"),
        "ldm-celebahq": save_ldm(root / "ldm"),
        "sd-1.5": save_sd(root / "sd"),
        "pixart-alpha": save_pixart(root / "pixart"),
        "sd3": save_sd3(root / "sd3"),
        "flux": save_flux(root / "flux"),
        "sdxl": save_sdxl(root / "sdxl"),
    }


@pytest.fixture(scope="session")
def alexnet_features(tmp_path_factory):
    """A seeded random AlexNet backbone saved as torchvision's state dict (its conv features, all
    LPIPS reads; 10 MB): it stands in for the ImageNet weights offline."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save(
        {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, path
    )
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random open_clip model registered from a config, and its weights saved locally:
    ``(model name, checkpoint path)``."""
    import json

    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (root / "qdiff-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model("qdiff-tiny-clip", pretrained=None)
    path = root / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return "qdiff-tiny-clip", str(path)


@pytest.fixture(scope="session")
def reference_images(tmp_path_factory):
    """A folder of 32 random 16×16 PNGs standing in for a real data set."""
    from PIL import Image

    root = tmp_path_factory.mktemp("reference")
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (32, 3, 16, 16), generator=g, dtype=torch.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
    return root
