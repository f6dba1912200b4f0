"""Quantization cost: calibration (time and peak memory) and BRECQ reconstruction of one block."""

from __future__ import annotations

import copy

import torch

import qdiff
from benchmarks.common import W8A8, adapter


class _CalibrationSetup:
    """The embedded UNet prepared at W8A8, and 64 timestep-aware calibration inputs."""

    timeout = 300

    def setup_cache(self):
        a = adapter("embedded", batch_size=16)
        fp = a.denoiser().eval().requires_grad_(False)
        data = a.calibration_data(fp, qdiff.CalibConfig(num_timesteps=8, samples_per_timestep=8))
        return fp, data

    def setup(self, cache, scale_search):
        fp, self.data = cache
        spec = qdiff.QuantSpec(8, scale_search=scale_search)
        config = qdiff.QConfig(weight=W8A8.weight, act=spec, recon=W8A8.recon)
        self.model = qdiff.prepare(copy.deepcopy(fp), config)


class Calibration(_CalibrationSetup):
    """Activation-range calibration: observed min-max, and the 80-candidate MSE search."""

    params = ["minmax", "mse"]
    param_names = ["scale_search"]

    def time_calibrate(self, cache, scale_search):
        qdiff.calibrate(self.model, self.data)


class CalibrationMemory(_CalibrationSetup):
    """Peak memory of calibration (min-max; the MSE search holds no larger tensors)."""

    params = ["minmax"]
    param_names = ["scale_search"]

    def peakmem_calibrate(self, cache, scale_search):
        qdiff.calibrate(self.model, self.data)


class Reconstruction:
    """BRECQ on one ResNet block of the embedded UNet (AdaRound weights, then LSQ steps), on the
    block's own recorded inputs: the cost of one reconstruction unit."""

    params = [20, 100]
    param_names = ["weight_iters"]
    timeout = 300

    def setup_cache(self):
        a = adapter("embedded", batch_size=16)
        fp = a.denoiser().eval().requires_grad_(False)
        data = a.calibration_data(fp, qdiff.CalibConfig(num_timesteps=8, samples_per_timestep=8))
        block = fp.down_blocks[1].resnets[0]
        seen = {}
        hook = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], temb=args[1]))
        with torch.no_grad():
            fp(data.x, data.t)
        hook.remove()
        # The block alone is the model: its (input, time embedding) are the calibration pairs.
        return block, qdiff.CalibData(seen["x"], seen["temb"])

    def setup(self, cache, weight_iters):
        block, self.data = cache
        config = qdiff.QConfig(
            weight=qdiff.QuantSpec(4, True, "channel"), act=qdiff.QuantSpec(8),
            recon=qdiff.ReconConfig(weight_iters=weight_iters, act_iters=weight_iters // 4, batch_size=16),
        )  # fmt: skip
        self.recon = config.recon
        self.model = qdiff.prepare(copy.deepcopy(block), config)
        qdiff.calibrate(self.model, self.data)

    def time_reconstruct_block(self, cache, weight_iters):
        qdiff.reconstruct(self.model, self.data, self.recon)
