"""One denoiser step of a deployed quantized model, per backend and model size, and the peak
memory of sampling."""

from __future__ import annotations

import torch

import qdiff
from benchmarks.common import GPU_BACKENDS, W4A32, W8A8, adapter, skip_without_cuda

BATCH = {"embedded": 64, "cifar10-random": 2}


class DenoiserStep:
    """``latency_step``'s measurement in asv: the first sampler step's inputs, at a fixed batch
    (embedded UNet 64, CIFAR-10 DDPM UNet with random weights 2). ``fp`` is the float32 model;
    ``fake`` simulates quantization; ``x86`` runs oneDNN's int8 kernels."""

    params = (["fp", "fake", "x86"], ["embedded", "cifar10-random"])
    param_names = ["backend", "model"]
    timeout = 300

    def setup(self, backend, model, device="cpu"):
        from bench.models.base import in_dtype, model_dtype

        a = adapter("embedded" if model == "embedded" else "cifar", BATCH[model], device)
        fp = a.denoiser().eval().requires_grad_(False)
        x, self.t, kwargs = a.step_inputs(BATCH[model], 0)
        if backend == "fp":
            self.model = fp
        else:
            recipe = W4A32 if backend == "w4a16" else W8A8
            data = qdiff.CalibData(x, self.t, kwargs)  # one batch calibrates: timing only
            qmodel, _ = qdiff.quantize(fp, recipe, data)
            self.model = qdiff.convert(qmodel, backend)
        self.x, self.kwargs = in_dtype(model_dtype(self.model), x, kwargs)
        if qdiff.backends.has_choices(self.model):  # the GPU backends: each layer's fastest kernel
            qdiff.backends.choose_kernels(self.model, self.x, self.t, **self.kwargs)
        self.step()  # oneDNN primitive creation, Triton compilation: not part of the timing

    @torch.no_grad()
    def step(self):
        out = self.model(self.x, self.t, **self.kwargs).sample
        if out.is_cuda:
            torch.cuda.synchronize()

    def time_step(self, backend, model):
        self.step()

    def track_deployed_mib(self, backend, model):
        """``peak_memory``'s measure for one step: the deployed model's resident tensors plus
        the step's working memory, nothing else the process holds."""
        from bench.metrics.memory import PeakWindow, deployed_memory

        device = self.x.device
        with PeakWindow(device) as window:
            self.step()
        return deployed_memory(self.model, window)[0]

    track_deployed_mib.unit = "MiB"


class CompiledDenoiserStep(DenoiserStep):
    """The compiled baselines and deployment: FP32 and ``x86`` under ``torch.compile`` (inductor
    with freezing, the int8 lowering registered), as ``compile: inductor`` times them."""

    params = (["fp", "x86"], ["embedded"])
    timeout = 600

    def setup(self, backend, model):
        from qdiff.backends.x86 import compile_setup

        super().setup(backend, model)
        compile_setup()
        self.model = torch.compile(self.model)
        self.step()  # compilation: not part of the timing


class GPUDenoiserStep(DenoiserStep):
    """The GPU backends on the CIFAR-10 DDPM UNet (random weights), batch 2; skipped without
    CUDA (before anything heavy is imported)."""

    params = (list(GPU_BACKENDS), ["cifar10-random"])

    def setup(self, backend, model):
        skip_without_cuda(backend)
        super().setup(backend, model, device="cuda")


class Sampling:
    """Peak memory of sampling 32 embedded-model images in 10 DDIM steps."""

    timeout = 300

    def setup(self):
        self.adapter = adapter("embedded", batch_size=32)
        self.fp = self.adapter.denoiser().eval().requires_grad_(False)

    def peakmem_sample(self):
        self.adapter.sample(self.fp, 32, 0)
