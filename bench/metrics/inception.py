"""The two libraries behind FID, KID and Inception Score, torch-fidelity and clean-fid, fed
images from memory or a folder; :mod:`bench.metrics.fid` picks one and turns its scores into
rows.

Each backend extracts Inception features with its library's own weights and resizing (what
makes FIDs comparable between papers), caches a reference set's features once per data set, and
turns "weights missing offline" into an error that names the file and the flag.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.cache import cache_dir, cached_tensors
from bench.errors import AvailabilityError, ImageError
from bench.images import fit
from bench.provenance import config_hash

Images = torch.Tensor | str  # uint8 (N, C, H, W), or a folder of image files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
KID_SUBSET = 1000  # both libraries' default subset size
KID_SEED = 2020  # torch-fidelity's default subset seed, used for clean-fid's subsets too
DOWNLOAD_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError)
WEIGHT_FILES = {  # what --inception-weights should point to, per backend and mode
    ("torch-fidelity", None): "weights-inception-2015-12-05-6726825d.pth",
    ("clean-fid", "clean"): "inception-2015-12-05.pt",
    ("clean-fid", "legacy_tensorflow"): "inception-2015-12-05.pt",
    ("clean-fid", "legacy_pytorch"): "pt_inception-2015-12-05-6726825d.pth",
}


def check_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images from uint8 (N, 1 or 3, H, W); a clear error for anything else."""
    if not isinstance(images, torch.Tensor):
        raise ImageError(f"images must be a torch.Tensor or a folder path, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ImageError(
            f"images must be uint8 with values 0-255 and shape (N, 1 or 3, H, W); got {images.dtype} "
            f"{tuple(images.shape)} (convert floats in [-1, 1] with bench.models.base.to_uint8)"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def folder_images(path: str) -> list[Path]:
    """The image files under ``path`` (recursively), sorted; an error if there are none."""
    root = Path(path)
    if not root.is_dir():
        raise ImageError(f"{path} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def count(images: Images) -> int:
    return len(images) if isinstance(images, torch.Tensor) else len(folder_images(images))


def identity(images: Images) -> str:
    """A content key: the pixels of in-memory images, a folder's file names and sizes."""
    if isinstance(images, torch.Tensor):
        digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
        return config_hash("images", tuple(images.shape), digest)
    files = folder_images(images)
    return config_hash("folder", [(str(p.relative_to(images)), p.stat().st_size) for p in files])


class _Images(Dataset):
    """In-memory uint8 images as torch-fidelity reads a data set: one CHW tensor per item."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = check_images(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@dataclass(frozen=True)
class Scores:
    fid: float | None  # None when there is no reference (Inception Score alone)
    kid: float | None
    kid_std: float | None
    isc: float | None
    isc_std: float | None
    info: dict[str, Any]


def _import(path: str):
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImageError(f"fid_extractor {path!r} does not import ({exc}); use module:attr") from None


def _weights(evaluation) -> str | None:
    path = evaluation.inception_weights
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"--inception-weights {path}: no such file")
    return path or None


def _offline(backend: str, mode: str | None, exc: Exception) -> AvailabilityError:
    wanted = WEIGHT_FILES[(backend, mode)]
    return AvailabilityError(
        f"{backend} could not download its Inception weights ({exc}); put {wanted} on this machine "
        f"and pass --inception-weights /path/to/{wanted} (or settings: inception_weights)"
    )


class TorchFidelity:
    """torch-fidelity's ``calculate_metrics``, with in-memory images as a Dataset and the
    reference's features in its own cache under a name derived from the reference's content."""

    name = "torch-fidelity"

    def __init__(self, evaluation, device: torch.device, batch_size: int) -> None:
        import torch_fidelity

        self.device, self.batch_size = device, batch_size
        self.weights = _weights(evaluation)
        extractor = evaluation.fid_extractor
        if extractor == "inception":
            extractor = "inception-v3-compat"
        elif ":" in extractor:
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

            if extractor not in FEATURE_EXTRACTORS_REGISTRY:
                torch_fidelity.register_feature_extractor(extractor, _import(extractor))
        self.extractor = extractor
        self.mode = None

    def feature_dims(self) -> int | None:
        from torch_fidelity.utils import resolve_feature_layer_for_metric

        layer = resolve_feature_layer_for_metric("fid", feature_extractor=self.extractor)
        return int(layer) if str(layer).isdigit() else None

    def compare(self, gen: Images, ref: Images | None, ref_key: str | None, kid: bool, isc: bool) -> Scores:
        import torch_fidelity
        from torch_fidelity.registry import DATASETS_REGISTRY

        if isinstance(ref, str) and not Path(ref).is_dir() and ref not in DATASETS_REGISTRY:
            raise ImageError(
                f"{ref} is neither a folder of images nor a torch-fidelity data set "
                f"({', '.join(DATASETS_REGISTRY)})"
            )
        n_gen = count(gen)
        n_ref = count(ref) if isinstance(ref, torch.Tensor) or (ref and Path(ref).is_dir()) else None
        subset = min(KID_SUBSET, n_gen, n_ref or KID_SUBSET)
        kwargs: dict[str, Any] = dict(
            input1=_Images(gen) if isinstance(gen, torch.Tensor) else gen,
            input2=_Images(ref) if isinstance(ref, torch.Tensor) else ref,
            cuda=self.device.type == "cuda",
            batch_size=self.batch_size,
            fid=ref is not None,
            kid=kid,
            isc=isc,
            kid_subset_size=subset,
            feature_extractor=self.extractor,
            feature_extractor_weights_path=self.weights,
            samples_find_deep=True,
            samples_find_ext=",".join(s.lstrip(".") for s in IMAGE_SUFFIXES),
            cache=ref_key is not None and _writable(cache_dir() / "torch-fidelity"),
            cache_root=str(cache_dir() / "torch-fidelity"),
            input2_cache_name=ref_key if ref_key else None,
            # Data-loader worker processes only help decode image files; in-memory inputs skip them,
            # and so do machines with fewer than 4 cores, where torch-fidelity's 4 workers would
            # outnumber the cores (and torch warns on every call).
            save_cpu_ram=(os.cpu_count() or 1) < 4
            or not any(isinstance(x, str) and Path(x).is_dir() for x in (gen, ref)),
            verbose=False,
        )
        if isinstance(ref, str) and not Path(ref).is_dir():  # a registered data set, e.g. cifar10-train
            kwargs["datasets_root"] = str(cache_dir() / "datasets")
        try:
            out = torch_fidelity.calculate_metrics(**kwargs)
        except DOWNLOAD_ERRORS as exc:
            if "datasets_root" not in kwargs:
                raise _offline(self.name, None, exc) from None
            # A registered data set, or the weights (when no local file was given), failed to download.
            weights = "" if self.weights else " or its Inception weights (pass --inception-weights)"
            raise AvailabilityError(
                f"torch-fidelity could not download the {ref} data set{weights} ({exc}); "
                "set fid_reference: /path/to/images (a folder of the data set's images)"
            ) from None
        return Scores(
            fid=out.get("frechet_inception_distance"),
            kid=out.get("kernel_inception_distance_mean"),
            kid_std=out.get("kernel_inception_distance_std"),
            isc=out.get("inception_score_mean"),
            isc_std=out.get("inception_score_std"),
            info={"n_gen": n_gen, "n_ref": n_ref, "kid_subset_size": subset if kid else None},
        )


class CleanFID:
    """clean-fid's feature extractor for ``mode`` and its resizing, applied batch by batch to
    in-memory images exactly as its folder loader does; its own FID and KID formulas."""

    name = "clean-fid"

    def __init__(self, evaluation, device: torch.device, batch_size: int) -> None:
        from cleanfid.resize import build_resizer

        self.device, self.batch_size = device, batch_size
        self.mode = evaluation.fid_mode
        self.resize = build_resizer(self.mode)
        self.extractor = evaluation.fid_extractor
        if self.extractor == "inception":
            self.model = _cleanfid_inception(self.mode, _weights(evaluation), device)
        else:
            self.model = _import(self.extractor)().to(device).eval()

    def feature_dims(self) -> int | None:
        return None  # known once features exist (see compare)

    def features(self, images: Images, size: tuple[int, int] | None = None) -> np.ndarray:
        """Features of in-memory images, or of a folder's files each brought to ``size`` (the
        samples' height and width) by :func:`bench.images.fit` first."""
        from cleanfid.fid import get_batch_features, get_folder_features

        if isinstance(images, str):
            folder_images(images)  # the error for an empty or missing folder
            fitted = None if size is None else partial(fit, height=size[0], width=size[1])
            return get_folder_features(
                images, self.model, num_workers=0, batch_size=self.batch_size, device=self.device,
                mode=self.mode, verbose=False, custom_image_tranform=fitted,
            )  # fmt: skip
        images = check_images(images)
        return np.concatenate(
            [
                get_batch_features(self._resized(images[i : i + self.batch_size]), self.model, self.device)
                for i in range(0, len(images), self.batch_size)
            ]
        )

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        # What cleanfid.utils.ResizeDataset does to each image file read as HWC uint8.
        out = []
        for img in batch.permute(0, 2, 3, 1).numpy():
            r = self.resize(img)
            t = torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1)
            out.append(t.float() if r.dtype == np.uint8 else t)
        return torch.stack(out)

    def compare(self, gen: Images, ref: Images | None, ref_key: str | None, kid: bool, isc: bool) -> Scores:
        from cleanfid.fid import fid_from_feats, kernel_distance

        if isc or ref is None:
            raise ImageError("clean-fid computes no Inception Score; use fid_backend: torch-fidelity")
        if isinstance(ref, str) and not Path(ref).is_dir():
            raise ImageError(f"clean-fid needs a folder of reference images, not {ref!r}: set fid_reference")
        f_gen = self.features(gen)
        # A folder of references is compared at the samples' resolution (the text-to-image
        # protocol: COCO's mixed sizes centre-cropped and resized to 512², then clean-fid's resize).
        size = tuple(gen.shape[-2:]) if isinstance(gen, torch.Tensor) and isinstance(ref, str) else None
        if ref_key is None:
            f_ref = self.features(ref, size)
        else:
            key = ref_key if size is None else f"{ref_key}-{size[0]}x{size[1]}"
            tensors, _ = cached_tensors(
                "fid-reference", key, lambda: {"features": torch.from_numpy(self.features(ref, size))}
            )
            f_ref = tensors["features"].numpy()
        return Scores(
            fid=float(_quiet(fid_from_feats, f_gen, f_ref)),
            kid=_seeded_kid(kernel_distance, f_gen, f_ref) if kid else None,
            kid_std=None,
            isc=None,
            isc_std=None,
            info={
                "n_gen": len(f_gen),
                "n_ref": len(f_ref),
                "kid_subset_size": min(KID_SUBSET, len(f_gen), len(f_ref)) if kid else None,
                "feature_dims": f_gen.shape[1],
            },
        )


def _writable(folder: Path) -> bool:
    """Whether torch-fidelity can keep its reference features in ``folder``; if not (a full or
    read-only cache), they are computed again for each run: the cache costs reuse, never a run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError as exc:
        warnings.warn(f"torch-fidelity's cache {folder} cannot be written ({exc.strerror}); "
                      "reference features are computed for each run", stacklevel=3)  # fmt: skip
        return False


def _seeded_kid(kernel_distance, f_gen: np.ndarray, f_ref: np.ndarray) -> float:
    """clean-fid's KID draws its subsets from numpy's global RNG: seed it (and restore it) so
    the same images give the same KID, as torch-fidelity's seeded subsets do."""
    state = np.random.get_state()
    np.random.seed(KID_SEED)
    try:
        return float(kernel_distance(f_gen, f_ref))
    finally:
        np.random.set_state(state)


def _quiet(fn, *args):
    """``fn(*args)`` without clean-fid's SciPy deprecation warning (it passes ``disp`` to
    ``scipy.linalg.sqrtm``, deprecated in SciPy 1.16): a warning per FID that the user can do
    nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The `disp` argument is deprecated", category=DeprecationWarning
        )
        return fn(*args)


def _cleanfid_inception(mode: str, weights: str | None, device: torch.device):
    """clean-fid's Inception for ``mode``: its normal download, or the local ``weights`` file."""
    from cleanfid.features import build_feature_extractor

    try:
        if weights is None:
            return build_feature_extractor(mode, device, use_dataparallel=False)
        # Both of clean-fid's loaders read a fixed file name from a folder: link the given file
        # there under that name instead of copying ~100 MB.
        folder = Path(tempfile.mkdtemp(prefix="qdiff-inception-"))
        if mode == "legacy_pytorch":
            from cleanfid.inception_pytorch import FID_WEIGHTS_URL

            (folder / "checkpoints").mkdir()
            os.symlink(Path(weights).resolve(), folder / "checkpoints" / Path(FID_WEIGHTS_URL).name)
            previous = torch.hub.get_dir()
            torch.hub.set_dir(str(folder))
            try:
                return build_feature_extractor(mode, device, use_dataparallel=False)
            finally:
                torch.hub.set_dir(previous)
        from cleanfid.inception_torchscript import InceptionV3W

        os.symlink(Path(weights).resolve(), folder / WEIGHT_FILES[("clean-fid", mode)])
        model = InceptionV3W(str(folder), download=False, resize_inside=mode == "legacy_tensorflow")
        return model.to(device).eval()
    except DOWNLOAD_ERRORS as exc:
        raise _offline("clean-fid", mode, exc) from None


BACKENDS = {"torch-fidelity": TorchFidelity, "clean-fid": CleanFID}


@lru_cache(maxsize=2)
def backend(evaluation, device: str, batch_size: int):
    """The FID backend the evaluation settings name (memoised: Inception loads once per process)."""
    return BACKENDS[evaluation.fid_backend](evaluation, torch.device(device), batch_size)
