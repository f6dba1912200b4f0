"""Text-to-image models whose denoiser is not SD-1.5's UNet call: PixArt-α/Σ, SD3/SD3.5 and
FLUX.1 (transformer denoisers) and SDXL (a UNet with added conditions).

They load like every pipeline adapter (a hub id, a ``save_pretrained`` folder, or for SD3,
FLUX and SDXL a single-file checkpoint with ``config``) and reuse the pipeline's own
``encode_prompt`` for the text encoders. Their denoisers take other argument names and
nested or packed inputs, so :class:`DenoiserCall` gives each the suite's convention,
``denoiser(x, t, **cond).sample`` with flat per-sample tensors: that is what calibration
records, reconstruction replays and the backends deploy. SD3 and FLUX are rectified-flow
models: an Euler flow-matching sampler (``FLOW_MATCHING``) with their own timestep handling
(FLUX's schedule shifts with the image size, its transformer takes ``t / 1000`` and a distilled
guidance input instead of a doubled batch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.models.base import COST_METRICS, Split
from bench.models.pipelines import SINGLE_FILE_SUFFIXES, PipelineAdapter, TextToImageAdapter, no_images
from bench.registry import MODELS


class DenoiserCall(nn.Module):
    """A diffusers denoiser called the suite's way: ``forward(x, t, **cond)``.

    Args:
        model: the diffusers model (registered as ``model``, so its layers are quantized).
        sample_arg: the name of its noisy-input argument (``hidden_states`` or ``sample``).
        nested: ``{argument: keys}``: conditioning passed as a dict argument (SDXL's
            ``added_cond_kwargs``, PixArt's), gathered from flat ``cond`` entries (absent: None).
        timestep_scale: multiplies ``t`` (FLUX takes ``t / 1000``).
        out_channels: keep this many output channels (PixArt's learned variance is dropped,
            as its pipeline does).
        packed: FLUX's 2×2 patch packing: ``x`` stays (B, C, H, W) for the sampler and is packed
            into (B, H/2·W/2, 4C) tokens with their position ids here.
    """

    def __init__(
        self,
        model: nn.Module,
        sample_arg: str = "hidden_states",
        nested: dict[str, tuple[str, ...]] | None = None,
        timestep_scale: float = 1.0,
        out_channels: int | None = None,
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.sample_arg = sample_arg
        self.nested = dict(nested or {})
        self.timestep_scale = timestep_scale
        self.out_channels = out_channels
        self.packed = packed

    @property
    def config(self):
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        inner = {k for keys in self.nested.values() for k in keys}
        kwargs: dict[str, Any] = {k: v for k, v in cond.items() if k not in inner}
        for arg, keys in self.nested.items():
            kwargs[arg] = {k: cond.get(k) for k in keys}
        b, c, h, w = x.shape
        if self.packed:
            x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
            rows = torch.arange(h // 2, device=x.device).repeat_interleave(w // 2)
            cols = torch.arange(w // 2, device=x.device).repeat(h // 2)
            kwargs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], 1).to(x.dtype)
            kwargs["txt_ids"] = x.new_zeros(cond["encoder_hidden_states"].shape[1], 3)
        t = t * self.timestep_scale if self.timestep_scale != 1 else t
        out = self.model(**{self.sample_arg: x}, timestep=t, return_dict=False, **kwargs)[0]
        if self.packed:
            out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        if self.out_channels is not None:
            out = out[:, : self.out_channels]
        return Transformer2DModelOutput(sample=out)


class _WrappedTextToImage(TextToImageAdapter):
    """Shared by the adapters here: the denoiser component, its call, latent size, decoding;
    each implements :meth:`encode` with its pipeline's ``encode_prompt``."""

    ARGS = ("source", "init", "config", "prompts", "calib_prompts", "guidance_scale", "resolution")
    ARCHITECTURE = "transformer"
    COMPONENT: ClassVar[str] = "transformer"
    LOAD_KWARGS: ClassVar[dict[str, Any]] = {}
    SINGLE_FILE = None
    IMAGE_SHAPE = (3, 1024, 1024)

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        out = super().arg_problems(args)
        size = args.get("resolution")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 16
        ):
            out.append(f"resolution={size!r}; give the image side in pixels, a multiple of 16 (e.g. 1024)")
        return out

    def call(self, model: nn.Module) -> DenoiserCall:
        return DenoiserCall(model)

    def denoiser(self) -> nn.Module:
        return self.call(self.fp_component())

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    def latent_shape(self) -> tuple[int, ...]:
        config = getattr(self.pipeline, self.COMPONENT).config
        size = int(self.args.get("resolution", config.sample_size * self.vae_scale)) // self.vae_scale
        return (self.pipeline.vae.config.latent_channels, size, size)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "latent_shape": list(self.latent_shape())}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_init:
            raise no_images(self.name)
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor + shift).sample


@MODELS.add
class PixArtAlpha(_WrappedTextToImage):
    """PixArt-α 512² (Chen et al., 2024): DiT with T5 cross-attention, DDIM with guidance.

    adaLN-single modulation; its pipeline defaults to DPM-Solver, the suite's shared sampler is
    DDIM, used for FP and quantized alike."""

    name = "pixart-alpha"
    DEFAULT_SOURCE = "PixArt-alpha/PixArt-XL-2-512x512"
    IMAGE_SHAPE = (3, 512, 512)
    DEFAULT_GUIDANCE = 4.5
    MAX_TOKENS = 120

    def call(self, model: nn.Module) -> DenoiserCall:
        channels = self.pipeline.vae.config.latent_channels
        learned_sigma = model.config.out_channels == 2 * channels
        return DenoiserCall(
            model,
            nested={"added_cond_kwargs": ("resolution", "aspect_ratio")},
            out_channels=channels if learned_sigma else None,
        )

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            max_sequence_length=self.MAX_TOKENS,
        )
        out = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if self.pipeline.transformer.config.sample_size == 128:  # the 1024² models take their size
            size = self.latent_shape()[-1] * self.vae_scale
            out["resolution"] = torch.tensor([[size, size]], dtype=embeds.dtype).expand(len(prompts), 2)
            out["aspect_ratio"] = torch.ones(len(prompts), 1, dtype=embeds.dtype)
        return {k: v.to(self.device) for k, v in out.items()}


@MODELS.add
class PixArtSigma(PixArtAlpha):
    """PixArt-Σ 1024² (Chen et al., 2024): PixArt-α's architecture, 300 T5 tokens, DDIM."""

    name = "pixart-sigma"
    DEFAULT_SOURCE = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    RANDOM_CONFIG = "pixart-sigma.json"
    IMAGE_SHAPE = (3, 1024, 1024)
    MAX_TOKENS = 300


@MODELS.add
class StableDiffusion3(_WrappedTextToImage):
    """Stable Diffusion 3 / 3.5 (Esser et al., 2024): rectified-flow MM-DiT, Euler with guidance.

    Text from CLIP-L, CLIP-G and T5; a pipeline saved without T5 (``text_encoder_3=None``) gets
    zeros for its tokens, as diffusers does."""

    name = "sd3"
    DEFAULT_SOURCE = "stabilityai/stable-diffusion-3.5-medium"
    SINGLE_FILE = "StableDiffusion3Pipeline"
    FLOW_MATCHING = True
    DEFAULT_GUIDANCE = 4.5  # SD3.5 medium's model card
    MAX_TOKENS = 256

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

    def load_kwargs(self) -> dict[str, Any]:
        # A folder saved without T5 (a common memory saving) lists text_encoder_3 as [null,
        # null]; diffusers then needs to be told that it is absent.
        folder = Path(self.source)
        if folder.suffix in SINGLE_FILE_SUFFIXES and self.args.get("config") is not None:
            folder = Path(str(self.args["config"]))  # a single file's pipeline configs
        index = folder / "model_index.json"
        kwargs = super().load_kwargs()
        if index.is_file() and json.loads(index.read_text()).get("text_encoder_3", [None])[0] is None:
            return {**kwargs, "text_encoder_3": None, "tokenizer_3": None}
        return kwargs

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.MAX_TOKENS,
        )  # fmt: skip
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@MODELS.add
class Flux(_WrappedTextToImage):
    """FLUX.1 (Black Forest Labs): rectified-flow MM-DiT with single-stream blocks, Euler.

    Text from CLIP and T5; the schedule shifts with the image size. FLUX.1-dev is
    guidance-distilled: the scale is an input of the transformer (``guidance``), one forward per
    step; FLUX.1-schnell has no guidance input (4 steps, no guidance)."""

    name = "flux"
    DEFAULT_SOURCE = "black-forest-labs/FLUX.1-schnell"
    SINGLE_FILE = "FluxPipeline"
    FLOW_MATCHING = True
    DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's default; schnell ignores it
    MAX_TOKENS = 256

    def call(self, model: nn.Module) -> DenoiserCall:
        return DenoiserCall(model, timestep_scale=1 / 1000, packed=True)

    def guided(self) -> bool:
        return False  # distilled guidance (dev) or none (schnell): never a doubled batch

    def latent_shape(self) -> tuple[int, ...]:
        # The transformer sees 2×2-packed latents; its sample_size is not FLUX's image size.
        size = int(self.args.get("resolution", 1024)) // self.vae_scale
        size -= size % 2
        return (self.pipeline.vae.config.latent_channels, size, size)

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

    def set_timesteps(self, scheduler) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        steps = self.sampling.steps
        c = scheduler.config
        _, h, w = self.latent_shape()
        mu = calculate_shift(
            h * w // 4, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5), c.get("max_shift", 1.15),
        )  # fmt: skip
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.MAX_TOKENS
        )
        out = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.pipeline.transformer.config.guidance_embeds:
            out["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=self.device)
        return out


@MODELS.add
class StableDiffusionXL(_WrappedTextToImage):
    """SDXL base (Podell et al., 2023): UNet with two CLIP encoders, DDIM with guidance.

    Added conditions: the pooled text embedding and original/crop/target size ids. Its skip
    concatenations get split shortcut quantization like SD-1.5's."""

    name = "sdxl"
    DEFAULT_SOURCE = "stabilityai/stable-diffusion-xl-base-1.0"
    RANDOM_CONFIG = "sdxl.json"
    SINGLE_FILE = "StableDiffusionXLPipeline"
    ARCHITECTURE = "unet"
    COMPONENT = "unet"
    DEFAULT_GUIDANCE = 5.0

    def call(self, model: nn.Module) -> DenoiserCall:
        return DenoiserCall(
            model, sample_arg="sample", nested={"added_cond_kwargs": ("text_embeds", "time_ids")}
        )

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=self.device, do_classifier_free_guidance=False
        )
        size = self.latent_shape()[-1] * self.vae_scale
        ids = pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )  # fmt: skip
        return {
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": ids.expand(len(prompts), -1),
        }

    def negative(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.random_init or not self.pipeline.config.force_zeros_for_empty_prompt:
            return super().negative(text)
        # SDXL base's unconditional input: zero text embeddings, the same size ids.
        return {k: v[:1] if k == "time_ids" else torch.zeros_like(v[:1]) for k, v in text.items()}


@MODELS.add
class DiTXL2(PipelineAdapter):
    """DiT-XL/2 256² (Peebles & Xie, 2023): a class-conditional adaLN-Zero transformer on
    ImageNet latents, DDIM with classifier-free guidance.

    Sample ``i`` asks for ImageNet class ``i mod 1000``; the unconditional half of a guided
    batch is the null class (1000). Model args: ``source``, ``init`` (``random``: the published
    architecture with seeded weights, for cost runs), ``guidance_scale`` (default 4.0, the
    pipeline's; 1: the conditional model alone, one forward per step).
    """

    name = "dit-xl-2-256"
    DEFAULT_SOURCE = "facebook/DiT-XL-2-256"
    RANDOM_CONFIG = "dit-xl-2-256.json"
    COMPONENT = "transformer"
    ARCHITECTURE = "transformer"
    ARGS = ("source", "init", "guidance_scale")
    IMAGE_SHAPE = (3, 256, 256)
    DEFAULT_GUIDANCE = 4.0
    DEFAULT_METRICS = ("fid", "fid_vs_fp", "lpips_vs_fp", "psnr_vs_fp", *COST_METRICS)
    NULL_CLASS = 1000

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        out = super().arg_problems(args)
        scale = args.get("guidance_scale", cls.DEFAULT_GUIDANCE)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 1:
            out.append(f"guidance_scale={scale!r}; give a number ≥ 1 (1: no guidance)")
        return out

    def denoiser(self) -> nn.Module:
        model = self.fp_component()
        return DenoiserCall(model, out_channels=model.config.in_channels)  # drops the learned σ

    def latent_shape(self) -> tuple[int, ...]:
        config = self.pipeline.transformer.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def guided(self) -> bool:
        return self.guidance_scale != 1

    def conditions(self, start: int, n: int, split: Split = "evaluation") -> dict[str, torch.Tensor]:
        # ImageNet's 1,000 classes are the conditioning's whole domain: both splits use them.
        labels = (torch.arange(start, start + n) % 1000).to(self.device)
        if self.guided():
            labels = torch.cat([torch.full_like(labels, self.NULL_CLASS), labels])
        return {"class_labels": labels}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_init:
            raise no_images(self.name)
        vae = self.pipeline.vae
        return vae.decode(x / vae.config.scaling_factor).sample
