"""NNCF post-training quantization: what a CPU deployer runs (optimum-intel's int8 path), with
nothing of qdiff in the path but the calibration inputs.

The FP denoiser is converted to OpenVINO (``ov.convert_model``) and quantized by
``nncf.quantize``: NNCF's own choice of layers and FakeQuantize placement, its min-max ranges
and fast bias correction, with its default (performance) preset for every denoiser; W8A8
only. It calibrates on the same inputs as Q-Diffusion at the matrix's budget (timestep-aware,
uniform over the trajectory; the run's calibration seed), so that a cell compares NNCF's
calibration with Q-Diffusion's on the same OpenVINO int8 kernels (``backend: openvino`` for
the qdiff methods). The model runs on OpenVINO whatever the matrix's backend says; the NNCF
and OpenVINO versions are part of the recorded settings. Needs
``pip install 'qdiff-bench[openvino]'``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from torch import nn

import qdiff
from bench.errors import AvailabilityError
from bench.methods import Calibration, Progress
from bench.registry import METHODS
from bench.spec import Bits, Budget


@dataclass(frozen=True)
class NNCFSettings:
    """What an NNCF run used: its calibration inputs, NNCF's options and versions."""

    calib: qdiff.CalibConfig
    fast_bias_correction: bool
    nncf_version: str
    openvino_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _libraries():
    try:
        import nncf
        import openvino
    except ImportError:
        raise AvailabilityError(
            "nncf-ptq needs NNCF and OpenVINO: pip install 'qdiff-bench[openvino]'"
        ) from None
    return nncf, openvino


@dataclass(frozen=True)
class NNCFMethod:
    name: str = "nncf-ptq"
    description: str = "NNCF's post-training int8 quantization on OpenVINO (W8A8)"

    checkpointable: ClassVar[bool] = False  # an OpenVINO model, not a picklable torch module
    backend: ClassVar[str] = "openvino"  # it always runs on OpenVINO's kernels
    # What a CPU deployer runs without this suite: the bar for every int8 deployment here.
    runtime_reference: ClassVar[bool] = True

    def unsupported(self, bits: Bits) -> str | None:
        return None if bits == Bits(8, 8) else f"{self.name} quantizes to int8 only; use bits W8A8"

    def unsupported_on(self, model) -> str | None:
        return None

    def bases(self, bits: Bits) -> tuple:
        return ()

    def configure(self, bits: Bits, budget: Budget) -> NNCFSettings:
        nncf, openvino = _libraries()
        calib = budget.apply(qdiff.QConfig(recon=qdiff.ReconConfig(method="none"))).calib
        return NNCFSettings(
            calib=replace(calib, strategy="uniform"),
            fast_bias_correction=True,
            nncf_version=nncf.__version__,
            openvino_version=openvino.__version__,
        )

    def quantize(
        self,
        denoiser: nn.Module,
        config: NNCFSettings,
        calibration: Calibration,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, None]:
        from qdiff.backends.openvino import OpenVINOModule, convert

        nncf, _ = _libraries()
        data = calibration(config.calib).to("cpu")
        names = tuple(data.cond)
        items = [(data.x[i : i + 1], data.t[i : i + 1], *(data.cond[k][i : i + 1] for k in names))
                 for i in range(len(data.x))]  # fmt: skip
        ov_model = convert(denoiser.cpu().eval(), names, items[0])
        dataset = nncf.Dataset(items, lambda item: [v.numpy() for v in item])
        quantized = nncf.quantize(
            ov_model, dataset, subset_size=len(items), fast_bias_correction=config.fast_bias_correction
        )
        if progress is not None:
            progress(1, 1)
        # Its inputs take the conditions in the calibration data's order, which need not be the
        # order a sampler passes them in (PixArt-Σ's mask and text states).
        return OpenVINOModule(ov_model=quantized, names=names), None

    def refine(self, denoiser, bases, config, calibration, alphas_cumprod) -> nn.Module:
        raise TypeError(f"{self.name} quantizes by itself (no bases): call quantize")

    def deploy(self, qmodel: nn.Module, backend: str) -> nn.Module:
        return qmodel  # NNCF's model runs on OpenVINO; the matrix's backend does not apply

    def kernels(self, deployed: nn.Module) -> dict[str, int]:
        return deployed.runtime_kernels()


METHOD = METHODS.add(NNCFMethod())
